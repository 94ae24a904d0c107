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

from . import _backend
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
                         m1: Multiplier = 1.0, m2: Optional[Multiplier] = None) -> Tensor:
    """The torch backend: the same result as :func:`steered_linear_ref` in the fewest launches and bytes that
    torch ops allow (cuBLAS on a GPU), differentiable by autograd (m included). No input checks.

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
    fold = (delta_weight is not None and not row1
            and x2.shape[0] >= fold_rows(x.device, weight.numel() * weight.element_size()))
    # y [M, N] is the base of every in-place update below (an in-place op on a view of a leaf that needs no grad,
    # followed by another, would trip autograd when only the deltas require grad).
    y = F.linear(x2, torch.add(weight, delta_weight, alpha=float(m1)) if fold else weight, b_eff)
    rank_db = delta_bias is not None and row2 and lora_a is not None  # a per-row Δb joins the rank product
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
                m2: float):
        from ..kernels import steered_linear as k

        args = (x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1_rows, m2_rows, m1, m2)
        # Inside torch.compile the registered op (traceable); eagerly the launcher itself (no op dispatch).
        y = k.steered_linear_fwd(*args) if torch.compiler.is_compiling() else k.launch_fwd(*args)
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
        return (*out, None, None, None, None)


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
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        chosen = "torch"  # the common CPU call: no routing to consult
    else:
        m_grad = (isinstance(m1, Tensor) and m1.requires_grad) or (isinstance(m2, Tensor) and m2.requires_grad)
        form = "local_weight" if delta_weight is not None else "lora" if lora_a is not None else "vector"
        mkind = "scalar" if not isinstance(m1, Tensor) else "per_row" if m1.dim() <= 1 else "per_token"
        chosen = _backend.resolve(backend, x.device, needs_autograd_m=m_grad, form=form, mkind=mkind,
                                  rows=x.numel() // max(x.shape[-1], 1))
    if not isinstance(m1, Tensor) and m1 == 0 and (m2 is None or (not isinstance(m2, Tensor) and m2 == 0)):
        # m = 0 is exactly the base layer, on every backend.
        deltas = (delta_weight, lora_a, lora_b, delta_bias)
        if not (torch.is_grad_enabled() and any(d is not None and d.requires_grad for d in deltas)):
            return F.linear(x, weight, bias)
        chosen = "torch"  # base output + 0·update: exact, and the deltas still get their (zero) grads
    if chosen == "torch" or x.numel() == 0:
        return steered_linear_torch(x, weight, bias, delta_weight=delta_weight, lora_a=lora_a,
                                    lora_b=lora_b, delta_bias=delta_bias, m1=m1, m2=m2)
    m2 = m1 if m2 is None else m2
    lead = tuple(x.shape[:-1])
    rows1, rows2 = multiplier_rows(m1, lead), multiplier_rows(m2, lead)
    s1 = 0.0 if rows1 is not None else float(m1)
    s2 = 0.0 if rows2 is not None else float(m2)
    x2 = x.reshape(-1, x.shape[-1])
    y = SteeredLinearFunction.apply(x2, weight, bias, delta_weight, lora_a, lora_b, delta_bias,
                                    rows1, rows2, s1, s2)
    return y.reshape(*lead, weight.shape[0])
