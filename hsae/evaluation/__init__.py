"""Evaluation: the paper's measures, loss recovered by splicing, tables and figures."""
