"""The method: the levels, their loss, the hierarchy, the lambda controller, training."""
