"""The steered linear op: ``y = x·(W + m1·ΔW)ᵀ + (b + m2·Δb)`` (arXiv 2602.02343, eq. 1).

Layers, top to bottom: ``steered_linear()`` (public, validates and dispatches) → the torch backend
``steered_linear_torch`` (cuBLAS compositions, the CPU path and ``auto``'s default) or ``SteeredLinearFunction``
(autograd over the Triton decode kernel, ``fastsplit.kernels.steered_linear``) → the kernels.
``steered_linear_ref`` is the plain pure-torch reference: the test oracle and the benchmark baseline.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _env
from . import _backend, _tune
from ._checks import Multiplier, check_multiplier, check_tensor, expand_multiplier, multiplier_rows
from ._chunks import CPU_CACHE_BYTES

__all__ = ["steered_linear", "steered_linear_ref", "steered_linear_torch", "SteeredLinearFunction"]


def steered_linear_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, *,
                       delta_weight: Optional[Tensor] = None, lora_a: Optional[Tensor] = None,
                       lora_b: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       m1: Multiplier = 1.0, m2: Optional[Multiplier] = None) -> Tensor:
    """Pure-torch reference of :func:`steered_linear` (no input checks; any float dtype).

    It never forms ``W + m1·ΔW``: the update is added as ``m1·(x·ΔWᵀ)``. ``weight=None`` means no base
    layer: only the update ``m1·ΔW·x + m2·Δb``.
    """
    m2 = m1 if m2 is None else m2
    lead = tuple(x.shape[:-1])
    if weight is None:
        y = x.new_zeros(lead + (_out_features(None, delta_weight, lora_b, delta_bias),))
    else:
        y = F.linear(x, weight, bias)
    if delta_weight is not None:
        y = y + expand_multiplier(m1, lead, y.dtype) * F.linear(x, delta_weight)
    elif lora_a is not None:
        y = y + expand_multiplier(m1, lead, y.dtype) * F.linear(F.linear(x, lora_a), lora_b)
    if delta_bias is not None:
        y = y + expand_multiplier(m2, lead, y.dtype) * delta_bias
    return y


# local_weight with one scalar m: forming W + m·ΔW once costs 3·N·K element reads/writes, a second GEMM costs
# 2·M·N·K FLOPs, so folding wins from M > 1.5·bytes·FLOPS/BW rows. H200 in bf16 (790 TFLOP/s, 4.2 TB/s): 564
# rows. On the CPU the fold runs at cache speed while the three weights fit the last-level cache (measured on
# the 2-core machine, fp32 576x1536: the fold wins from 4 rows, 0.30 against 0.45 ms at 16) and at memory speed
# past it (2048x8192: two GEMMs win up to about 100 rows). Below the threshold (decode), two GEMMs read less.
FOLD_ROWS = {"cuda": 512, "cpu": 4, "cpu-uncached": 128}


def fold_rows(device: torch.device, weight_bytes: int) -> int:
    """The fewest rows from which local_weight with one scalar m folds W + m·ΔW (see FOLD_ROWS)."""
    if device.type == "cuda":
        return FOLD_ROWS["cuda"]
    return FOLD_ROWS["cpu"] if 3 * weight_bytes <= CPU_CACHE_BYTES else FOLD_ROWS["cpu-uncached"]


def _scale_rows(t: Tensor, m, lead: tuple) -> Tensor:
    """``t`` [M, c] with row i scaled by the per-row or per-token multiplier ``m`` (broadcast, never copied into
    rows): one elementwise kernel, output in t's dtype."""
    return (t.view(*lead, t.shape[-1]) * expand_multiplier(m, lead, t.dtype)).view(-1, t.shape[-1])


def steered_linear_torch(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                         delta_weight: Optional[Tensor] = None, lora_a: Optional[Tensor] = None,
                         lora_b: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                         m1: Multiplier = 1.0, m2: Optional[Multiplier] = None, fold: Optional[bool] = None,
                         rank_db: Optional[bool] = None) -> Tensor:
    """The torch backend: the same result as :func:`steered_linear_ref` in the fewest launches and bytes that
    torch ops allow (cuBLAS on a GPU), differentiable by autograd (m included). No input checks.

    ``fold`` (local_weight, one m) and ``rank_db`` (LoRA with a per-row Δb) pick a composition; None follows the
    static rules below (the tuner's candidates try both: ``fastsplit.ops._tune``).

    Per form, with scalar m folded into the bias ``b + m2·Δb`` (one N-vector op) and per-row m broadcast
    from [B] / [B, T] without copies:

    * vector: one GEMM with that bias; per-row m2 adds ``m2⊙Δb`` in place (one pass over y).
    * LoRA: one GEMM for ``x·Wᵀ + b``, the skinny ``u = x·Aᵀ`` [M, r], then one in-place GEMM
      ``y += [m1⊙u | m2]·[B | Δb]ᵀ`` (rank r+1): a per-row Δb rides in the rank product, no full-size temporary.
    * local_weight, scalar m, at least :func:`fold_rows` rows: **a transient copy** ``W + m1·ΔW`` [N, K] in x's
      dtype (as large as W) and one GEMM; fewer rows: two GEMMs, the second accumulating in place.
    * local_weight, per-row m: ``y = x·Wᵀ + b``, then ``y += (m1⊙x)·ΔWᵀ`` in place (m scales x's rows, an
      [M, K] temporary, never a weight); a per-row Δb adds in place.

    ``weight=None`` (no base layer) takes :func:`steered_linear_ref`.
    """
    if weight is None:
        return steered_linear_ref(x, None, bias, delta_weight=delta_weight, lora_a=lora_a, lora_b=lora_b,
                                  delta_bias=delta_bias, m1=m1, m2=m2)
    m2 = m1 if m2 is None else m2
    lead = tuple(x.shape[:-1])
    row1, row2 = isinstance(m1, Tensor), isinstance(m2, Tensor)
    b_eff = bias
    if delta_bias is not None and not row2:
        b_eff = torch.add(bias, delta_bias, alpha=float(m2)) if bias is not None else delta_bias * float(m2)
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]; a view for contiguous x (what F.linear does inside)
    if fold is None:
        fold = x2.shape[0] >= fold_rows(x.device, weight.numel() * weight.element_size())
    fold = fold and delta_weight is not None and not row1
    # y [M, N] is the base of every in-place update below (an in-place op on a view of a leaf that needs no grad,
    # followed by another, would trip autograd when only the deltas require grad).
    y = F.linear(x2, torch.add(weight, delta_weight, alpha=float(m1)) if fold else weight, b_eff)
    # a per-row Δb joins the rank product (by default), or adds in place after it
    rank_db = (rank_db is not False) and delta_bias is not None and row2 and lora_a is not None
    if lora_a is not None:
        u = F.linear(x2, lora_a)  # [M, r]
        if row1 or rank_db:
            u = _scale_rows(u, m1, lead) if row1 else u * float(m1)
            lb = lora_b
            if rank_db:
                m2_col = expand_multiplier(m2, lead, u.dtype).expand(*lead, 1)  # a view beside u's columns
                u = torch.cat([u.view(*lead, -1), m2_col], dim=-1).view(-1, u.shape[-1] + 1)
                lb = torch.cat([lora_b, delta_bias[:, None]], dim=1)
            y.addmm_(u, lb.t())
        else:
            y.addmm_(u, lora_b.t(), alpha=float(m1))
    elif delta_weight is not None and row1:
        y.addmm_(_scale_rows(x2, m1, lead), delta_weight.t())
    elif delta_weight is not None and not fold:
        y.addmm_(x2, delta_weight.t(), alpha=float(m1))
    y = y.view(*lead, y.shape[-1])
    if delta_bias is not None and row2 and not rank_db:
        y.addcmul_(expand_multiplier(m2, lead), delta_bias)  # m2 in its own dtype: no copy
    return y


def steered_linear_bwd_torch(grad: Tensor, x: Tensor, weight: Tensor, delta_weight: Optional[Tensor],
                             lora_a: Optional[Tensor], lora_b: Optional[Tensor], m1_rows: Optional[Tensor],
                             m2_rows: Optional[Tensor], m1: float, m2: float, needs: list) -> list:
    """Backward in torch ops, same contract as the Triton launcher (``grad`` [M, N], ``x`` [M, K]):
    dx = g·W + (m1⊙g)·ΔW, dW = gᵀx, dΔW = (m1⊙g)ᵀx, LoRA through the rank-r path, dΔb = Σ m2⊙g."""
    need_x, need_w, need_b, need_dw, need_a, need_lb, need_db = needs
    r1 = m1_rows[:, None].to(grad.dtype) if m1_rows is not None else m1
    r2 = m2_rows[:, None].to(grad.dtype) if m2_rows is not None else m2
    gm = grad * r1  # m1⊙g, [M, N]
    out = [grad.new_empty(0) for _ in range(7)]
    if need_x:
        out[0] = grad @ weight
        if delta_weight is not None:
            out[0] = out[0] + gm @ delta_weight
        elif lora_a is not None:
            out[0] = out[0] + (gm @ lora_b) @ lora_a
    if need_w:
        out[1] = grad.t() @ x
    if need_b:
        out[2] = grad.sum(0)
    if need_dw:
        out[3] = gm.t() @ x
    if need_a:
        out[4] = (gm @ lora_b).t() @ x
    if need_lb:
        out[5] = gm.t() @ (x @ lora_a.t())
    if need_db:
        out[6] = (grad * r2).sum(0)
    return out


def _out_features(weight, delta_weight, lora_b, delta_bias) -> int:
    for t in (weight, delta_weight, lora_b):
        if t is not None:
            return t.shape[0]
    return delta_bias.shape[0]


class SteeredLinearFunction(torch.autograd.Function):
    """Autograd over the Triton forward launcher; the backward is the torch one (cuBLAS GEMMs). ``x`` is [M, K];
    m1/m2 rows are fp32 [M] or None; the factors are constants here (``backend="torch"`` differentiates m)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1_rows, m2_rows, m1: float,
                m2: float, config: Optional[int] = None):
        from ..kernels import steered_linear as k

        args = (x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1_rows, m2_rows, m1, m2)
        # Inside torch.compile the registered op (traceable); eagerly the launcher itself (no op dispatch).
        if torch.compiler.is_compiling():
            y = k.steered_linear_fwd(*args, -1 if config is None else config)
        else:
            y = k.launch_fwd(*args, config=config)
        ctx.save_for_backward(x, weight, delta_weight, lora_a, lora_b, m1_rows, m2_rows)
        ctx.scalars = (m1, m2)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, delta_weight, lora_a, lora_b, m1_rows, m2_rows = ctx.saved_tensors
        m1, m2 = ctx.scalars
        needs = [bool(n) for n in ctx.needs_input_grad[:7]]
        grads = steered_linear_bwd_torch(grad, x, weight, delta_weight, lora_a, lora_b, m1_rows, m2_rows, m1, m2,
                                         needs)
        out = [g if need else None for g, need in zip(grads, needs)]
        return (*out, None, None, None, None, None)


def _validate(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2) -> None:
    """Every metadata check of :func:`steered_linear`, each error naming the argument. Written flat, since it runs
    on every call: the whole check costs about a µs (the goal: the op within 1.3x of the bare composition)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    xs = x.shape
    if not xs:
        raise ValueError("x must have at least one dimension [..., in]")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    dev, in_f = x.device, xs[-1]
    if weight is None:
        if bias is not None:
            raise ValueError("bias was given without weight: weight=None means no base layer")
        if delta_weight is None and lora_b is None and delta_bias is None:
            raise ValueError("weight=None (no base layer) needs an update: delta_weight, lora_a/lora_b or delta_bias")
        if lora_b is not None and not isinstance(lora_b, Tensor):
            raise TypeError(f"lora_b must be a torch.Tensor, got {type(lora_b).__name__}")
        out_f = _out_features(None, delta_weight, lora_b, delta_bias)
    else:
        check_tensor("weight", weight, ndim=2, like=x)
        out_f = weight.shape[0]
        if weight.shape[1] != in_f:
            raise ValueError(f"x has {in_f} input features (shape {tuple(xs)}) but weight has shape "
                             f"{tuple(weight.shape)} = [out, in] with in={weight.shape[1]}")
    if bias is not None:
        check_tensor("bias", bias, shape=(out_f,), like=x)
    if delta_bias is not None:
        check_tensor("delta_bias", delta_bias, shape=(out_f,), like=x)
    if delta_weight is not None:
        if lora_a is not None or lora_b is not None:
            raise ValueError("pass either delta_weight or the LoRA pair (lora_a, lora_b), not both")
        check_tensor("delta_weight", delta_weight, shape=(out_f, in_f), like=x)
    if (lora_a is None) != (lora_b is None):
        given, missing = ("lora_a", "lora_b") if lora_a is not None else ("lora_b", "lora_a")
        raise ValueError(f"{given} was given without {missing}: LoRA needs both")
    if lora_a is not None:
        check_tensor("lora_a", lora_a, ndim=2, like=x)
        check_tensor("lora_b", lora_b, ndim=2, like=x)
        r = lora_a.shape[0]
        if lora_a.shape[1] != in_f or lora_b.shape != (out_f, r):
            raise ValueError(f"LoRA shapes must be lora_a [r, in] and lora_b [out, r] with in={in_f}, "
                             f"out={out_f}; got lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    if type(m1) is not float or not math.isfinite(m1):  # a plain finite float is the common case: done
        check_multiplier("m1", m1, xs[:-1], dev)
    if m2 is not None:
        check_multiplier("m2", m2, xs[:-1], dev)


def steered_linear(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None, *,
                   delta_weight: Optional[Tensor] = None, lora_a: Optional[Tensor] = None,
                   lora_b: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   m1: Multiplier = 1.0, m2: Optional[Multiplier] = None, backend: str = "auto") -> Tensor:
    """Steered linear layer ``y = x·(W + m1·ΔW)ᵀ + (b + m2·Δb)``, fused.

    Shapes: ``x`` [..., in]; ``weight``, ``delta_weight`` [out, in]; ``bias``, ``delta_bias`` [out];
    ``lora_a`` [r, in] and ``lora_b`` [out, r] (peft's layout: peft's output is this op with
    ``m1 = lora_alpha / r``). ΔW is ``delta_weight`` or ``lora_b @ lora_a``; it is never formed, nor is
    ``W + m1·ΔW`` or any per-row weight copy.

    ``m1``/``m2`` are floats or tensors whose shape is a prefix of ``x.shape[:-1]`` ([B] one factor per
    sequence, [B, T] one per token); ``m2=None`` means ``m2 = m1``. The factors are constants for
    autograd, except on ``backend="torch"``. ``backend`` is "torch", "triton", "native" or "auto"
    ("auto" follows the measured routing table, ``fastsplit.ops._routing``).

    ``weight=None`` means no base layer, only the update ``m1·ΔW·x + m2·Δb`` (the residual-stream site
    adds it to the stream itself); it runs on the torch backend.

    No host synchronisation: a NaN/inf multiplier is an error on CPU tensors always and on CUDA tensors with
    ``fastsplit.set_debug(True)`` (the check reads the values); shapes, dtypes and devices are always checked.

    Returns [..., out]. Differentiable in ``x`` and every tensor argument that requires grad.

    Example::

        >>> x = torch.randn(2, 5, 16)
        >>> W = torch.randn(8, 16)
        >>> v = torch.randn(8)
        >>> y = steered_linear(x, W, delta_bias=v, m1=torch.tensor([0.0, 4.0]))  # two strengths
        >>> torch.allclose(y[0], x[0] @ W.T)
        True
    """
    _validate(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2)
    if weight is None:
        if backend not in ("auto", "torch"):
            _backend.resolve(backend, x.device)  # an unknown or unavailable name still gets its own error
            raise ValueError(f"weight=None (no base layer) runs on the torch backend, not backend={backend!r}")
        return steered_linear_ref(x, None, bias, delta_weight=delta_weight, lora_a=lora_a, lora_b=lora_b,
                                  delta_bias=delta_bias, m1=m1, m2=m2)
    if backend == "native":
        raise ValueError("steered_linear has no native kernel: the CUDA decode kernel lost to cuBLAS on every "
                         "measured shape and was removed; use backend='auto', 'torch' or 'triton' (the decode kernel)")
    if backend != "torch" and backend != "auto":  # an explicit kernel that cannot run (or an unknown name) raises
        _backend.resolve(backend, x.device, needs_autograd_m=_m_grad(m1, m2))
    if not isinstance(m1, Tensor) and m1 == 0 and (m2 is None or (not isinstance(m2, Tensor) and m2 == 0)):
        # m = 0 is exactly the base layer, on every backend.
        deltas = (delta_weight, lora_a, lora_b, delta_bias)
        if not (torch.is_grad_enabled() and any(d is not None and d.requires_grad for d in deltas)):
            return F.linear(x, weight, bias)
        route = _STATIC  # base output + 0·update: exact, and the deltas still get their (zero) grads
    elif backend == "auto" and (x.is_cuda or (_env._tune and x.is_cpu)):  # where auto may measure: CUDA, or the
        # CPU with FASTSPLIT_TUNE=1
        route = _auto_route(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2)
    elif backend == "triton":
        route = _TRITON
    else:
        route = _STATIC  # the common CPU call: the static rules, nothing to consult
    if route[0] == "torch" or x.numel() == 0:
        return steered_linear_torch(x, weight, bias, delta_weight=delta_weight, lora_a=lora_a,
                                    lora_b=lora_b, delta_bias=delta_bias, m1=m1, m2=m2, fold=route[1],
                                    rank_db=route[2])
    return _triton(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2, route[3])


def _triton(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2, config) -> Tensor:
    """The decode kernel through its autograd Function (``config``: an index into its config list, or None)."""
    m2 = m1 if m2 is None else m2
    lead = tuple(x.shape[:-1])
    rows1, rows2 = multiplier_rows(m1, lead), multiplier_rows(m2, lead)
    s1 = 0.0 if rows1 is not None else float(m1)
    s2 = 0.0 if rows2 is not None else float(m2)
    x2 = x.reshape(-1, x.shape[-1])
    y = SteeredLinearFunction.apply(x2, weight, bias, delta_weight, lora_a, lora_b, delta_bias,
                                    rows1, rows2, s1, s2, config)
    return y.reshape(*lead, weight.shape[0])


# --- backend="auto": routes -----------------------------------------------------------------------------------------
# A route is (backend, fold, rank_db, triton config); its name is what the tuner's cache holds.
_STATIC = ("torch", None, None, None)
_TRITON = ("triton", None, None, None)
_ROUTES = {"torch": _STATIC, "torch:fold": ("torch", True, None, None), "torch:two_gemm": ("torch", False, None, None),
           "torch:rank_db": ("torch", None, True, None), "torch:add_db": ("torch", None, False, None),
           "triton": _TRITON}


def _parse_route(name: str) -> tuple:
    """A route's name as the tuple the dispatch reads; a name this install does not know runs the static path."""
    if name.startswith("triton:cfg"):
        try:
            return ("triton", None, None, int(name[len("triton:cfg"):]))
        except ValueError:
            return _STATIC
    return _ROUTES.get(name, _STATIC)


def _m_grad(m1, m2) -> bool:
    return (isinstance(m1, Tensor) and m1.requires_grad) or (isinstance(m2, Tensor) and m2.requires_grad)


def _form(delta_weight, lora_a) -> str:
    return "local_weight" if delta_weight is not None else "lora" if lora_a is not None else "vector"


def _mkind(m1) -> str:
    return "scalar" if not isinstance(m1, Tensor) else "per_row" if m1.dim() <= 1 else "per_token"


def _auto_route(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2) -> tuple:
    """The route of ``backend="auto"`` where it may be measured (CUDA, or FASTSPLIT_TUNE=1): the tuner's memory
    (one dict lookup), else its disk cache, else a measurement, else the static routing (``_backend.resolve``).
    The hit path runs on every call, so it is written flat (bench/bench_overhead.py: the cost of a hit)."""
    if _env._tune is False:  # FASTSPLIT_TUNE=0: the static table decides
        return _static_route(x, weight, delta_weight, lora_a, m1)
    key = tune_key(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2)
    if key is None:  # m requires grad: only the torch path differentiates it
        return _STATIC
    hit = _tune.TUNER.memory.get(key)
    if hit is not None:
        return hit
    if torch.compiler.is_compiling() or not _env.tuning(x.device.type):  # nothing to trace but the static rule
        return _static_route(x, weight, delta_weight, lora_a, m1)
    args = (x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2, key[8])
    static = "triton" if _static_route(x, weight, delta_weight, lora_a, m1) is _TRITON else "torch"
    return _tune.TUNER.route(key, x.device, lambda: _candidates(*args), static, parse=_parse_route,
                             text=tune_key_text)


def _static_route(x, weight, delta_weight, lora_a, m1) -> tuple:
    if not x.is_cuda:
        return _STATIC
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    routed = _backend.resolve("auto", x.device, form=_form(delta_weight, lora_a), mkind=_mkind(m1), rows=rows)
    return _TRITON if routed == "triton" else _STATIC


_FORMS = ("vector", "lora", "local_weight")
_MKINDS = ("scalar", "per_row", "per_token")


def tune_key(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2=None) -> Optional[tuple]:
    """The tuner's key of a call: form, m kind, the size classes of rows, K and N (bit lengths: powers of two), dtype,
    LoRA's rank, Δb or not, autograd on or not, the device index (-1: the CPU); None when a multiplier requires grad.
    Plain values read from metadata (x and weight share dtype, device and K: ``_validate`` saw to it), so building and
    hashing it costs about a microsecond; :func:`tune_key_text` spells it out for the cache file."""
    t = type(m1)
    if t is float or t is int:
        mkind = 0
    elif m1.requires_grad:
        return None
    else:
        mkind = 1 if m1.dim() <= 1 else 2
    if m2 is not None and type(m2) is not float and type(m2) is not int and m2.requires_grad:
        return None
    N, K = weight.shape
    rows = x.numel() // K if K else 0
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
        bias is not None and bias.requires_grad) or (delta_weight is not None and delta_weight.requires_grad) or (
        lora_a is not None and (lora_a.requires_grad or lora_b.requires_grad)) or (
        delta_bias is not None and delta_bias.requires_grad))
    return (2 if delta_weight is not None else 1 if lora_a is not None else 0, mkind, (rows - 1).bit_length(),
            x.dtype, (K - 1).bit_length(), (N - 1).bit_length(), lora_a.shape[0] if lora_a is not None else 0,
            delta_bias is not None, grad, x.get_device())


def tune_key_text(key: tuple) -> str:
    """A key as the cache file writes it: ``steered_linear|local_weight|scalar|rows<=64|float32|K<=2048|...``."""
    form, mkind, rows, dtype, k, n, r, db, grad, device = key
    return "|".join(["steered_linear", _FORMS[form], _MKINDS[mkind], f"rows<={1 << rows}", str(dtype)[6:],
                     f"K<={1 << k}", f"N<={1 << n}", f"r={r}", "db" if db else "no-db",
                     "grad" if grad else "no-grad", "cpu" if device < 0 else f"cuda:{device}"])


def _spilling_refusals(M, N, K, x, has_dw, m1_rows, rank) -> dict:
    """{candidate name: why it is refused} for the decode kernel's configs that spill registers on this device's
    target (the spill table of ``check_targets``): recorded with the tuner's refusals, never run."""
    from ..kernels import steered_linear as k

    flags, _, _ = k.variant(M, N, K, x.dtype, has_dw=has_dw, m1_rows=m1_rows, has_lora=rank > 0, rank=rank,
                            has_bias=True, has_dbias=True, m2_rows=m1_rows, sm_count=k._sm_count(x.device))
    target = k._common.device_target(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return {f"triton:cfg{i}": f"spills {n} B of registers on {target} (python -m fastsplit.kernels.check_targets)"
            for i, n in sorted(k.spilling_configs(flags, M, x.dtype, x.device).items())}


def _refuse(reason: str):
    def run():
        raise RuntimeError(reason)
    return run


def _candidates(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2, grad):
    """Every way this call can run (the torch compositions and their real alternatives; the decode kernel at each
    fitting config, at decode row counts on CUDA) and the float64 check on sampled rows and columns."""
    from ._routing import DECODE_ROWS

    lead, K, N = tuple(x.shape[:-1]), x.shape[-1], weight.shape[0]
    M = x.numel() // K
    m2v = m1 if m2 is None else m2
    names, spilling = ["torch"], {}
    if delta_weight is not None and not isinstance(m1, Tensor):
        names = ["torch:fold", "torch:two_gemm"]
    elif lora_a is not None and delta_bias is not None and isinstance(m2v, Tensor):
        names = ["torch:rank_db", "torch:add_db"]
    if x.is_cuda and M <= DECODE_ROWS and _backend._triton_refusal(x.device) is None:
        from ..kernels.steered_linear import fitting_configs

        r = lora_a.shape[0] if lora_a is not None else 0
        configs = fitting_configs(M, N, K, x.dtype, x.device, has_dw=delta_weight is not None,
                                  m1_rows=isinstance(m1, Tensor), rank=r)
        names += ["triton" if c is None else f"triton:cfg{c}" for c in configs]
        spilling = _spilling_refusals(M, N, K, x, delta_weight is not None, isinstance(m1, Tensor), r)
    tensors = {"x": x, "weight": weight, "bias": bias, "delta_weight": delta_weight, "lora_a": lora_a,
               "lora_b": lora_b, "delta_bias": delta_bias}
    needs = [k for k, t in tensors.items() if grad and t is not None and t.requires_grad]
    R, C = _tune.sample_rows(M), _tune.sample_cols(N)
    Ri, Ci = torch.tensor(R, device=x.device), torch.tensor(C, device=x.device)
    upstream = None
    if needs:  # an upstream gradient on the sampled rows and columns only: every gradient is then checkable
        gen = torch.Generator(device=x.device).manual_seed(0)
        upstream = torch.zeros(M, N, device=x.device, dtype=x.dtype)
        upstream[Ri[:, None], Ci[None, :]] = torch.randn(len(R), len(C), device=x.device, generator=gen).to(x.dtype)

    def runner(name):
        route = _parse_route(name)

        def run():
            with torch.set_grad_enabled(bool(needs)):
                if route[0] == "torch":
                    y = steered_linear_torch(x, weight, bias, delta_weight=delta_weight, lora_a=lora_a, lora_b=lora_b,
                                             delta_bias=delta_bias, m1=m1, m2=m2, fold=route[1], rank_db=route[2])
                else:
                    y = _triton(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2, route[3])
                if not needs:
                    return (y,)
                grads = torch.autograd.grad(y, [tensors[k] for k in needs], upstream.view(y.shape))
                return (y.detach(), *grads)
        return run

    def sample(out):
        parts = [out[0].reshape(M, N)[Ri][:, Ci]]
        for k, g in zip(needs, out[1:]):
            parts.append({"x": lambda: g.reshape(M, K)[Ri], "lora_a": lambda: g}.get(k, lambda: g[Ci])())
        return parts

    with torch.enable_grad():
        leaf = lambda t, rows=None: None if t is None else (t if rows is None else t[rows]).detach().double() \
            .requires_grad_(t.requires_grad and grad)
        ref_in = {"x": leaf(x.reshape(M, K), Ri), "weight": leaf(weight, Ci), "bias": leaf(bias, Ci),
                  "delta_weight": leaf(delta_weight, Ci), "lora_a": leaf(lora_a), "lora_b": leaf(lora_b, Ci),
                  "delta_bias": leaf(delta_bias, Ci)}
        rows = lambda m: m if not isinstance(m, Tensor) else multiplier_rows(m, lead)[Ri].double()
        y = steered_linear_ref(ref_in["x"], ref_in["weight"], ref_in["bias"], delta_weight=ref_in["delta_weight"],
                               lora_a=ref_in["lora_a"], lora_b=ref_in["lora_b"], delta_bias=ref_in["delta_bias"],
                               m1=rows(m1), m2=None if m2 is None else rows(m2))
        reference = [y.detach()]
        if needs:
            reference += torch.autograd.grad(y, [ref_in[k] for k in needs], upstream[Ri][:, Ci].double())
    candidates = [_tune.Candidate(n, runner(n), torch_path=n.startswith("torch")) for n in names]
    candidates += [_tune.Candidate(n, _refuse(reason)) for n, reason in spilling.items()]
    return candidates, _tune.Check(sample, reference)
