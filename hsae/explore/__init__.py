"""See and judge the forest: top contexts, the explorer site, the auto-interp judge, geometry."""
