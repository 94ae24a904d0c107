"""The one place that chooses a backend (torch, triton, native) and explains a refusal."""
from __future__ import annotations

import torch

from .._env import triton_interpreting
from . import _routing

BACKENDS = ("auto", "torch", "triton", "native")

try:  # Triton is optional: the torch path works without it.
    import triton  # noqa: F401

    TRITON_VERSION: str | None = triton.__version__
except Exception:  # pragma: no cover - depends on the install
    TRITON_VERSION = None


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


def resolve(backend: str, device: torch.device, *, needs_autograd_m: bool = False, op: str = "steered_linear",
            form: str | None = None, mkind: str | None = None, rows: int | None = None) -> str:
    """Return the concrete backend for ``backend`` on ``device``.

    An explicit backend that cannot run raises ``RuntimeError`` saying why. "auto" never fails: on a CUDA
    device it follows the measured routing table (:mod:`fastsplit.ops._routing`, keyed by capability, op,
    form, m kind and row class) when the routed backend can run, and takes the torch path otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if needs_autograd_m or device.type != "cuda":
            return "torch"
        cap = torch.cuda.get_device_capability(device)
        routed = _routing.route(tuple(cap), op, form, mkind, rows)
        if routed == "torch":
            return "torch"
        refusal = _triton_refusal(device) if routed == "triton" else _native_refusal(device)
        return routed if refusal is None else "torch"
    if backend == "torch":
        return backend
    if needs_autograd_m:
        raise ValueError(f"backend={backend!r} treats the multiplier as a constant, but a multiplier "
                         "tensor requires grad; use backend='torch' to differentiate through m")
    reason = _triton_refusal(device) if backend == "triton" else _native_refusal(device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {reason}")
    return backend
