"""Triton decode kernel for the steered linear update ``y = x·(W + m1·ΔW)ᵀ + (b + m2·Δb)``: few rows, many weights.

Why a kernel of its own: at decode (1–16 rows, up to 64) the layer is bound by reading the weights, and eager
steering code reads them more than once (a per-row weight copy, a second GEMM for ΔW) or pays several launches.
Floors on one H200 for 3584→18944 in bf16 (W is 136 MB): reading W once at the 4.2 TB/s copy bandwidth takes 32 µs,
so the goal (80% of it) is 40 µs; local_weight streams W and ΔW, twice the bytes. The FLOPs (2·rows·N·K) are
nothing next to that, but at 16 rows they are too many for the CUDA cores to keep pace (2.2 GFLOP in 40 µs), so
the product runs on tensor cores: ``tl.dot`` on a row tile of 16.

How it streams the weights once:

* One program owns a tile of ``BLOCK_N`` output features and a slice of K, and loops over that slice in
  ``BLOCK_K`` steps: each step loads the [BLOCK_N, BLOCK_K] weight tile (K contiguous, so 16-byte vector loads)
  and the [BLOCK_M, BLOCK_K] tile of x (a few KB, from L2), and accumulates ``x·Wᵀ`` for *every* row at once.
  Rows beyond M are masked (a row tile of 16 costs no extra bytes: the weights dominate).
* **Split-K** where the output is narrow (18944→3584 has 56 feature tiles for 132 SMs): the launcher splits K
  so that there are about ``WAVES_PER_SM`` programs per SM; each split writes an fp32 partial [M, N] plane
  (rows·N·4 bytes, about 1% of the weights), and a small second kernel adds the planes in a fixed order
  (deterministic) and applies the epilogue. Without a split the epilogue runs in the main kernel: one launch.
* **Per-row m fused**: a scalar m1 folds ΔW into the loaded W tile (one product); per-row m1 keeps a second
  accumulator and scales it per row (``acc + m1⊙acc_Δ``) before the partial is written; LoRA's rank product
  ``m1⊙(x·Aᵀ)`` [M, r] comes in precomputed (one skinny cuBLAS call) and its ``·Bᵀ`` is one epilogue dot; the
  biases ``b + m2⊙Δb`` are added last.

The launcher ``steered_linear_fwd`` takes plain tensors (``x`` [M, K]) and is registered as the torch.library
op ``fastsplit::steered_linear_fwd`` (``torch.compile`` traces through it); eager calls skip the op dispatch.
The launch config is the first of ``gpu_configs()`` that fits the device's shared memory (one compile per variant,
the same config every run); ``FASTSPLIT_AUTOTUNE=1`` autotunes over the fitting ones instead (``_common.tuned``).
Backward runs on the torch backend's GEMMs (cuBLAS), for every backend.
"""
from __future__ import annotations

import functools
import json
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .._env import triton_interpreting
from . import _common

_INTERPRET = triton_interpreting()

WAVES_PER_SM = 4  # programs per SM the split aims for: enough loads in flight to cover HBM latency
K_ALIGN = 256  # each split's K slice is a multiple of the largest BLOCK_K, so every config divides it
MAX_SPLIT = 32
BLOCK_N_DECODE = 64


def gpu_configs() -> list[triton.Config]:
    """The decode kernel's configs in order of preference (BLOCK_N is the launcher's): the launch takes the first
    that fits the device's shared memory, or autotunes over all that fit with ``FASTSPLIT_AUTOTUNE=1``.

    Why this order: the kernel is bound by weight bytes in flight. (128, 4 warps, 4 stages) keeps 80 KB of bf16
    tiles in flight per program at 16 rows, so two programs share an SM (160 KB in flight, several times what
    HBM latency needs); the deeper and wider configs after it hold more per program; the shallow ones at the end
    are there so that fp32 and local_weight at 64 rows still find a config that fits."""
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bk, w, s in [(128, 4, 4), (256, 4, 3), (128, 4, 6), (256, 8, 4), (128, 8, 5), (64, 4, 6),
                             (256, 4, 5), (64, 2, 8), (128, 4, 3), (64, 4, 4), (64, 4, 3), (128, 4, 2), (64, 4, 2)]]


# One config under FASTSPLIT_FIXED_CONFIGS (the test suite): fits every budget in fp32 with both operands.
FIXED = triton.Config({"BLOCK_K": 64}, num_warps=4, num_stages=2)
INTERPRET_CONFIG = triton.Config({"BLOCK_K": 64})


# Shared memory Triton allocates beside the tiles: the pipeline's barriers. Compiled for sm_100 (Triton 3.9,
# python -m fastsplit.kernels.check_targets), a block whose tiles take 131072 B asked 131088 and one of 196608 asked
# 196640; 256 B covers that with room.
PIPELINE_BYTES = 256


def footprint(es: int, *, block_m: int, block_n: int, has_dw: bool, has_lora: bool, block_r: int):
    """Shared memory of the decode kernel as Triton's pipeliner allocates it: ``stages`` copies of the x tile and
    the W (and ΔW) tiles, plus the LoRA epilogue operands and the pipeline's barriers (``PIPELINE_BYTES``). Never
    below what Triton allocates on sm_80/90/100/120 (checked by ``check_targets``)."""
    n_w = 2 if has_dw else 1

    def need(c):
        main = c["num_stages"] * (block_m * c["BLOCK_K"] + n_w * block_n * c["BLOCK_K"]) * es
        return main + ((block_m * block_r + block_r * block_n) * 4 if has_lora else 0) + PIPELINE_BYTES

    return need


@triton.jit
def _epilogue(acc, offs_m, offs_n, mask_m, mask_n, XA, LB, BIAS, DBIAS, M2, R, stride_xam, stride_lbn, m2_scalar,
              HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, M2_ROWS: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """acc [BM, BN] fp32 (x·Wᵀ, ΔW already in) + (m1⊙x·Aᵀ)·Bᵀ + b + m2⊙Δb."""
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        xa = tl.load(XA + offs_m[:, None] * stride_xam + offs_r[None, :],
                     mask=mask_m[:, None] & (offs_r < R)[None, :], other=0.0)
        lb = tl.load(LB + offs_n[None, :] * stride_lbn + offs_r[:, None],
                     mask=(offs_r < R)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xa, lb, acc, input_precision="ieee")  # fp32 operands: the rank product is tiny
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_DBIAS:
        if M2_ROWS:
            m2 = tl.load(M2 + offs_m, mask=mask_m, other=0.0)[:, None]
        else:
            m2 = m2_scalar
        acc += m2 * tl.load(DBIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _steered_linear_fwd_kernel(
    X, W, DW, XA, LB, BIAS, DBIAS, M1, M2, Y, PART,
    M, N, K, R, K_PER_SPLIT,
    stride_xm, stride_wn, stride_dwn, stride_xam, stride_lbn, stride_ym,
    m1_scalar, m2_scalar,
    HAS_DW: tl.constexpr, FOLD_DW: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr, M1_ROWS: tl.constexpr, M2_ROWS: tl.constexpr, PARTIAL: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_stop = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    # x and the weights are K-contiguous (the launcher sees to it), so each row of a tile is one run of bytes.
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :]
    if HAS_DW:
        dw_ptrs = DW + offs_n[:, None] * stride_dwn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_stop, BLOCK_K):
        mask_k = offs_k < k_stop - (k - k_start)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if HAS_DW:
            dw = tl.load(dw_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if FOLD_DW:  # one m for every row: W + m1·ΔW in registers, one product
                w = (w.to(tl.float32) + m1_scalar * dw.to(tl.float32)).to(x.dtype)
            else:
                acc_d = tl.dot(x, tl.trans(dw), acc_d, input_precision="ieee" if IEEE else None)
            dw_ptrs += BLOCK_K
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee" if IEEE else None)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_DW and not FOLD_DW:
        if M1_ROWS:
            acc += tl.load(M1 + offs_m, mask=mask_m, other=0.0)[:, None] * acc_d
        else:
            acc += m1_scalar * acc_d
    if PARTIAL:  # K is split: an fp32 partial plane per split; _steered_linear_reduce_kernel finishes
        part = PART + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        acc = _epilogue(acc, offs_m, offs_n, mask_m, mask_n, XA, LB, BIAS, DBIAS, M2, R, stride_xam, stride_lbn,
                        m2_scalar, HAS_LORA, HAS_BIAS, HAS_DBIAS, M2_ROWS, BLOCK_R)
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _steered_linear_reduce_kernel(
    PART, XA, LB, BIAS, DBIAS, M2, Y,
    M, N, R, split, stride_xam, stride_lbn, stride_ym, m2_scalar,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DBIAS: tl.constexpr, M2_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # The split partials in a fixed order (the same sum every call), then the epilogue.
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    ptrs = PART + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(split):
        acc += tl.load(ptrs + s * M * N, mask=mask, other=0.0)
    acc = _epilogue(acc, offs_m, offs_n, mask_m, mask_n, XA, LB, BIAS, DBIAS, M2, R, stride_xam, stride_lbn,
                    m2_scalar, HAS_LORA, HAS_BIAS, HAS_DBIAS, M2_ROWS, BLOCK_R)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)


def _block_m(M: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(M, 1))))  # tl.dot needs >= 16; 64 caps the registers


def _rank_block(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def plan(M: int, N: int, K: int, sm_count: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, split, K per split): about ``WAVES_PER_SM`` programs per SM, K split where the feature
    tiles alone are too few; each split's K slice is a multiple of ``K_ALIGN`` (so every BLOCK_K divides it).

    Example::

        >>> plan(1, 3584, 18944, 132)    # H200, 18944 -> 3584: 56 feature tiles, K split 10 ways
        (16, 64, 10, 2048)
    """
    bm, bn = _block_m(M), BLOCK_N_DECODE
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    slices = triton.cdiv(K, K_ALIGN)
    split = max(1, min(MAX_SPLIT, slices, triton.cdiv(WAVES_PER_SM * sm_count, tiles)))
    per = triton.cdiv(slices, split) * K_ALIGN
    return bm, bn, triton.cdiv(K, per), per


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a small count still exercises the split on test shapes
    return torch.cuda.get_device_properties(device).multi_processor_count


def _k_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _launch(kernel, grid, args, meta, *, traced: bool):
    if traced:
        return wrap_triton(kernel)[grid](*args, **meta)
    return kernel[grid](*args, **meta)


def variant(M: int, N: int, K: int, dtype: torch.dtype, *, has_dw: bool, m1_rows: bool, has_lora: bool, rank: int,
            has_bias: bool, has_dbias: bool, m2_rows: bool, sm_count: int) -> tuple[dict, int, int]:
    """(the constexprs one launch compiles with: a distinct dict is a distinct compile, the split, K per split)."""
    bm, bn, split, per = plan(M, N, K, sm_count)
    return dict(HAS_DW=has_dw, FOLD_DW=has_dw and not m1_rows, HAS_LORA=has_lora, HAS_BIAS=has_bias,
                HAS_DBIAS=has_dbias, M1_ROWS=m1_rows, M2_ROWS=m2_rows, PARTIAL=split > 1,
                IEEE=dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=_rank_block(rank)), split, per


KERNEL = "_steered_linear_fwd_kernel"


def spill_variant(flags: dict, M: int, dtype: torch.dtype) -> str:
    """The spill table's key of one launch variant: the launch's constexprs, whether M is 1 (Triton compiles that
    row count apart) and the dtype. ``check_targets`` writes the table with the same key."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    return json.dumps({**flags, "M_IS_1": M == 1, "dtype": name}, sort_keys=True)


def spilling_configs(flags: dict, M: int, dtype: torch.dtype, device: torch.device) -> dict:
    """{index into gpu_configs(): spilled bytes} of the configs that spill registers on ``device``'s target at this
    variant (``spills.json``); empty off CUDA."""
    if device.type != "cuda" or _INTERPRET:
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _spilling(_common.device_target(index), tuple(sorted(flags.items())), M == 1, dtype)


@functools.lru_cache(maxsize=4096)
def _spilling(target: str, flags: tuple, m_is_1: bool, dtype: torch.dtype) -> dict:
    # cached per variant: a launch pays one dictionary probe, not the key's JSON
    return _common.spilled(target, KERNEL, spill_variant(dict(flags), 1 if m_is_1 else 2, dtype))


def launch_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta_weight: Optional[Tensor],
               lora_a: Optional[Tensor], lora_b: Optional[Tensor], delta_bias: Optional[Tensor],
               m1_rows: Optional[Tensor], m2_rows: Optional[Tensor], m1: float, m2: float, *,
               traced: bool = False, config: Optional[int] = None) -> Tensor:
    """Forward launcher on plain tensors: ``x`` [M, K], ``weight`` [N, K] -> ``y`` [M, N].

    ``m1_rows``/``m2_rows`` are fp32 [M] per-row factors, or None to use the scalars ``m1``/``m2``. ``traced``:
    launch through ``wrap_triton`` (inside ``torch.compile``); eager calls launch directly (less host time).
    ``config``: an index into :func:`gpu_configs` (the tuner's candidates, :func:`fitting_configs`); None takes the
    first that fits (or the autotuner, or the fixed test config: ``_common.tuned``).
    """
    x, weight, delta_weight = _k_contiguous(x), _k_contiguous(weight), _k_contiguous(delta_weight)
    lora_b, bias, delta_bias = _k_contiguous(lora_b), _k_contiguous(bias), _k_contiguous(delta_bias)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    xa = None
    if lora_a is not None:  # the skinny rank product m1⊙(x·Aᵀ) [M, r] in fp32, by cuBLAS
        xa = (x @ lora_a.t()).float()
        xa = xa * (m1_rows[:, None] if m1_rows is not None else m1)
    R = xa.shape[1] if xa is not None else 0
    flags, split, per = variant(M, N, K, x.dtype, has_dw=delta_weight is not None, m1_rows=m1_rows is not None,
                                has_lora=xa is not None, rank=R, has_bias=bias is not None,
                                has_dbias=delta_bias is not None, m2_rows=m2_rows is not None,
                                sm_count=_sm_count(x.device))
    bm, bn = flags["BLOCK_M"], flags["BLOCK_N"]
    dummy = y  # never read: the constexpr flags switch those loads off
    part = torch.empty((split, M, N), device=x.device, dtype=torch.float32) if split > 1 else dummy
    pick = lambda t: t if t is not None else dummy
    args = (x, weight, pick(delta_weight), pick(xa), pick(lora_b), pick(bias), pick(delta_bias), pick(m1_rows),
            pick(m2_rows), y, part, M, N, K, R, per, x.stride(0), weight.stride(0),
            delta_weight.stride(0) if delta_weight is not None else 0, xa.stride(0) if xa is not None else 0,
            lora_b.stride(0) if lora_b is not None else 0, y.stride(0), float(m1), float(m2))
    need = footprint(x.element_size(), block_m=bm, block_n=bn, has_dw=flags["HAS_DW"], has_lora=flags["HAS_LORA"],
                     block_r=flags["BLOCK_R"])
    if config is not None and config >= 0 and x.is_cuda and not _common.fixed_configs():
        kernel, fixed = _steered_linear_fwd_kernel, _common.config_launch_meta(gpu_configs()[config])
    else:
        kernel, fixed = _common.tuned(_steered_linear_fwd_kernel, gpu_configs, need, x.device,
                                      key=["M", "N", "K", "K_PER_SPLIT"], fixed=FIXED, interpret=INTERPRET_CONFIG,
                                      drop=spilling_configs(flags, M, x.dtype, x.device) if x.is_cuda else None)
    _launch(kernel, (triton.cdiv(N, bn), split, triton.cdiv(M, bm)), args, {**flags, **fixed}, traced=traced)
    if split > 1:
        rbm, rbn = min(bm, 16), 128
        red = (part, pick(xa), pick(lora_b), pick(bias), pick(delta_bias), pick(m2_rows), y, M, N, R, split,
               xa.stride(0) if xa is not None else 0, lora_b.stride(0) if lora_b is not None else 0, y.stride(0),
               float(m2))
        rflags = dict(HAS_LORA=flags["HAS_LORA"], HAS_BIAS=flags["HAS_BIAS"], HAS_DBIAS=flags["HAS_DBIAS"],
                      M2_ROWS=flags["M2_ROWS"], BLOCK_M=rbm, BLOCK_N=rbn, BLOCK_R=flags["BLOCK_R"])
        _launch(_steered_linear_reduce_kernel, (triton.cdiv(N, rbn), triton.cdiv(M, rbm)), red, rflags,
                traced=traced)
    return y


def fitting_configs(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, *, has_dw: bool,
                    m1_rows: bool, rank: int, limit: int = 4) -> list[Optional[int]]:
    """The launch configs the tuner tries for one call: indices into :func:`gpu_configs` of the first ``limit``
    that fit the device's shared memory and do not spill registers there (:func:`spilling_configs`), in preference
    order; ``[None]`` (the launcher's own choice) under the interpreter, with fixed configs, or off CUDA."""
    if device.type != "cuda" or _INTERPRET or _common.fixed_configs():
        return [None]
    flags, _, _ = variant(M, N, K, dtype, has_dw=has_dw, m1_rows=m1_rows, has_lora=rank > 0, rank=rank,
                          has_bias=True, has_dbias=True, m2_rows=m1_rows, sm_count=_sm_count(device))
    need = footprint(torch.empty((), dtype=dtype).element_size(), block_m=flags["BLOCK_M"], block_n=flags["BLOCK_N"],
                     has_dw=has_dw, has_lora=rank > 0, block_r=flags["BLOCK_R"])
    budget = _common.smem_budget(device.index if device.index is not None else torch.cuda.current_device())
    space = gpu_configs()
    fit = _common.without_spills(space, need, budget, spilling_configs(flags, M, dtype, device))
    return fit[:limit] or [None]


@triton_op("fastsplit::steered_linear_fwd", mutates_args={})
def steered_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta_weight: Optional[Tensor],
                       lora_a: Optional[Tensor], lora_b: Optional[Tensor], delta_bias: Optional[Tensor],
                       m1_rows: Optional[Tensor], m2_rows: Optional[Tensor], m1: float, m2: float,
                       config: int = -1) -> Tensor:
    """The launcher as a torch.library op (what ``torch.compile`` traces); same contract as :func:`launch_fwd`
    (``config`` -1: the launcher's own choice)."""
    return launch_fwd(x, weight, bias, delta_weight, lora_a, lora_b, delta_bias, m1_rows, m2_rows, m1, m2,
                      traced=True, config=config if config >= 0 else None)
