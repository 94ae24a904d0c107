"""steered_linear on every backend against the float64 reference: forward and every gradient."""
import pytest
import torch

from fastsplit import steered_linear, steered_linear_ref
from fastsplit.ops import _backend
from fastsplit import native
from tests.helpers import DEVICE, HAS_CUDA, assert_close, assert_close_fa, backend_cases

IN, OUT, R, B = 123, 77, 3, 2
FORMS = ["vector", "lora", "local_weight"]
STEERED_CASES = backend_cases(native=False)  # steered_linear's kernel is Triton's (decode); no native one


def make_inputs(form, T, dtype, *, train_base=True, bias=True, device=DEVICE):
    """Random, non-zero tensors for one form, scaled so outputs are O(1)."""
    g = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float64) * scale).to(device, dtype)
    t = {"x": g(B, T, IN), "weight": g(OUT, IN, scale=IN ** -0.5),
         "bias": g(OUT) if bias else None, "delta_bias": g(OUT)}
    if form == "lora":
        t["lora_a"], t["lora_b"] = g(R, IN, scale=IN ** -0.5), g(OUT, R, scale=0.5)
    elif form == "local_weight":
        t["delta_weight"] = g(OUT, IN, scale=IN ** -0.5)
    for k, v in t.items():
        if v is not None and (train_base or k not in ("weight", "bias")):
            v.requires_grad_(True)
    return t


def make_multiplier(kind, T, device=DEVICE):
    m = {"scalar": 1.7, "zero": 0.0,
         "per_row": torch.tensor([-2.0, 3.5])[:B],
         "per_token": torch.randn(B, T, dtype=torch.float64) * 2}[kind]
    return m.to(device) if isinstance(m, torch.Tensor) else m


def _run(fn, t, m1, m2, grad_out=None):
    tensors = {k: v for k, v in t.items() if v is not None}
    y = fn(**tensors, m1=m1, m2=m2)
    grad_out = torch.randn_like(y) if grad_out is None else grad_out
    leaves = [k for k, v in tensors.items() if v.requires_grad]
    grads = torch.autograd.grad(y, [tensors[k] for k in leaves], grad_out)
    return y, dict(zip(leaves, grads)), grad_out


def _fresh(t, dtype=None):
    """The same values as new leaves (optionally in another dtype)."""
    return {k: (v.detach().to(dtype or v.dtype).requires_grad_(v.requires_grad) if v is not None else None)
            for k, v in t.items()}


def check_against_reference(backend, dtype, form, T, m1, m2, **kw):
    """Forward and every gradient against float64; a kernel in a low precision is judged by flash-attention's
    rule (at most 3x the torch path's own error in that dtype); the torch path itself by TOL."""
    t = make_inputs(form, T, dtype, **kw)
    y, grads, grad_out = _run(lambda **a: steered_linear(**a, backend=backend), t, m1, m2)
    d64 = lambda m: m.double() if isinstance(m, torch.Tensor) else m
    y_ref, ref_grads, _ = _run(steered_linear_ref, _fresh(t, torch.float64), d64(m1), d64(m2), grad_out.double())
    same = None
    if backend != "torch":
        same = _run(lambda **a: steered_linear(**a, backend="torch"), _fresh(t), m1, m2, grad_out)
    assert set(grads) == set(ref_grads)
    for name, got, ref, base in [("y", y, y_ref, same and same[0])] + \
            [(f"d{k}", grads[k], ref_grads[k], same and same[1][k]) for k in ref_grads]:
        if same is None:
            assert_close(got, ref, dtype, name)
        else:
            assert_close_fa(got, ref, base, name)


@pytest.mark.parametrize("backend,dtype", STEERED_CASES)
@pytest.mark.parametrize("T", [1, 63], ids=["T1", "T63"])
@pytest.mark.parametrize("mkind", ["scalar", "per_row", "per_token"])
@pytest.mark.parametrize("form", FORMS)
def test_matches_reference(backend, dtype, form, mkind, T):
    check_against_reference(backend, dtype, form, T, make_multiplier(mkind, T), None)


@pytest.mark.parametrize("backend,dtype", STEERED_CASES)
@pytest.mark.parametrize("m1kind,m2kind", [("per_row", "scalar"), ("scalar", "per_token"), ("zero", "per_row")],
                         ids=["m1row-m2scalar", "m1scalar-m2token", "m1zero-m2row"])
@pytest.mark.parametrize("form", FORMS)
def test_separate_m2(backend, dtype, form, m1kind, m2kind):
    T = 5
    check_against_reference(backend, dtype, form, T, make_multiplier(m1kind, T), make_multiplier(m2kind, T))


@pytest.mark.parametrize("backend,dtype", STEERED_CASES)
@pytest.mark.parametrize("form", FORMS)
def test_frozen_base_no_bias(backend, dtype, form):
    """The usual steering case: W frozen, no base bias; only x and the deltas get gradients."""
    check_against_reference(backend, dtype, form, 7, make_multiplier("per_row", 7), None,
                            train_base=False, bias=False)


@pytest.mark.parametrize("form", FORMS)
def test_reference_gradcheck(form):
    t = make_inputs(form, 3, torch.float64, device="cpu")
    t = {k: v for k, v in t.items() if v is not None}
    for k in t:  # small slices keep gradcheck quick
        t[k] = t[k].detach()
    names = list(t)
    m1 = torch.tensor([0.5, -1.5], dtype=torch.float64)

    def f(*args):
        return steered_linear_ref(**dict(zip(names, args)), m1=m1, m2=0.3)

    assert torch.autograd.gradcheck(f, [t[k].requires_grad_() for k in names])


def test_zero_multiplier_is_exactly_the_base_layer():
    t = make_inputs("local_weight", 4, torch.float32)
    base = torch.nn.functional.linear(t["x"], t["weight"], t["bias"])
    for backend in ["torch", "triton"]:
        y = steered_linear(t["x"], t["weight"], t["bias"], delta_weight=t["delta_weight"],
                           delta_bias=t["delta_bias"], m1=0.0, backend=backend)
        assert torch.equal(y, base), backend


def test_empty_input():
    t = make_inputs("lora", 1, torch.float32)
    x = t["x"][:0]
    y = steered_linear(x, t["weight"], lora_a=t["lora_a"], lora_b=t["lora_b"], backend="triton")
    assert y.shape == (0, 1, OUT)


def test_auto_backend():
    assert _backend.resolve("auto", torch.device(DEVICE)) == "torch"  # nothing routed: the compositions
    assert _backend.resolve("auto", torch.device(DEVICE), op="split_loss") == ("triton" if HAS_CUDA else "torch")
    assert _backend.resolve("auto", torch.device(DEVICE), needs_autograd_m=True) == "torch"


def test_peft_lora_layer_matches():
    peft = pytest.importorskip("peft")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(IN, OUT)

        def forward(self, x):
            return self.proj(x)

    net = peft.get_peft_model(Net(), peft.LoraConfig(r=R, lora_alpha=7, target_modules=["proj"]))
    layer = net.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(B, 9, IN)
    with torch.no_grad():
        expected = net(x)
        for backend in ["torch", "triton"]:
            y = steered_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                               lora_a=layer.lora_A["default"].weight, lora_b=layer.lora_B["default"].weight,
                               m1=7 / R, backend=backend)
            torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


BAD = {
    "in-mismatch": (dict(x=(2, 5, 10)), "x has 10 input features"),
    "bias-shape": (dict(bias=(5,)), "bias must have shape"),
    "delta-bias-shape": (dict(delta_bias=(OUT + 1,)), "delta_bias must have shape"),
    "dw-and-lora": (dict(delta_weight=(OUT, IN), lora_a=(R, IN), lora_b=(OUT, R)), "not both"),
    "lora-a-alone": (dict(lora_a=(R, IN)), "lora_a was given without lora_b"),
    "lora-b-alone": (dict(lora_b=(OUT, R)), "lora_b was given without lora_a"),
    "lora-rank-mismatch": (dict(lora_a=(R, IN), lora_b=(OUT, R + 1)), "LoRA shapes"),
    "m-not-prefix": (dict(m1=(5,)), "m1 has shape"),
    "m-too-long": (dict(m1=(2, 5, IN)), "m1 has shape"),
    "m2-not-prefix": (dict(m2=(3,)), "m2 has shape"),
    "m-nan-float": (dict(m1=float("nan")), "m1 must be finite"),
    "m-nan-tensor": (dict(m1="nan"), "m1 holds NaN"),
    "weight-dtype": (dict(weight_dtype=torch.float64), "weight has dtype"),
    "m-int": (dict(m1="int"), "m1 must be a floating tensor"),
    "backend": (dict(backend="cuda"), "backend must be one of"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_names_the_argument(case, debug_mode):
    """Every bad input is an error naming the argument ("m-nan-tensor" reads values: debug mode)."""
    spec, message = BAD[case]
    r = lambda *s: torch.randn(*s)
    args = dict(x=r(2, 5, IN), weight=r(OUT, IN))
    kwargs = {}
    for k, v in spec.items():
        if k == "weight_dtype":
            args["weight"] = args["weight"].to(v)
        elif k in ("m1", "m2"):
            kwargs[k] = ({"nan": torch.tensor([1.0, float("nan")]), "int": torch.tensor([1, 2])}.get(v)
                         if isinstance(v, str) else (v if isinstance(v, float) else r(*v)))
        elif k == "backend":
            kwargs[k] = v
        elif k == "x":
            args["x"] = r(*v)
        else:
            kwargs[k] = r(*v)
    with pytest.raises((ValueError, TypeError), match=message):
        steered_linear(args["x"], args["weight"], kwargs.pop("bias", None), **kwargs)


def test_native_backend_refusal_is_clear():
    with pytest.raises(ValueError, match=r"steered_linear has no native kernel.*'triton'"):
        steered_linear(torch.randn(2, IN), torch.randn(OUT, IN), backend="native")


def test_unavailable_backend_refusal_is_clear(monkeypatch):
    monkeypatch.setattr(_backend, "TRITON_VERSION", None)
    with pytest.raises(RuntimeError, match=r"backend='triton' is unavailable: Triton is not installed"):
        steered_linear(torch.randn(2, IN), torch.randn(OUT, IN), backend="triton")
    assert _backend.resolve("auto", torch.device("cpu")) == "torch"  # auto never fails for want of one


@pytest.mark.gpu
def test_device_mismatch():
    with pytest.raises(ValueError, match="weight is on"):
        steered_linear(torch.randn(2, IN, device="cuda"), torch.randn(OUT, IN))


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_triton_opcheck(form):
    from fastsplit.kernels import steered_linear as k

    t = {key: (v.detach() if v is not None else None) for key, v in make_inputs(form, 5, torch.float32).items()}
    x = t["x"].reshape(-1, IN)
    rows = torch.randn(x.shape[0], device=x.device)
    torch.library.opcheck(k.steered_linear_fwd, (x, t["weight"], t["bias"], t.get("delta_weight"),
                                                 t.get("lora_a"), t.get("lora_b"), t["delta_bias"], rows, None,
                                                 0.0, 0.5))


@pytest.mark.parametrize("backend", ["triton"])
def test_planted_bug_fails_the_new_tolerance(backend, monkeypatch):
    """A mutation the old fixed tolerance (atol = rtol = 2e-4) let through on 5 of 5 seeds: the per-row factors
    reach the kernel scaled by 1 + 2e-5. The flash-attention rule catches it; the clean run passes."""
    from fastsplit.ops import steered_linear as op

    m = make_multiplier("per_row", 7)
    check_against_reference(backend, torch.float32, "local_weight", 7, m, None)  # clean: passes
    real = op.multiplier_rows
    monkeypatch.setattr(op, "multiplier_rows", lambda mm, lead: None if real(mm, lead) is None
                        else real(mm, lead) * (1 + 2e-5))
    with pytest.raises(AssertionError, match="exceeds 3x the torch path"):
        check_against_reference(backend, torch.float32, "local_weight", 7, m, None)
