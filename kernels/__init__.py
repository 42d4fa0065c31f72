"""Triton kernels with torch references, chosen by device."""
