"""No host synchronisation on either op's path, for every form and m kind: traced whole by
torch.compile(fullgraph=True), and run with ``Tensor.item`` / ``Tensor.__bool__`` made to raise (what a sync
on a GPU would need). It lives outside tests/ops, whose NaN-poisoned torch.empty dynamo cannot trace."""
import contextlib

import pytest
import torch

from fastsplit import native, split_loss, steered_linear
from fastsplit.ops import _routing
from tests.helpers import DEVICE
from tests.ops.test_split_loss import make_case
from tests.ops.test_steered_linear import FORMS, make_inputs, make_multiplier

MKINDS = ["scalar", "per_row", "per_token"]


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Reading data back (item, bool, tolist) raises, as it would cost a sync on a GPU; the value checks that
    CPU tensors get (no sync there) are switched to what CUDA tensors get without the debug switch: none."""
    def refuse(*args, **kwargs):
        raise AssertionError("a host sync: Tensor.item / __bool__ / tolist was called on the op's path")

    from fastsplit.ops import _checks
    from fastsplit.ops import split_loss as split_loss_module

    as_on_cuda = lambda t: False
    monkeypatch.setattr(_checks, "value_checks", as_on_cuda)
    monkeypatch.setattr(split_loss_module, "value_checks", as_on_cuda)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__bool__", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    yield


def _steered(form, mkind, backend):
    t = make_inputs(form, 5, torch.float32)
    kw = {k: v for k, v in t.items() if k != "x" and v is not None}
    return t["x"], kw, make_multiplier(mkind, 5)


BACKENDS = ["torch", "triton"]  # steered_linear has no native kernel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mkind", MKINDS)
@pytest.mark.parametrize("form", FORMS)
def test_steered_linear_reads_nothing_back(form, mkind, backend, monkeypatch):
    x, kw, m = _steered(form, mkind, backend)
    with no_host_reads(monkeypatch):
        y = steered_linear(x, kw.pop("weight"), kw.pop("bias"), **kw, m1=m, backend=backend)
        y.backward(torch.ones_like(y))


@pytest.mark.parametrize("mkind", MKINDS)
@pytest.mark.parametrize("form", FORMS)
def test_steered_linear_compiles_without_graph_breaks(form, mkind):
    torch._dynamo.reset()
    x, kw, m = _steered(form, mkind, "torch")
    w, b = kw.pop("weight"), kw.pop("bias")
    fn = torch.compile(lambda x, m: steered_linear(x, w, b, **kw, m1=m, backend="torch"), fullgraph=True)
    y = fn(x, m)
    torch.testing.assert_close(y, steered_linear(x, w, b, **kw, m1=m, backend="torch"), atol=1e-5, rtol=1e-5)


def test_compiled_checks_never_read_the_finite_cache(monkeypatch):
    """Under torch.compile the multiplier's finite-check cache (a weakref to the last tensor checked) is not read:
    dynamo guarded on its referent, which could die before the guard was built (a flaky InternalTorchDynamoError in
    CI). A cache that raises when read must not matter to a compiled call."""
    from fastsplit.ops import _checks

    class Unreadable(tuple):
        def __iter__(self):
            raise AssertionError("the finite-check cache was read while compiling")

    torch._dynamo.reset()
    x, kw, m = _steered("vector", "per_row", "torch")
    w, b = kw.pop("weight"), kw.pop("bias")
    monkeypatch.setattr(_checks, "_last_finite", Unreadable((None, -1)))
    fn = torch.compile(lambda x, m: steered_linear(x, w, b, **kw, m1=m, backend="torch"), fullgraph=True)
    y = fn(x, m)
    monkeypatch.undo()
    torch.testing.assert_close(y, steered_linear(x, w, b, **kw, m1=m, backend="torch"), atol=1e-5, rtol=1e-5)


SPLIT_BACKENDS = ["torch", "triton"]  # steered_linear has no native kernel


@pytest.mark.parametrize("reduction", ["batch", "pair"])
@pytest.mark.parametrize("backend", SPLIT_BACKENDS)
def test_split_loss_reads_nothing_back(backend, reduction, monkeypatch):
    t, lp, ln = make_case(1000, torch.float32)
    with no_host_reads(monkeypatch):
        loss = split_loss(t["hidden_pos"], t["hidden_neg"], t["lm_head_weight"], lp, ln, reduction=reduction,
                          backend=backend)
        loss.backward()


@pytest.mark.parametrize("reduction", ["batch", "pair"])
def test_split_loss_compiles_without_graph_breaks(reduction):
    torch._dynamo.reset()
    t, lp, ln = make_case(1000, torch.float32)
    args = (t["hidden_pos"].detach(), t["hidden_neg"].detach(), t["lm_head_weight"].detach(), lp, ln)
    fn = torch.compile(lambda *a: split_loss(*a, reduction=reduction, backend="torch"), fullgraph=True)
    torch.testing.assert_close(fn(*args), split_loss(*args, reduction=reduction, backend="torch"),
                               atol=1e-5, rtol=1e-5)


def test_auto_routes_by_the_measured_table(monkeypatch):
    from fastsplit.ops import _backend

    assert _backend.resolve("auto", torch.device("cpu"), form="lora", mkind="per_row", rows=4) == "torch"
    assert _routing.route((9, 0), "steered_linear", "lora", "per_row", 4) == "torch"  # nothing measured green
    assert _routing.route((7, 5), "steered_linear", "lora", "per_row", 4) == "torch"  # unknown device
    assert _routing.route((9, 0), "split_loss", None, None, 4096) == "triton"  # the fused path, by design
    monkeypatch.setitem(_routing.TABLE, (8, 9), {"measured": "test", "routes": {
        ("steered_linear", "local_weight", "per_row", "decode"): "triton"}})
    assert _routing.route((8, 9), "steered_linear", "local_weight", "per_row", 16) == "triton"
    assert _routing.route((8, 9), "steered_linear", "local_weight", "per_row", 4096) == "torch"
    assert _routing.row_class(64) == "decode" and _routing.row_class(65) == "prefill"
