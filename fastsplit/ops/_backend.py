"""The one place that chooses a backend (torch, triton, native) and explains a refusal."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "native")

try:  # Triton is optional: the torch path works without it.
    import triton  # noqa: F401

    TRITON_VERSION: str | None = triton.__version__
except Exception:  # pragma: no cover - depends on the install
    TRITON_VERSION = None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_refusal(device: torch.device) -> str | None:
    if TRITON_VERSION is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    if device.type == "cpu":
        return ("Triton kernels need a CUDA device; on the CPU they run only under "
                "TRITON_INTERPRET=1 set before fastsplit is imported (slow, for tests)")
    return f"Triton kernels do not run on device type {device.type!r}"


def _native_refusal(device: torch.device) -> str | None:
    from .. import native

    return native.refusal(device)


def resolve(backend: str, device: torch.device, *, needs_autograd_m: bool = False) -> str:
    """Return the concrete backend for ``backend`` on ``device``.

    An explicit backend that cannot run raises ``RuntimeError`` saying why; "auto" never fails:
    it takes Triton on CUDA devices and the torch reference elsewhere.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if needs_autograd_m:
            return "torch"
        if device.type == "cuda" and _triton_refusal(device) is None:
            return "triton"
        return "torch"
    if backend == "torch":
        return backend
    if needs_autograd_m:
        raise ValueError(f"backend={backend!r} treats the multiplier as a constant, but a multiplier "
                         "tensor requires grad; use backend='torch' to differentiate through m")
    reason = _triton_refusal(device) if backend == "triton" else _native_refusal(device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {reason}")
    return backend
