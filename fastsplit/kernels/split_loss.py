"""The SPLIT loss's fused elementwise pass (Triton) between two cuBLAS GEMMs, one chunk of token rows at a time.

Per chunk of C rows of one side (``fastsplit.ops._chunks.fused_chunk_rows`` sizes C by bytes):

1. ``z = h·Wᵀ (+ b)`` [C, V] in h's dtype: one cuBLAS GEMM (``torch.addmm`` / ``torch.mm``).
2. ``_split_fused_kernel``, one program per row: a sweep over the row keeps an online max and Σexp in fp32
   (soft-capping ``c·tanh(z/c)`` applied on the fly), giving the row's log-sum-exp; the target logit is one load;
   a second sweep writes ``(softmax − onehot)·cap′`` over z *in place*, in z's dtype. NLL and lse go out per row.
3. ``dH = G·W`` [C, H]: one cuBLAS GEMM (``torch.mm(..., out=)`` into the side's dH), h's dtype.

Why this shape (the issue's floor): the arithmetic is the two GEMMs, 4·C·V·H FLOPs a chunk; the SPLIT
coefficients are per side (per pair), so dH is scaled after the hinge is known, never by a third GEMM. What is
left is bytes: z is written by the GEMM, read twice and written once by the pass, and read by the dH GEMM —
5·C·V·es bytes against 4·C·V·H FLOPs, 2.5/H bytes per FLOP: at H 3584 that is 13% of an H200's bandwidth at
the GEMMs' 790 TFLOP/s, the cost of never holding the logits. The previous Triton kernels (logits and dH inside
Triton, fp32 workspace) ran at 80–191 TFLOP/s against cuBLAS's 580 and were removed.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._env import triton_interpreting

_INTERPRET = triton_interpreting()
BLOCK_V = 256 if _INTERPRET else 1024  # elements of a row per step: 2 KB of bf16 per load, 8 warps' worth
NUM_WARPS = 8


@triton.jit
def _capped(z, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        # c·tanh(z/c), with tanh from exp: tl has no portable tanh across Triton 3.6–3.9.
        e = tl.exp(-2.0 * tl.abs(z / softcap))
        z = softcap * tl.where(z >= 0, 1.0, -1.0) * (1.0 - e) / (1.0 + e)
    return z


@triton.jit
def _split_fused_kernel(Z, TGT, NLL, LSE, V, stride_z, softcap,
                        SOFTCAP: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    offs = tl.arange(0, BLOCK_V)
    # Sweep 1: per-lane online max and Σexp (fp32), merged across lanes at the end. The running max starts
    # finite, so a lane that has only seen padding (-inf) adds exp(-inf) = 0, never exp(nan).
    run_max = tl.full((BLOCK_V,), -3.0e38, tl.float32)
    run_sum = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask = offs < V - v0
        z = _capped(tl.load(z_row + v0 + offs, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        z = tl.where(mask, z, float("-inf"))  # after the cap: c·tanh(-inf/c) would be -c, not -inf
        new_max = tl.maximum(run_max, z)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(z - new_max)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    lse = top + tl.log(tl.sum(run_sum * tl.exp(run_max - top), axis=0))
    tgt = tl.load(TGT + row)
    z_t = _capped(tl.load(z_row + tgt).to(tl.float32), softcap, SOFTCAP)
    tl.store(NLL + row, lse - z_t)
    tl.store(LSE + row, lse)
    if NEED_GRAD:
        # Sweep 2: dlogits = (softmax − onehot)·cap′, written over the logits (the dH GEMM reads it next).
        # All loads of sweep 2 come after the target logit's load above: the in-place writes cannot race it.
        for v0 in range(0, V, BLOCK_V):
            mask = offs < V - v0
            z = _capped(tl.load(z_row + v0 + offs, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
            g = tl.exp(z - lse) - tl.where(offs + v0 == tgt, 1.0, 0.0)
            if SOFTCAP:
                t = z / softcap
                g = g * (1.0 - t * t)  # d(c·tanh(x/c))/dx from the capped value
            tl.store(z_row + v0 + offs, g.to(Z.dtype.element_ty), mask=mask)


def launch_fused(z: Tensor, tgt: Tensor, nll: Tensor, lse: Tensor, softcap: Optional[float], need_grad: bool, *,
                 traced: bool = False) -> None:
    """The fused pass over a logits chunk ``z`` [C, V] (row-contiguous): writes ``nll``/``lse`` [C] (fp32) and,
    with ``need_grad``, the gradient over ``z`` in place. ``tgt`` [C] int64 in [0, V)."""
    C, V = z.shape
    if C == 0:
        return
    kernel = wrap_triton(_split_fused_kernel) if traced else _split_fused_kernel
    kernel[(C,)](z, tgt, nll, lse, V, z.stride(0), float(softcap or 1.0), SOFTCAP=softcap is not None,
                 NEED_GRAD=need_grad, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)


def fused_split_fwd(h: Tensor, tgt: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
                    need_dh: bool, chunk_rows: int, *, traced: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The launcher on plain tensors: ``h`` [N, H] rows, ``tgt`` [N] in [0, V), ``weight`` [V, H].

    Returns (nll [N] fp32, lse [N] fp32, dH [N, H] in h's dtype, or an empty tensor), holding one
    [chunk_rows, V] logits chunk in h's dtype at a time.
    """
    N, H = h.shape
    V = weight.shape[0]
    dev = h.device
    chunk = max(1, min(chunk_rows, N))
    w_t = weight.t()
    if traced:  # inside torch.compile: fresh tensors per chunk and one concatenation, no writes into views
        parts = []
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z = torch.addmm(bias, h[s:e], w_t) if bias is not None else torch.mm(h[s:e], w_t)
            nll_c = torch.empty(e - s, device=dev, dtype=torch.float32)
            lse_c = torch.empty(e - s, device=dev, dtype=torch.float32)
            launch_fused(z, tgt[s:e].contiguous(), nll_c, lse_c, softcap, need_dh, traced=True)
            parts.append((nll_c, lse_c, torch.mm(z, weight) if need_dh else None))
        if not parts:
            parts = [(h.new_empty(0, dtype=torch.float32), h.new_empty(0, dtype=torch.float32), h.new_empty(0, H))]
        dh = torch.cat([p[2] for p in parts]) if need_dh else h.new_empty(0)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), dh
    nll = torch.empty(N, device=dev, dtype=torch.float32)
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    dh = torch.empty((N, H) if need_dh else (0,), device=dev, dtype=h.dtype)
    if N == 0:
        return nll, lse, dh
    z_buf = torch.empty((chunk, V), device=dev, dtype=h.dtype)  # the one logits chunk, reused
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        z = z_buf[: e - s]
        if bias is not None:
            torch.addmm(bias, h[s:e], w_t, out=z)
        else:
            torch.mm(h[s:e], w_t, out=z)
        launch_fused(z, tgt[s:e], nll[s:e], lse[s:e], softcap, need_dh)
        if need_dh:
            torch.mm(z, weight, out=dh[s:e])
    return nll, lse, dh


@triton_op("fastsplit::split_loss_fused_fwd", mutates_args={})
def split_loss_fwd(h: Tensor, tgt: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: Optional[float],
                   need_dh: bool, chunk_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fused_split_fwd` as a torch.library op (what ``torch.compile`` traces)."""
    return fused_split_fwd(h, tgt, weight, bias, softcap, need_dh, chunk_rows, traced=True)
