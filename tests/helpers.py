"""Test helpers: device, per-dtype tolerances, comparison with the float64 reference."""
import os

import pytest
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


def backend_cases(gpu_triton_dtypes=(torch.float16, torch.bfloat16)):
    """(backend, dtype) pairs every op test runs: torch in f64/f32, Triton in f32 (the interpreter on the CPU),
    the native extension in f32 when built; on a GPU also Triton and native in half precision."""
    from fastsplit import native

    cases = [pytest.param("torch", torch.float64, id="torch-f64"),
             pytest.param("torch", torch.float32, id="torch-f32"),
             pytest.param("triton", torch.float32, id="triton-f32")]
    if native._C is not None:
        cases.append(pytest.param("native", torch.float32, id="native-f32"))
    if HAS_CUDA:
        if native.cuda_built():
            cases.append(pytest.param("native", torch.bfloat16, id="native-bf16"))
        names = {torch.float16: "f16", torch.bfloat16: "bf16"}
        cases += [pytest.param("triton", d, id=f"triton-{names[d]}") for d in gpu_triton_dtypes]
    return cases
