"""Test helpers: device, per-dtype tolerances, comparison with the float64 reference."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of fastsplit's kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"

# Tolerances against the float64 reference, by the dtype the kernel ran in.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


def assert_close(actual, expected, dtype, name=""):
    """Compare with a float64 reference at ``dtype``'s tolerance; every element must be finite."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten NaN-poisoned element?)"
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=lambda m: f"{name}: {m}")
