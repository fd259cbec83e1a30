"""hsae: Hierarchical Sparse Autoencoders."""
