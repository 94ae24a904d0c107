"""The one chunked-logits helper: how many token rows a [rows × V] logits block may hold, and the spans.

Every path that forms logits (the torch, Triton and native SPLIT launchers, the lm_head gradient, the
log-odds sweep) holds one [C × V] fp32 block at a time, so extra memory never grows with the number of
rows, and C is derived from the device and the problem rather than from a fixed byte budget:

* **CUDA.** The dH pass splits its output [C, H] into row tiles × ``ceil(H / 128)`` column tiles; C is the
  fewest rows that give two full waves of tiles on every SM (fewer leave SMs idle), rounded up to the
  kernels' largest row tile, but the block stays within ``L2_BLOCKS`` × the L2 cache (past a few L2s the
  block's write and re-read are HBM round trips anyway, so more rows only cost memory). Measured choice
  of both constants waits for a GPU session (issue: SPLIT loss on the GPU).
* **CPU.** The block is read back at once (max, exp, sum), so C keeps it within the last-level cache.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

ROW_TILE = 128  # the largest BLOCK_M of the Triton SPLIT kernels
COL_TILE = 128  # the dH kernel's largest BLOCK_K
WAVES = 2
L2_BLOCKS = 4
_CPU_CACHE_DEFAULT = 32 << 20


def _sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)  # torch caches the properties


def _l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0)) or 50 << 20


def cpu_cache_bytes() -> int:
    """Size of the largest CPU cache this machine reports (sysfs), else 32 MiB."""
    best = 0
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return best or _CPU_CACHE_DEFAULT


CPU_CACHE_BYTES = cpu_cache_bytes()  # read once, at import: nothing to trace when the op is compiled


def cuda_rows(sm_count: int, hidden: int) -> int:
    """Rows per chunk on a GPU with ``sm_count`` SMs: two waves of the dH pass's [ROW_TILE, COL_TILE] tiles."""
    col_tiles = -(-hidden // COL_TILE)
    row_tiles = -(-(WAVES * sm_count) // col_tiles)
    return row_tiles * ROW_TILE


def l2_rows(l2_bytes: int, vocab: int) -> int:
    """The most rows whose fp32 [rows × vocab] block fits in ``L2_BLOCKS`` L2 caches (at least one row tile)."""
    return max(ROW_TILE, (L2_BLOCKS * l2_bytes // (4 * max(vocab, 1))) // ROW_TILE * ROW_TILE)


def chunk_rows(n: int, vocab: int, hidden: int, device: torch.device) -> int:
    """Token rows per logits block for ``n`` rows, a ``vocab``-sized head and ``hidden`` size on ``device``.

    Example::

        >>> chunk_rows(8192, 152064, 3584, torch.device("cuda"))   # H100: 132 SMs, 50 MiB L2 (the L2 bound)
        256
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        rows = min(cuda_rows(_sm_count(index), hidden), l2_rows(_l2_bytes(index), vocab))
    else:
        rows = CPU_CACHE_BYTES // (4 * max(vocab, 1))
    return max(1, min(n, rows))


# The fused SPLIT path (Triton pass between cuBLAS GEMMs) holds one [C, V] logits chunk in the hidden states' dtype;
# C is sized by bytes so the chunk stays within this budget at any V (the goal is <= 256 MiB of extra
# memory for the whole step, which also holds both sides' dH). 128 MiB is C = 441 rows at V 152064 in bf16 and
# 262 at V 256000: enough rows that the logits GEMM runs thousands of tiles, while the dH GEMM ([C, V]·[V, H],
# long K) leans on cuBLAS's split-K.
FUSED_LOGITS_BYTES = 128 << 20
FUSED_ROW_ALIGN = 64


def fused_chunk_rows(n: int, vocab: int, elem_bytes: int, device: torch.device,
                     budget: int = FUSED_LOGITS_BYTES) -> int:
    """Token rows per logits chunk of the fused SPLIT path: as many as fit ``budget`` bytes (a multiple of
    ``FUSED_ROW_ALIGN`` rows, at least that many) on a GPU; on the CPU (the interpreter) the cache-sized rule.

    Example::

        >>> fused_chunk_rows(8192, 256000, 2, torch.device("cuda"))
        256
    """
    if device.type != "cuda":
        return chunk_rows(n, vocab, 1, device)
    rows = budget // max(1, vocab * elem_bytes)
    rows = max(FUSED_ROW_ALIGN, rows // FUSED_ROW_ALIGN * FUSED_ROW_ALIGN)
    return max(1, min(n, rows))


def spans(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each chunk of ``n`` rows."""
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)
