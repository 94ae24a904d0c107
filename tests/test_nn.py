"""SteeredLinear: a drop-in nn.Linear with a steering update."""
import pytest
import torch

from fastsplit import SteeredLinear, steered_linear_ref
from tests.helpers import HAS_CUDA

FORMS = ["vector", "lora", "local_weight"]


@pytest.mark.parametrize("form", FORMS)
def test_from_linear_shares_and_freezes_base(form):
    base = torch.nn.Linear(13, 7)
    layer = SteeredLinear.from_linear(base, form=form, rank=3)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad and not base.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    expected = {"vector": {"delta_bias"}, "lora": {"delta_bias", "lora_a", "lora_b"},
                "local_weight": {"delta_bias", "delta_weight"}}[form]
    assert trainable == expected
    if form == "lora":
        assert layer.lora_a.shape == (3, 13) and layer.lora_b.shape == (7, 3)
        assert layer.lora_a.abs().sum() > 0 and layer.lora_b.abs().sum() == 0
    x = torch.randn(4, 13)
    torch.testing.assert_close(layer(x), base(x))  # starts as the base layer


@pytest.mark.parametrize("form", FORMS)
def test_zero_multiplier_equals_base_exactly(form):
    base = torch.nn.Linear(13, 7)
    layer = SteeredLinear.from_linear(base, form=form, rank=3)
    for p in layer.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    layer.multiplier = 0.0
    x = torch.randn(2, 5, 13)
    assert torch.equal(layer(x), base(x))
    layer.multiplier = torch.zeros(2)
    assert torch.equal(layer(x), base(x))


def test_per_row_multiplier_equals_separate_runs():
    base = torch.nn.Linear(13, 7)
    layer = SteeredLinear.from_linear(base, form="lora", rank=2)
    torch.nn.init.normal_(layer.lora_b)
    torch.nn.init.normal_(layer.delta_bias)
    x = torch.randn(3, 4, 13)
    ms = [-1.0, 0.5, 4.0]
    layer.multiplier = torch.tensor(ms)
    batched = layer(x)
    for i, m in enumerate(ms):
        layer.multiplier = m
        torch.testing.assert_close(batched[i], layer(x[i:i + 1])[0])


def test_bias_multiplier_and_repr():
    layer = SteeredLinear.from_linear(torch.nn.Linear(13, 7), form="lora", rank=3, multiplier=2.5)
    torch.nn.init.normal_(layer.lora_b)
    torch.nn.init.normal_(layer.delta_bias)
    layer.bias_multiplier = torch.tensor([1.0, -1.0])
    x = torch.randn(2, 13)
    ref = steered_linear_ref(x, layer.weight, layer.bias, lora_a=layer.lora_a, lora_b=layer.lora_b,
                             delta_bias=layer.delta_bias, m1=2.5, m2=torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(layer(x), ref)
    r = repr(layer)
    assert "form=lora" in r and "rank=3" in r and "multiplier=2.5" in r and "bias_multiplier=tensor[2]" in r


def test_constructor_and_bad_options():
    layer = SteeredLinear(9, 4, form="local_weight")
    assert layer.delta_weight.shape == (4, 9) and not layer.weight.requires_grad
    with pytest.raises(ValueError, match="form must be one of"):
        SteeredLinear.from_linear(torch.nn.Linear(3, 2), form="prefix")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        SteeredLinear.from_linear(torch.nn.Linear(3, 2), form="lora", rank=0)
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        SteeredLinear.from_linear(torch.nn.Conv1d(3, 2, 1))


def test_local_weight_can_train_base():
    base = torch.nn.Linear(6, 5)
    layer = SteeredLinear.from_linear(base, form="local_weight", freeze_base=False)
    layer(torch.randn(3, 6)).sum().backward()
    assert base.weight.grad is not None and layer.delta_weight.grad is not None


def _compile_check(device, backend):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24).to(device)
    steer = SteeredLinear.from_linear(lin, form="lora", rank=4, backend=backend)
    torch.nn.init.normal_(steer.lora_b)
    torch.nn.init.normal_(steer.delta_bias)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), steer).to(device)
    x = torch.randn(3, 5, 16, device=device)
    steer.multiplier = torch.tensor([0.5, -1.0, 2.0], device=device)

    def run(m):
        for p in model.parameters():
            p.grad = None
        y = m(x)
        (y ** 2).sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    y_e, g_e = run(model)
    y_c, g_c = run(torch.compile(model, fullgraph=False))
    torch.testing.assert_close(y_c, y_e, atol=1e-4, rtol=1e-4)
    assert g_c.keys() == g_e.keys()
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k], atol=1e-4, rtol=1e-4)


def test_torch_compile_matches_eager_cpu():
    _compile_check("cpu", "torch")


@pytest.mark.gpu
def test_torch_compile_matches_eager_triton():
    _compile_check("cuda", "triton")
