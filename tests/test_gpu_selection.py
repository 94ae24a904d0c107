"""The GPU selection (tests/gpu) cannot grow unnoticed: its CUDA cases and the Triton compiles they need are
counted here, on the CPU, against the budget that fits a 90-second run on one H200."""
import torch

from fastsplit.kernels import steered_linear as kst
from tests.gpu import test_cuda_matrix as sel
from tests.ops import test_steered_linear as ops

MAX_CASES = 200
MAX_COMPILES = 64  # about a second each on an H200 host: most of the 90 s
H200_SMS = 132


def _steered_variant(dtype, form, mkind, rows, k=ops.IN):
    per_row = mkind != "scalar"
    flags, split, _ = kst.variant(rows, ops.OUT, k, dtype, has_dw=form == "local_weight", m1_rows=per_row,
                                  has_lora=form == "lora", rank=ops.R, has_bias=True, has_dbias=True,
                                  m2_rows=per_row, sm_count=H200_SMS)
    keys = {("steered_fwd", str(dtype), tuple(sorted(flags.items())))}
    if split > 1:
        keys.add(("steered_reduce", str(dtype), flags["HAS_LORA"], flags["M2_ROWS"], flags["BLOCK_R"]))
    return keys


def compiles_of_the_selection():
    keys = set()
    for dtype, form, mkind, backend, cls in sel.steered_cases(cuda=True):
        rows = sel.SHAPE_CLASSES[cls] * (1 if cls == "decode" else 2)
        if backend == "triton":
            keys |= _steered_variant(dtype, form, mkind, rows)
    for name, T, K, form, backend in sel.edge_cases(cuda=True):
        if backend == "triton" and T:
            keys |= _steered_variant(torch.bfloat16, form, "per_row", 2 * T, K or ops.IN)
    for dtype, backend, _, softcap in sel.split_cases(cuda=True):
        if backend == "triton":
            keys.add(("split_fused", str(dtype), softcap is not None, True))
    for form, mkind, backend in sel.graph_cases(cuda=True):
        if backend == "triton":
            keys |= _steered_variant(torch.bfloat16, form, mkind, 2)
    keys |= _steered_variant(torch.bfloat16, "lora", "per_row", 10)  # test_compile_fullgraph
    return keys


def test_the_gpu_selection_fits_its_budget():
    cases = (len(sel.steered_cases(cuda=True)) + len(sel.edge_cases(cuda=True)) + len(sel.split_cases(cuda=True))
             + len(sel.graph_cases(cuda=True)) + 2)
    compiles = compiles_of_the_selection()
    print(f"GPU selection: {cases} CUDA cases, {len(compiles)} Triton compiles")
    assert cases <= MAX_CASES, cases
    assert len(compiles) <= MAX_COMPILES, len(compiles)
    # The matrix really spans what it claims.
    assert {c[0] for c in sel.steered_cases(cuda=True)} == {torch.float32, torch.float16, torch.bfloat16}
    assert {(c[1], c[2], c[3]) for c in sel.steered_cases(cuda=True)} == {
        (f, m, b) for f in sel.FORMS for m in sel.MKINDS for b in ("torch", "triton")}
