"""Triton kernels and launchers for the steered linear update ``y = x(W + m1·ΔW)ᵀ + b + m2·Δb``.

Two kernels:

* ``_steered_linear_fwd_kernel`` computes ``Y = X·Wᵀ (+ m1⊙X·ΔWᵀ | + (m1⊙X·Aᵀ)·Bᵀ) + b + m2⊙Δb``
  in one pass over K; LoRA's skinny rank product m1⊙(X·Aᵀ) [M, r] is computed before the launch and
  enters as one epilogue dot. It is also the ``dx`` kernel of the backward pass: with W, ΔW, A and B
  passed through transposed strides it computes ``dx = g·W + m1⊙g·ΔW`` or ``g·W + (m1⊙g·B)·A``.
* ``_steered_linear_bwd_kernel`` computes the weight gradients ``dW = gᵀx`` and
  ``dΔW = (m1⊙g)ᵀx`` in one pass over the rows, reading g and x once for both.

The launchers ``steered_linear_fwd`` / ``steered_linear_bwd`` take and return plain tensors on
2-D ``x`` [M, K]; they are registered with ``torch.library.triton_op`` so torch.compile sees
through them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .._env import triton_interpreting
from ._common import bucket, elem_bytes, launch, pruner, use_fixed

_INTERPRET = triton_interpreting()


def gpu_fwd_configs() -> list[triton.Config]:
    """The product kernel's autotune space on a GPU (pruned per launch by shared memory)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
                                     (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3),
                                     (128, 128, 32, 4, 3), (64, 64, 64, 4, 3),
                                     (16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4),
                                     (16, 64, 64, 4, 3), (64, 64, 32, 4, 3), (64, 64, 32, 4, 2)]]


def gpu_bwd_configs() -> list[triton.Config]:
    """The weight-gradient kernel's autotune space on a GPU."""
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bn, bk, bm, w, s in [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
                                     (128, 256, 64, 8, 3), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3)]]


def _fwd_configs():
    if _INTERPRET:  # big tiles keep the interpreter's Python loop short
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8})]
    return gpu_fwd_configs()


def _bwd_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 64})]
    return gpu_bwd_configs()


# One config per shape class under FASTSPLIT_FIXED_CONFIGS (tests): small enough to fit every budget in
# fp32 with all operands (checked by tests/ops/test_configs.py), so correctness runs never autotune.
FIXED_FWD = {"decode": triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                                     num_stages=2),
             "prefill": triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4,
                                      num_stages=2)}
FIXED_BWD = {"any": triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 32}, num_warps=4, num_stages=2)}


def fwd_footprint(es: int, *, has_dw: bool, has_lora: bool, block_r: int):
    """Shared memory of the product kernel: pipelined x, W (and ΔW) tiles, plus the LoRA epilogue operands.
    ΔW counts even when folded: its tile is loaded and pipelined like W's."""
    n_b = 2 if has_dw else 1

    def need(c):
        main = c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] + n_b * c["BLOCK_K"] * c["BLOCK_N"]) * es
        epi = (c["BLOCK_M"] * block_r + block_r * c["BLOCK_N"]) * es if has_lora else 0
        return main + epi

    return need


def bwd_footprint(es: int, *, per_row_dw: bool):
    """Shared memory of the weight-gradient kernel: pipelined gᵀ and x tiles, plus the m1-scaled gᵀ operand."""

    def need(c):
        main = c["num_stages"] * (c["BLOCK_N"] * c["BLOCK_M"] + c["BLOCK_M"] * c["BLOCK_K"]) * es
        return main + (c["BLOCK_N"] * c["BLOCK_M"] * es if per_row_dw else 0)

    return need


def _fwd_prune(named, kw):
    return fwd_footprint(elem_bytes(named["X"]), has_dw=kw["HAS_DW"], has_lora=kw["HAS_LORA"], block_r=kw["BLOCK_R"])


def _bwd_prune(named, kw):
    return bwd_footprint(elem_bytes(named["X"]), per_row_dw=kw["NEED_DW"] and kw["M1_ROWS"])


@triton.autotune(configs=_fwd_configs(), key=["M_BUCKET", "N", "K", "R"], prune_configs_by=pruner(_fwd_prune))
@triton.jit
def _steered_linear_fwd_kernel(
    X, W, DW, XA, LB, BIAS, DBIAS, M1, M2, Y,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dwn, stride_dwk,
    stride_xam, stride_xar, stride_lbn, stride_lbr, stride_ym, stride_yn,
    m1_scalar, m2_scalar,
    M_BUCKET: tl.constexpr,
    HAS_DW: tl.constexpr, FOLD_DW: tl.constexpr, HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, M1_ROWS: tl.constexpr, M2_ROWS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: neighbouring programs share W tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % width) % group_m)
    pid_n = (pid % width) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DW:
        dw_ptrs = DW + offs_k[:, None] * stride_dwk + offs_n[None, :] * stride_dwn
        if not FOLD_DW:
            acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if HAS_DW:
            dw = tl.load(dw_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if FOLD_DW:
                # One scalar m: fold ΔW into the loaded tile, so it is one GEMM, not two.
                w = (w.to(tl.float32) + m1_scalar * dw.to(tl.float32)).to(x.dtype)
            else:
                acc_d = tl.dot(x, dw, acc_d, input_precision="ieee" if IEEE else None)
            dw_ptrs += BLOCK_K * stride_dwk
        acc = tl.dot(x, w, acc, input_precision="ieee" if IEEE else None)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_DW and not FOLD_DW:
        if M1_ROWS:
            m1 = tl.load(M1 + offs_m, mask=mask_m, other=0.0)[:, None]
        else:
            m1 = m1_scalar
        acc += m1 * acc_d
    if HAS_LORA:
        # The rank-r product m1⊙(x·Aᵀ) [M, r] comes in precomputed (XA): a [BLOCK_K, BLOCK_R] rank tile
        # inside the K loop, with BLOCK_R as small as 16, is the tl.dot operand that compute-sanitizer
        # caught reading past its shared-memory buffer on an H100; here the rank tile is only the K side
        # of one epilogue dot, a standard shape.
        offs_r = tl.arange(0, BLOCK_R)
        xa = tl.load(XA + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=mask_m[:, None] & (offs_r < R)[None, :], other=0.0)
        lb = tl.load(LB + offs_r[:, None] * stride_lbr + offs_n[None, :] * stride_lbn,
                     mask=(offs_r < R)[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xa.to(lb.dtype), lb, acc, input_precision="ieee" if IEEE else None)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_DBIAS:
        if M2_ROWS:
            m2 = tl.load(M2 + offs_m, mask=mask_m, other=0.0)[:, None]
        else:
            m2 = m2_scalar
        acc += m2 * tl.load(DBIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=_bwd_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by=pruner(_bwd_prune))
@triton.jit
def _steered_linear_bwd_kernel(
    G, X, M1, DW_OUT, DDW_OUT,
    M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk,
    stride_om, stride_ok, stride_dom, stride_dok,
    m1_scalar,
    M_BUCKET: tl.constexpr,
    NEED_W: tl.constexpr, NEED_DW: tl.constexpr, M1_ROWS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # dW[n, k] = Σ_m g[m, n]·x[m, k] and dΔW[n, k] = Σ_m m1[m]·g[m, n]·x[m, k]:
    # both from the same g and x tiles, so each is read once.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_k = offs_k < K
    g_ptrs = G + offs_n[:, None] * stride_gn + offs_m[None, :] * stride_gm  # gᵀ tile [BN, BM]
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    acc_w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        mask_m = offs_m < M - m0
        gt = tl.load(g_ptrs, mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if NEED_W or not M1_ROWS:
            acc_w = tl.dot(gt, x, acc_w, input_precision="ieee" if IEEE else None)
        if NEED_DW and M1_ROWS:
            m1 = tl.load(M1 + m0 + offs_m, mask=mask_m, other=0.0)
            gm = (gt.to(tl.float32) * m1[None, :]).to(x.dtype)
            acc_d = tl.dot(gm, x, acc_d, input_precision="ieee" if IEEE else None)
        g_ptrs += BLOCK_M * stride_gm
        x_ptrs += BLOCK_M * stride_xm
    out_mask = mask_n[:, None] & mask_k[None, :]
    if NEED_W:
        tl.store(DW_OUT + offs_n[:, None] * stride_om + offs_k[None, :] * stride_ok,
                 acc_w.to(DW_OUT.dtype.element_ty), mask=out_mask)
    if NEED_DW:
        if not M1_ROWS:
            acc_d = acc_w * m1_scalar
        tl.store(DDW_OUT + offs_n[:, None] * stride_dom + offs_k[None, :] * stride_dok,
                 acc_d.to(DDW_OUT.dtype.element_ty), mask=out_mask)


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))  # tl.dot needs every dim >= 16


def _launch_product(x, w, w_t, dw, xa, lb, lb_t, bias, dbias, m1_rows, m2_rows, m1, m2, y):
    """Launch the fused product on ``x`` [M, K] -> ``y`` [M, N].

    ``w``/``dw`` are read as [N, K] through ``w_t`` strides ``(s_n, s_k, ΔW s_n, ΔW s_k)``; ``xa`` is the
    rank path m1⊙(x·Aᵀ) [M, r] (fp32) and ``lb`` is read as [N, r] through ``lb_t = (s_n, s_r)``. Passing
    transposed strides turns the forward into the dx kernel.
    """
    M, K = x.shape
    N = y.shape[1]
    has_lora = xa is not None
    R = xa.shape[1] if has_lora else 0
    dummy = y  # never read: the constexpr flags switch those loads off
    flags = dict(M_BUCKET=bucket(M), HAS_DW=dw is not None, FOLD_DW=dw is not None and m1_rows is None,
                 HAS_LORA=has_lora, HAS_BIAS=bias is not None, HAS_DBIAS=dbias is not None,
                 M1_ROWS=m1_rows is not None, M2_ROWS=m2_rows is not None,
                 IEEE=x.dtype == torch.float32, BLOCK_R=_rank_block(R))
    args = (x, w, dw if dw is not None else dummy, xa if has_lora else dummy, lb if has_lora else dummy,
            bias if bias is not None else dummy, dbias if dbias is not None else dummy,
            m1_rows if m1_rows is not None else dummy, m2_rows if m2_rows is not None else dummy, y,
            M, N, K, R,
            x.stride(0), x.stride(1), w_t[0], w_t[1], *(w_t[2:4] if dw is not None else (0, 0)),
            *((xa.stride(0), xa.stride(1)) if has_lora else (0, 0)), *(lb_t if has_lora else (0, 0)),
            y.stride(0), y.stride(1), float(m1), float(m2))
    fixed = (FIXED_FWD["decode" if M <= 64 else "prefill"]) if use_fixed() else None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    launch(_steered_linear_fwd_kernel, grid, args, flags, fixed)
    return y


def _rank_rows(x: Tensor, a: Tensor, rows1) -> Tensor:
    """m1⊙(x·aᵀ) in fp32 [M, r]: the skinny rank-r product, by cuBLAS (or torch on the CPU)."""
    return (x @ a.t()).float() * rows1


@triton_op("fastsplit::steered_linear_fwd", mutates_args={})
def steered_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta_weight: Optional[Tensor],
                       lora_a: Optional[Tensor], lora_b: Optional[Tensor], delta_bias: Optional[Tensor],
                       m1_rows: Optional[Tensor], m2_rows: Optional[Tensor], m1: float, m2: float) -> Tensor:
    """Forward launcher: ``x`` [M, K], ``weight`` [N, K] -> ``y`` [M, N].

    ``m1_rows``/``m2_rows`` are fp32 [M] per-row factors, or None to use the scalars ``m1``/``m2``.
    """
    y = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
    dw = delta_weight
    rows1 = m1_rows[:, None] if m1_rows is not None else m1
    xa = _rank_rows(x, lora_a, rows1) if lora_a is not None else None
    return _launch_product(
        x, weight, (weight.stride(0), weight.stride(1), dw.stride(0) if dw is not None else 0,
                    dw.stride(1) if dw is not None else 0),
        dw, xa, lora_b, (lora_b.stride(0), lora_b.stride(1)) if lora_b is not None else None,
        bias, delta_bias, m1_rows, m2_rows, m1, m2, y)


@triton_op("fastsplit::steered_linear_bwd", mutates_args={})
def steered_linear_bwd(grad: Tensor, x: Tensor, weight: Tensor, delta_weight: Optional[Tensor],
                       lora_a: Optional[Tensor], lora_b: Optional[Tensor], m1_rows: Optional[Tensor],
                       m2_rows: Optional[Tensor], m1: float, m2: float, needs: list[bool]) -> list[Tensor]:
    """Backward launcher. ``grad`` [M, N], ``x`` [M, K].

    ``needs`` flags (x, weight, bias, delta_weight, lora_a, lora_b, delta_bias); the result
    holds the gradients in that order, with an empty tensor where a flag is False.
    """
    need_x, need_w, need_b, need_dw, need_a, need_lb, need_db = needs
    M, K = x.shape
    N = weight.shape[0]
    dx, dW, db, dDW, dA, dB, dDb = (grad.new_empty(0) for _ in range(7))  # distinct: outputs may not alias
    rows1 = m1_rows[:, None] if m1_rows is not None else m1  # [M, 1] or a float
    gb = _rank_rows(grad, lora_b.t(), rows1) if lora_b is not None and (need_x or need_a) else None  # m1⊙g·B

    if need_x:
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        dw = delta_weight
        _launch_product(
            grad, weight, (weight.stride(1), weight.stride(0), dw.stride(1) if dw is not None else 0,
                           dw.stride(0) if dw is not None else 0),
            dw, gb, lora_a, (lora_a.stride(1), lora_a.stride(0)) if lora_a is not None else None,
            None, None, m1_rows, None, m1, 0.0, dx)
    if need_w or need_dw:
        if need_w:
            dW = torch.empty_like(weight)
        if need_dw:
            dDW = torch.empty_like(delta_weight)
        args = (grad, x, m1_rows if m1_rows is not None else grad, dW if need_w else grad,
                dDW if need_dw else grad, M, N, K,
                grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
                dW.stride(0) if need_w else 0, dW.stride(1) if need_w else 0,
                dDW.stride(0) if need_dw else 0, dDW.stride(1) if need_dw else 0, float(m1))
        flags = dict(M_BUCKET=bucket(M), NEED_W=need_w, NEED_DW=need_dw, M1_ROWS=m1_rows is not None,
                     IEEE=x.dtype == torch.float32)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))
        launch(_steered_linear_bwd_kernel, grid, args, flags, FIXED_BWD["any"] if use_fixed() else None)
    if need_a:
        dA = gb.to(x.dtype).t() @ x  # the rank-r path is skinny ([M, r]): cuBLAS handles it well
    if need_lb:
        dB = grad.t() @ _rank_rows(x, lora_a, rows1).to(grad.dtype)
    if need_b:
        db = grad.sum(0, dtype=torch.float32).to(weight.dtype)
    if need_db:
        if m2_rows is not None:
            dDb = (m2_rows.to(grad.dtype) @ grad).to(weight.dtype)
        else:
            dDb = (grad.sum(0, dtype=torch.float32) * m2).to(weight.dtype)
    return [dx, dW, db, dDW, dA, dB, dDb]
