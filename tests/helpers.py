"""Test helpers: device, per-dtype tolerances, comparison with the float64 reference."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of fastsplit's kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One small fixed Triton config (one compile per kernel variant) instead of the preference list (fastsplit._env).
os.environ.setdefault("FASTSPLIT_FIXED_CONFIGS", "1")

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


# flash-attention's rule for a kernel in a low precision: its error against the float64 reference is at most
# FA_FACTOR times the error of the torch path computed in the same dtype, plus a floor relative to the
# reference's scale (so exact-zero torch errors on tiny cases do not demand bit-exactness).
FA_FACTOR = 3.0
FA_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def fa_excess(actual, expected, torch_same):
    """(kernel error, allowed error) under the rule above, as floats."""
    ref = expected.double()
    err = float((actual.double() - ref).abs().max()) if ref.numel() else 0.0
    base = float((torch_same.double() - ref).abs().max()) if ref.numel() else 0.0
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return err, FA_FACTOR * base + FA_FLOOR[actual.dtype if actual.dtype in FA_FLOOR else torch.float32] * scale


def assert_close_fa(actual, expected, torch_same, name=""):
    """A kernel's result against the float64 reference, judged by the torch path's own error in its dtype."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten NaN-poisoned element?)"
    err, allowed = fa_excess(actual, expected, torch_same)
    assert err <= allowed, (f"{name}: max error {err:.3g} against float64 exceeds {FA_FACTOR:g}x the torch path's "
                            f"own error in {actual.dtype} plus the floor ({allowed:.3g})")


def backend_cases(gpu_triton_dtypes=(torch.float16, torch.bfloat16), *, native=True):
    """(backend, dtype) pairs every op test runs: torch in f64/f32, Triton in f32 (the interpreter on the CPU),
    the native extension in f32 when built and ``native`` (the op has a native kernel); on a GPU also Triton and
    native in half precision."""
    from fastsplit import native as ext

    cases = [pytest.param("torch", torch.float64, id="torch-f64"),
             pytest.param("torch", torch.float32, id="torch-f32"),
             pytest.param("triton", torch.float32, id="triton-f32")]
    if native and ext._C is not None:
        cases.append(pytest.param("native", torch.float32, id="native-f32"))
    if HAS_CUDA:
        if native and ext.cuda_built():
            cases.append(pytest.param("native", torch.bfloat16, id="native-bf16"))
        names = {torch.float16: "f16", torch.bfloat16: "bf16"}
        cases += [pytest.param("triton", d, id=f"triton-{names[d]}") for d in gpu_triton_dtypes]
    return cases
