"""The steered linear op: ``y = x·(W + m1·ΔW)ᵀ + (b + m2·Δb)`` (arXiv 2602.02343, eq. 1).

Layers, top to bottom: ``steered_linear()`` (public, validates and dispatches) →
``SteeredLinearFunction`` (autograd) → the launchers of the chosen backend
(``fastsplit.kernels.steered_linear`` for Triton, ``fastsplit.native`` for the extension) →
the kernels. ``steered_linear_ref`` is the pure-torch reference: the CPU path, the test oracle
and the benchmark baseline.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from ._checks import (Multiplier, check_multiplier, check_tensor, expand_multiplier,
                      multiplier_rows)

__all__ = ["steered_linear", "steered_linear_ref", "SteeredLinearFunction"]


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


def _launchers(backend: str):
    if backend == "triton":
        from ..kernels import steered_linear as k

        return k.steered_linear_fwd, k.steered_linear_bwd
    from .. import native

    # The native extension is a forward (decode) kernel; its backward is the torch one (cuBLAS on a GPU).
    return native.steered_linear_fwd, steered_linear_bwd_torch


class SteeredLinearFunction(torch.autograd.Function):
    """Autograd over the fused launchers. ``x`` is [M, K]; m1/m2 rows are fp32 [M] or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta_weight, lora_a, lora_b, delta_bias,
                m1_rows, m2_rows, m1: float, m2: float, backend: str):
        fwd, _ = _launchers(backend)
        y = fwd(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1_rows, m2_rows, m1, m2)
        ctx.save_for_backward(x, weight, delta_weight, lora_a, lora_b, m1_rows, m2_rows)
        ctx.scalars = (m1, m2, backend)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, delta_weight, lora_a, lora_b, m1_rows, m2_rows = ctx.saved_tensors
        m1, m2, backend = ctx.scalars
        needs = [bool(n) for n in ctx.needs_input_grad[:7]]
        _, bwd = _launchers(backend)
        grads = bwd(grad, x, weight, delta_weight, lora_a, lora_b, m1_rows, m2_rows, m1, m2, needs)
        out = [g if need else None for g, need in zip(grads, needs)]
        return (*out, None, None, None, None, None)


def _validate(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1, m2) -> None:
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in]")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if weight is None:
        if bias is not None:
            raise ValueError("bias was given without weight: weight=None means no base layer")
        if delta_weight is None and lora_b is None and delta_bias is None:
            raise ValueError("weight=None (no base layer) needs an update: delta_weight, lora_a/lora_b or delta_bias")
        out_f, in_f = _out_features(None, delta_weight, lora_b, delta_bias), x.shape[-1]
    else:
        check_tensor("weight", weight, ndim=2, like=x)
        out_f, in_f = weight.shape
        if x.shape[-1] != in_f:
            raise ValueError(f"x has {x.shape[-1]} input features (shape {tuple(x.shape)}) but weight "
                             f"has shape {tuple(weight.shape)} = [out, in] with in={in_f}")
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
        if lora_a.shape[1] != in_f or tuple(lora_b.shape) != (out_f, r):
            raise ValueError(f"LoRA shapes must be lora_a [r, in] and lora_b [out, r] with in={in_f}, "
                             f"out={out_f}; got lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    lead = tuple(x.shape[:-1])
    check_multiplier("m1", m1, lead, x.device)
    if m2 is not None:
        check_multiplier("m2", m2, lead, x.device)


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

    No host synchronisation: value checks (NaN/inf multipliers) run only with ``fastsplit.set_debug(True)``.

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
    m_grad = any(isinstance(m, Tensor) and m.requires_grad for m in (m1, m2))
    form = "local_weight" if delta_weight is not None else "lora" if lora_a is not None else "vector"
    mkind = "scalar" if not isinstance(m1, Tensor) else "per_row" if m1.dim() <= 1 else "per_token"
    rows = x.numel() // max(x.shape[-1], 1)
    if weight is None:
        if backend not in ("auto", "torch"):
            _backend.resolve(backend, x.device)  # an unknown or unavailable name still gets its own error
            raise ValueError(f"weight=None (no base layer) runs on the torch backend, not backend={backend!r}")
        chosen = "torch"
    else:
        chosen = _backend.resolve(backend, x.device, needs_autograd_m=m_grad, form=form, mkind=mkind, rows=rows)
    if weight is not None and not isinstance(m1, Tensor) and m1 == 0 and \
            (m2 is None or (not isinstance(m2, Tensor) and m2 == 0)):
        # m = 0 is exactly the base layer, on every backend.
        deltas = (delta_weight, lora_a, lora_b, delta_bias)
        if not (torch.is_grad_enabled() and any(d is not None and d.requires_grad for d in deltas)):
            return F.linear(x, weight, bias)
        chosen = "torch"  # base output + 0·update: exact, and the deltas still get their (zero) grads
    if chosen == "torch" or x.numel() == 0:
        return steered_linear_ref(x, weight, bias, delta_weight=delta_weight, lora_a=lora_a,
                                  lora_b=lora_b, delta_bias=delta_bias, m1=m1, m2=m2)
    m2 = m1 if m2 is None else m2
    lead = tuple(x.shape[:-1])
    rows1, rows2 = multiplier_rows(m1, lead), multiplier_rows(m2, lead)
    s1 = 0.0 if rows1 is not None else float(m1)
    s2 = 0.0 if rows2 is not None else float(m2)
    x2 = x.reshape(-1, x.shape[-1])
    y = SteeredLinearFunction.apply(x2, weight, bias, delta_weight, lora_a, lora_b, delta_bias,
                                    rows1, rows2, s1, s2, chosen)
    return y.reshape(*lead, weight.shape[0])
