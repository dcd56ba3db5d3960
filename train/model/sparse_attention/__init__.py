"""Sparse attention layers on the block-sparse kernel (sparsetron.kernels.sparse_attention): NSA,
MoBA and sliding window, registered as attention kinds by importing .modules."""
