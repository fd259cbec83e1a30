"""Activation sources: synthetic planted forests (ground truth) and LLM activations."""
