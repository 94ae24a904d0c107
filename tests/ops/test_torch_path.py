"""The torch backend's compositions: their launch count per form × m kind × row class (counted on the CPU with a
TorchDispatchMode, so a regression fails without a GPU), and their half-precision error under flash-attention's
rule against the plain reference computed in the same dtype."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastsplit import steered_linear, steered_linear_ref
from fastsplit.ops.steered_linear import FOLD_ROWS, fold_rows, steered_linear_torch
from tests.helpers import assert_close_fa

IN, OUT, R = 123, 77, 3
FREE = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh", "alias", "_unsafe_view"}  # no kernel behind these


class LaunchCounter(TorchDispatchMode):
    """The aten ops that launch work: views (metadata only) and allocations do not count."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in FREE):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _inputs(form, rows, dtype=torch.float32, delta_bias=True, bias=True, seed=0, k=IN, n=OUT):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    x = r(rows, k)
    w, b = r(n, k, scale=k ** -0.5), (r(n) if bias else None)
    kw = {"delta_bias": r(n)} if delta_bias else {}
    if form == "lora":
        kw.update(lora_a=r(R, k, scale=k ** -0.5), lora_b=r(n, R, scale=0.5))
    elif form == "local_weight":
        kw.update(delta_weight=r(n, k, scale=k ** -0.5))
    return x, w, b, kw


def _m(kind, rows, dtype=torch.float32):
    if kind == "scalar":
        return 1.7
    m = torch.linspace(-2, 3, rows, dtype=dtype)
    return m if kind == "per_row" else m.view(rows // 2, 2) if kind == "per_token" else None


DECODE, PREFILL = 2, 64  # on the CPU these small weights fold from FOLD_ROWS['cpu'] rows
# form, m kind, rows -> the launches (the goal: as few as the math allows; see steered_linear_torch).
EXPECTED = {
    ("vector", "scalar", DECODE): ["add", "addmm"],  # b + m·Δb, one GEMM with that bias
    ("vector", "per_row", DECODE): ["addmm", "addcmul_"],
    ("lora", "scalar", DECODE): ["add", "addmm", "mm", "addmm_"],
    ("lora", "per_row", DECODE): ["addmm", "mm", "mul", "cat", "cat", "addmm_"],  # Δb rides in the rank product
    ("local_weight", "scalar", DECODE): ["add", "addmm", "addmm_"],  # two GEMMs read less than a fold
    ("local_weight", "scalar", PREFILL): ["add", "add", "addmm"],  # transient W + m·ΔW, one GEMM
    ("local_weight", "per_row", DECODE): ["addmm", "mul", "addmm_", "addcmul_"],
    ("local_weight", "per_row", PREFILL): ["addmm", "mul", "addmm_", "addcmul_"],
}


@pytest.mark.parametrize("form,mkind,rows", list(EXPECTED),
                         ids=[f"{f}-{k}-{'decode' if r == DECODE else 'prefill'}" for f, k, r in EXPECTED])
def test_launch_count(form, mkind, rows):
    x, w, b, kw = _inputs(form, rows)
    m = _m(mkind, rows)
    with torch.no_grad(), LaunchCounter() as counter:
        y = steered_linear(x, w, b, **kw, m1=m)
    assert sorted(counter.ops) == sorted(EXPECTED[form, mkind, rows]), counter.ops
    torch.testing.assert_close(y.double(), steered_linear_ref(x.double(), w.double(), b.double(),
                                                              **{k: v.double() for k, v in kw.items()},
                                                              m1=m.double() if isinstance(m, torch.Tensor) else m),
                               atol=1e-4, rtol=1e-4)


def test_fold_threshold():
    assert fold_rows(torch.device("cpu"), IN * OUT * 4) == FOLD_ROWS["cpu"] > DECODE
    assert fold_rows(torch.device("cpu"), 1 << 30) == FOLD_ROWS["cpu-uncached"]
    assert fold_rows(torch.device("cuda"), IN * OUT * 2) == FOLD_ROWS["cuda"]


@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
def test_per_sequence_and_per_token_launch_like_per_row(form):
    """m [B] or [B, T] against x [B, T, in]: broadcast views, no copies of m into rows."""
    x, w, b, kw = _inputs(form, 4)
    x = x.view(2, 2, IN)
    for m in (torch.tensor([0.5, -1.0]), torch.tensor([[0.5, 2.0], [-1.0, 3.0]])):
        with torch.no_grad(), LaunchCounter() as counter:
            steered_linear(x, w, b, **kw, m1=m)
        assert sorted(counter.ops) == sorted(EXPECTED[form, "per_row", DECODE]), (m.shape, counter.ops)


def test_no_bias_no_delta_bias_is_one_gemm_per_matrix():
    x, w, _, kw = _inputs("vector", DECODE, delta_bias=False, bias=False)
    m = torch.ones(DECODE)
    with torch.no_grad(), LaunchCounter() as counter:
        steered_linear(x, w, m1=m)
    assert counter.ops == ["mm"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("rows", [DECODE, PREFILL], ids=["decode", "prefill"])
@pytest.mark.parametrize("mkind", ["scalar", "per_row"])
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
def test_half_precision_within_the_fa_rule(form, mkind, rows, dtype):
    """Folding m into the bias, scaling x's rows, the rank-(r+1) product: each rounds differently from the plain
    reference, never by more than 3x its error in the same dtype."""
    x, w, b, kw = _inputs(form, rows, dtype)
    m = _m(mkind, rows)
    y = steered_linear_torch(x, w, b, **kw, m1=m)
    same = steered_linear_ref(x, w, b, **kw, m1=m)
    d = lambda t: t.double()
    ref = steered_linear_ref(d(x), d(w), d(b), **{k: d(v) for k, v in kw.items()},
                             m1=d(m) if isinstance(m, torch.Tensor) else m)
    assert y.dtype == dtype
    assert_close_fa(y, ref, same, "y")


@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
@pytest.mark.parametrize("rows", [DECODE, PREFILL], ids=["decode", "prefill"])
def test_gradients_through_m_and_every_tensor(form, rows):
    """The torch backend stays differentiable in m (autograd through the in-place compositions); narrow
    features keep gradcheck's numerical Jacobian small at the fold path's row count."""
    x, w, b, kw = _inputs(form, rows, torch.float64, k=5, n=4)
    leaves = [x, w, b, *kw.values()]
    m = torch.linspace(-1, 2, rows, dtype=torch.float64)
    for t in leaves + [m]:
        t.requires_grad_(True)
    names = ["x", "w", "b", *kw]

    def f(*args):
        t = dict(zip(names + ["m"], args))
        return steered_linear_torch(t["x"], t["w"], t["b"], **{k: t[k] for k in kw}, m1=t["m"])

    assert torch.autograd.gradcheck(f, leaves + [m])
    fold_scalar = lambda *args: steered_linear_torch(args[0], args[1], args[2],
                                                     **dict(zip(kw, args[3:])), m1=1.3)
    assert torch.autograd.gradcheck(fold_scalar, leaves)
