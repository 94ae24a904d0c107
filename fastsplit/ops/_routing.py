"""Where ``backend="auto"`` sends a call: a table filled from measurements, never from hope.

Keyed by the CUDA device's compute capability, then by (op, form, m kind, row class). A route names the
backend that measured fastest on that device *and* passed the GPU suite and compute-sanitizer there.
Anything not in the table takes the torch path (cuBLAS compositions on a GPU), which is correct on every
device and never slower than eager steering code, because it is eager code.

To add a route: run ``bench/gpu_check.sh`` on the device, read the ``auto`` rows of bench/RESULTS.md,
and enter the winner here with the device, date and commit it was measured at.
"""
from __future__ import annotations

ROW_CLASSES = ("decode", "prefill")  # decode: at most DECODE_ROWS rows in the call
DECODE_ROWS = 64


def row_class(rows: int) -> str:
    return "decode" if rows <= DECODE_ROWS else "prefill"


# capability -> {"measured": where the figures come from, "routes": {(op, form, mkind, row class): backend}}
TABLE: dict[tuple[int, int], dict] = {
    (9, 0): {
        "measured": "NVIDIA H100 80GB HBM3, 2026-11-22, commit 2b44776 (../shared/gpu-h100/README.md); "
                    "NVIDIA H200, 2026-11-30, commit 78a50b9 (../shared/gpu-h200/README.md)",
        # Empty on purpose: on both, the Triton kernels of those commits lost to cuBLAS compositions in every
        # prefill row, and both decode kernels (Triton and the native GEMV) to eager code at every row count;
        # they were removed. The Triton decode kernel that replaced them has not run on a GPU yet: it gets a
        # route here once bench/gpu_check.sh measures it faster and green (summary.json, "routes_supported").
        "routes": {},
    },
}


# Where the table says nothing for a CUDA device. split_loss takes the fused path by design (issue: "auto on CUDA
# takes this path"): the torch path's own cuBLAS GEMMs, with one fused elementwise pass over bf16 logits in place of
# five fp32 torch kernels, so it cannot add work. Not yet measured: bench/gpu_check.sh reports it beside the torch
# path, and a measured entry above overrides this.
DEFAULTS = {"split_loss": "triton"}


def route(capability: tuple[int, int] | None, op: str, form: str | None, mkind: str | None,
          rows: int | None) -> str:
    """The measured backend for this call on a CUDA device of ``capability``; else the op's default (DEFAULTS),
    else "torch"."""
    entry = TABLE.get(capability) if capability is not None else None
    key = (op, form, mkind, row_class(rows) if rows is not None else None)
    if entry is not None and key in entry["routes"]:
        return entry["routes"][key]
    return DEFAULTS.get(op, "torch")
