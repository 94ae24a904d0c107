"""Loader for the optional compiled extension (csrc/).

The extension is optional: when it is missing the package works on its torch and Triton paths,
and this module says so once, at import, through the ``fastsplit`` logger.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger("fastsplit")

_C = None
_IMPORT_ERROR: str | None = None
if importlib.util.find_spec("fastsplit._C") is None:
    _IMPORT_ERROR = "it was not built"
else:
    try:
        from . import _C  # type: ignore[attr-defined]
    except Exception as exc:  # pragma: no cover - depends on the build
        _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
if _C is None:
    log.warning("fastsplit: the compiled extension fastsplit._C is not available (%s); "
                "backend='native' is off, the torch and Triton paths work.", _IMPORT_ERROR)


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _C is not None and bool(_C.cuda_built())


def cuda_archs() -> list[str]:
    return list(_C.cuda_archs()) if _C is not None else []


def refusal(device: torch.device) -> str | None:
    """Why backend='native' cannot run on ``device``, or None when it can."""
    if _C is None:
        return f"the compiled extension fastsplit._C did not import ({_IMPORT_ERROR})"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return None if cuda_built() else "the extension was built without nvcc (no CUDA kernels)"
    return f"the extension has no kernels for device type {device.type!r}"
