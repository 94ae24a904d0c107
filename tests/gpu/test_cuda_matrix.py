"""The GPU selection: what ``bench/gpu_check.sh`` runs on a CUDA device, sized for a 15-minute slot (goal: at most 90 s
in one process on one H200, compile time included).

* the dtype × form × m kind × backend matrix of steered_linear at one shape per shape class (decode: 5 rows,
  prefill: 2×65), forward and every gradient against float64 (flash-attention's rule in half precision);
* the odd and edge shapes at one dtype (T=1, 17 and 77 rows across row tiles, K=600 split over programs, no rows);
* split_loss: dtype × backend × reduction × soft-cap at V 4099;
* CUDA-graph capture and replay of every form × m kind × backend, and torch.compile(fullgraph=True) of both paths.

On the CPU the module skips (the CPU suite covers the same code at more shapes), unless ``FASTSPLIT_GPU_DRY_RUN=1``
(``bench/gpu_check.sh --dry-run``), which runs the float32 cases on the CPU to check the check itself.
``tests/test_gpu_selection.py`` counts the cases and the Triton compiles they need, so the selection cannot grow
unnoticed.
"""
import itertools
import os

import pytest
import torch

from fastsplit import native, split_loss, steered_linear
from tests.helpers import DEVICE, HAS_CUDA
from tests.ops.test_split_loss import check as check_split
from tests.ops.test_steered_linear import check_against_reference, make_inputs, make_multiplier

DRY = os.environ.get("FASTSPLIT_GPU_DRY_RUN") == "1"
pytestmark = [pytest.mark.gpu_selection,
              pytest.mark.skipif(not (HAS_CUDA or DRY), reason="the GPU selection (FASTSPLIT_GPU_DRY_RUN=1 runs it here)")]

FORMS, MKINDS = ("vector", "lora", "local_weight"), ("scalar", "per_row", "per_token")
HALF = torch.bfloat16 if HAS_CUDA else torch.float32  # the one dtype of the edge cases
NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
SHAPE_CLASSES = {"decode": 5, "prefill": 65}  # T per sequence; 2 sequences for prefill (130 rows), 1 for decode


def dtypes(cuda: bool):
    return (torch.float32, torch.float16, torch.bfloat16) if cuda else (torch.float32,)


def steered_cases(cuda: bool = HAS_CUDA):
    """(dtype, form, m kind, backend, shape class) of the matrix."""
    return list(itertools.product(dtypes(cuda), FORMS, MKINDS, ("torch", "triton"), SHAPE_CLASSES))


# (name, rows per sequence T, K, backend); B is 2 throughout (make_inputs), so rows = 2·T.
EDGE = [("T1", 1, None), ("rows34", 17, None), ("rows154", 77, None), ("K600-split", 5, 600), ("empty", 0, None)]


def edge_cases(cuda: bool = HAS_CUDA):
    return [(name, T, K, form, backend) for (name, T, K), form, backend in
            itertools.product(EDGE, FORMS, ("torch", "triton"))]


def split_cases(cuda: bool = HAS_CUDA):
    backends = ["torch", "triton"] + (["native"] if native._C is not None and (native.cuda_built() or not cuda)
                                      else [])
    kinds = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    return list(itertools.product(kinds, backends, ("batch", "pair"), (None, 30.0)))


def graph_cases(cuda: bool = HAS_CUDA):
    return list(itertools.product(FORMS, MKINDS, ("auto", "torch", "triton")))


def _id(case):
    return "-".join(NAMES.get(c, str(c)) for c in case)


@pytest.mark.parametrize("case", steered_cases(), ids=_id)
def test_steered_matrix(case):
    dtype, form, mkind, backend, cls = case
    T = SHAPE_CLASSES[cls]
    if cls == "decode":  # one sequence: the rows of one decode step
        import tests.ops.test_steered_linear as t

        old, t.B = t.B, 1
        try:
            check_against_reference(backend, dtype, form, T, _m(mkind, T, 1), None)
        finally:
            t.B = old
    else:
        check_against_reference(backend, dtype, form, T, make_multiplier(mkind, T), None)


def _m(kind, T, B):
    return {"scalar": 1.7, "per_row": torch.linspace(-2, 3, B, device=DEVICE),
            "per_token": torch.randn(B, T, device=DEVICE) * 2}[kind]


@pytest.mark.parametrize("case", edge_cases(), ids=_id)
def test_edge_shapes(case, monkeypatch):
    name, T, K, form, backend = case
    import tests.ops.test_steered_linear as t

    if K is not None:
        monkeypatch.setattr(t, "IN", K)
    if T == 0:
        x = make_inputs(form, 1, HALF)
        kw = {k: v for k, v in x.items() if k not in ("x", "weight", "bias") and v is not None}
        y = steered_linear(x["x"][:, :0], x["weight"], x["bias"], **kw, m1=1.5, backend=backend)
        assert y.shape == (2, 0, t.OUT)
        return
    check_against_reference(backend, HALF, form, T, make_multiplier("per_row", T), None)


@pytest.mark.parametrize("case", split_cases(), ids=_id)
def test_split_matrix(case):
    dtype, backend, reduction, softcap = case
    check_split(backend, dtype, 4099, reduction=reduction, logit_softcap=softcap, theta=5.0)


@pytest.mark.parametrize("case", graph_cases(), ids=_id)
def test_cuda_graph_capture(case):
    """Each form × m kind × backend captures in a CUDA graph (no sync, no allocation the graph cannot own) and a
    replay on new inputs gives the eager result."""
    if not HAS_CUDA:
        pytest.skip("CUDA graphs need a GPU")
    form, mkind, backend = case
    t = {k: (v.detach() if v is not None else None) for k, v in make_inputs(form, 1, torch.bfloat16).items()}
    x = t.pop("x")
    w, b = t.pop("weight"), t.pop("bias")
    kw = {k: v for k, v in t.items() if v is not None}
    m = make_multiplier(mkind, 1)
    m = m.to(torch.float32) if isinstance(m, torch.Tensor) else m
    call = lambda: steered_linear(x, w, b, **kw, m1=m, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            call()  # warm-up: compile, autotune, allocator
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = call()
    x.copy_(torch.randn_like(x))
    if isinstance(m, torch.Tensor):
        m.copy_(torch.randn_like(m))
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(out, call(), atol=0, rtol=0)  # the same kernels on the same data


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph(backend):
    if not HAS_CUDA:
        pytest.skip("torch.compile of the Triton path needs a GPU (the CPU suite compiles the torch path)")
    torch._dynamo.reset()
    t = {k: (v.detach() if v is not None else None) for k, v in make_inputs("lora", 5, torch.bfloat16).items()}
    x, w, b = t.pop("x"), t.pop("weight"), t.pop("bias")
    kw = {k: v for k, v in t.items() if v is not None}
    m = torch.tensor([0.5, -1.5], device=DEVICE)
    fn = torch.compile(lambda x, m: steered_linear(x, w, b, **kw, m1=m, backend=backend), fullgraph=True)
    torch.testing.assert_close(fn(x, m), steered_linear(x, w, b, **kw, m1=m, backend=backend), atol=2e-2, rtol=2e-2)
    lp = torch.randint(0, 777, (2, 9), device=DEVICE)
    hp, hn = torch.randn(2, 9, 32, device=DEVICE), torch.randn(2, 9, 32, device=DEVICE)
    W = torch.randn(777, 32, device=DEVICE)
    loss = torch.compile(lambda *a: split_loss(*a, backend=backend), fullgraph=True)
    torch.testing.assert_close(loss(hp, hn, W, lp, lp), split_loss(hp, hn, W, lp, lp, backend=backend),
                               atol=1e-4, rtol=1e-4)
