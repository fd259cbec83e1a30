"""Interop: SAE Lens SAEs linked post hoc, SAEBench on each level."""
