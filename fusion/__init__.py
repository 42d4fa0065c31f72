"""Fusion blocks: the cross-modal attention bridge and the sparse Mixture-of-Experts."""
