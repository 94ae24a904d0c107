"""Input checks shared by the ops: each error names the argument and its shape.

Metadata checks (type, shape, dtype, device) always run. Value checks read the data: on CPU tensors that costs no
device sync, so they always run there; on a GPU they would synchronise with the host, so they run only with
``fastsplit.set_debug(True)`` / ``FASTSPLIT_DEBUG=1``. Never while tracing (torch.compile) or capturing a graph.
"""
from __future__ import annotations

import math
import weakref
from typing import Union

import torch
from torch import Tensor

from .. import _env

Multiplier = Union[float, int, Tensor]


def value_checks(t: Tensor) -> bool:
    """Whether to read ``t``'s values: always on the CPU (no device sync), on a GPU only in debug mode; never while
    tracing or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cpu:
        return True
    if not _env.debug():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


_SMALL = 64  # up to this many values, a Python pass over tolist() beats launching isfinite + all + a read-back


def check_tensor(name: str, t, *, ndim: int | None = None, like: Tensor | None = None,
                 shape: tuple | None = None) -> None:
    """``t`` is a tensor (of ``ndim`` dims, of ``shape``) on ``like``'s device in ``like``'s dtype. Metadata only,
    written flat (it runs several times on every op call): a fraction of a microsecond."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if like is not None:
        if t.dtype is not like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the input has dtype {like.dtype}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")


_last_finite: tuple = (None, -1)  # (weakref to the last tensor found finite, its version): checked once per write


def check_finite(name: str, t: Tensor) -> None:
    """``t`` holds no NaN or inf (CPU tensors always; CUDA tensors in debug mode: see :func:`value_checks`).
    A multiplier tensor reused call after call (a module's per-row m) is read again only after it was written."""
    global _last_finite
    if not value_checks(t):  # first: under torch.compile nothing below may run, not even the weakref's read (dynamo
        return               # would guard on its referent, which can die before the guard is built: a flaky crash)
    ref, version = _last_finite
    if ref is not None and ref() is t and version == t._version:
        return
    if t.numel() <= _SMALL:  # tolist() of a 1-D tensor is flat; reshape(-1) alone would cost more than the check
        ok = all(map(math.isfinite, t.tolist() if t.dim() == 1 else t.flatten().tolist()))
    else:
        ok = bool(torch.isfinite(t).all())
    if not ok:
        raise ValueError(f"{name} holds NaN or inf values")
    _last_finite = (weakref.ref(t), t._version)


def check_multiplier(name: str, m: Multiplier, lead: tuple, device: torch.device) -> None:
    """A multiplier is a finite number, or a floating tensor on ``device`` whose shape is a prefix of ``lead``
    (x.shape[:-1]) and, where its values can be read without a sync (:func:`value_checks`), finite."""
    if isinstance(m, Tensor):
        if not m.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {m.dtype}")
        if m.device != device:
            raise ValueError(f"{name} is on {m.device} but the input is on {device}")
        if m.shape != lead[: m.dim()]:
            raise ValueError(f"{name} has shape {tuple(m.shape)}, which is not a prefix of the input's "
                             f"leading shape {tuple(lead)} (use [B] for one factor per sequence, "
                             f"[B, T] for one per token)")
        check_finite(name, m)
        return
    if isinstance(m, bool) or not isinstance(m, (float, int)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(m).__name__}")
    if not math.isfinite(m):
        raise ValueError(f"{name} must be finite, got {m}")


def check_strengths(name: str, values, *, min_count: int = 1) -> list[float]:
    """A list of steering strengths (workflows: sweeps, generation, training factors) as floats: at least
    ``min_count`` of them, each a finite real number. Returns the list."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {values!r}") from None
    if len(out) < min_count:
        raise ValueError(f"{name} needs at least {min_count} value{'s' if min_count > 1 else ''}, got {len(out)}")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} must be finite numbers, got {bad[0]} in {out}")
    return out


def expand_multiplier(m: Multiplier, lead: tuple, dtype: torch.dtype | None = None):
    """Broadcastable form of ``m`` against an output of shape ``lead + (N,)`` (a view; in ``dtype`` if given)."""
    if not isinstance(m, Tensor):
        return float(m)
    view = m.reshape(tuple(m.shape) + (1,) * (len(lead) - m.dim() + 1))
    return view if dtype is None else view.to(dtype)


def multiplier_rows(m: Multiplier, lead: tuple):
    """``m`` as fp32 [rows] (rows = prod(lead)), or None for a plain number."""
    if not isinstance(m, Tensor):
        return None
    shape = tuple(m.shape) + (1,) * (len(lead) - m.dim())
    return m.detach().to(torch.float32).reshape(shape).expand(lead).reshape(-1).contiguous()
