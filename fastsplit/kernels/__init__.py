"""Triton kernels (imported lazily by the ops)."""
