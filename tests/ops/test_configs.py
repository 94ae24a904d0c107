"""Every Triton autotune config against the shared memory a block may use, on the CPU (no GPU needed).

The footprints are what Triton's pipeliner allocates; they reproduce the figures an H100 and an H200 refused
(245,760 and 393,216 / 327,680 bytes), so a config that would fail to compile never reaches the autotuner.
"""
import itertools
import json

import pytest
import torch

from fastsplit.kernels import _common
from fastsplit.kernels import steered_linear as kst

BUDGETS = {"hopper-227KiB": _common.HOPPER_SMEM, "ada-99KiB": _common.CONSUMER_SMEM}
DTYPES = {"f32": 4, "f16": 2, "bf16": 2}


def _steered_cases():
    """(name, footprint, configs, fixed configs) for every form, row tile and dtype of the decode kernel."""
    for (dt, es), form, bm in itertools.product(DTYPES.items(), ["vector", "lora", "local_weight"], [16, 32, 64]):
        fp = kst.footprint(es, block_m=bm, block_n=kst.BLOCK_N_DECODE, has_dw=form == "local_weight",
                           has_lora=form == "lora", block_r=16)
        yield f"decode-{form}-bm{bm}-{dt}", fp, kst.gpu_configs(), [kst.FIXED]


CASES = list(_steered_cases())


H200_REFUSED = {"BLOCK_K": 64, "num_stages": 3, "num_warps": 8}  # with a 128 x 256 tile: what the H200 refused


def test_footprints_reproduce_what_an_h100_and_an_h200_refused():
    lw = lambda es, bm, bn: kst.footprint(es, block_m=bm, block_n=bn, has_dw=True, has_lora=False, block_r=16)
    # the tiles, plus the pipeline's barriers (PIPELINE_BYTES, seen on sm_100 by check_targets)
    pipe = kst.PIPELINE_BYTES
    assert lw(2, 128, 256)(H200_REFUSED) == 245_760 + pipe  # local_weight per-row, bf16: "Required: 245760"
    assert lw(4, 128, 128)({"BLOCK_K": 64, "num_stages": 4}) == 393_216 + pipe  # fp32
    assert lw(4, 64, 128)({"BLOCK_K": 64, "num_stages": 4}) == 327_680 + pipe


def test_the_refused_config_is_pruned_at_the_h200_budget():
    """The config that raised OutOfResources under autotuning: 245,760 bytes against the H200's 232,448."""
    import triton

    fp = kst.footprint(2, block_m=128, block_n=256, has_dw=True, has_lora=False, block_r=16)
    refused = triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=3)
    smaller = triton.Config({"BLOCK_K": 64}, num_warps=8, num_stages=2)
    assert _common.fits([refused, smaller], fp, 232_448) == [smaller]
    assert _common.fits([refused, smaller], fp, 245_760 + kst.PIPELINE_BYTES) == [refused, smaller]


def test_default_launch_takes_the_first_fitting_config(monkeypatch):
    """Without autotuning the launch takes the first config (in preference order) that fits the budget."""
    monkeypatch.setattr(_common, "triton_interpreting", lambda: False)
    monkeypatch.setattr(_common, "fixed_configs", lambda: False)
    monkeypatch.setattr(_common, "autotune", lambda: False)
    device = torch.device("cuda", 0)
    for budget in (232_448, 101_376):
        monkeypatch.setattr(_common, "smem_budget", lambda index: budget)
        for es, bm, has_dw in itertools.product((2, 4), (16, 64), (False, True)):
            fp = kst.footprint(es, block_m=bm, block_n=64, has_dw=has_dw, has_lora=False, block_r=16)
            kernel, meta = _common.tuned(kst._steered_linear_fwd_kernel, kst.gpu_configs, fp, device, key=["M"],
                                         fixed=kst.FIXED, interpret=kst.INTERPRET_CONFIG)
            first = next(c for c in kst.gpu_configs() if fp(_common.config_meta(c)) <= budget)
            assert kernel is kst._steered_linear_fwd_kernel and meta == _common.config_launch_meta(first)
            assert fp(meta) <= budget


def test_tuned_builds_the_autotuner_from_fitting_configs_only(monkeypatch):
    """With FASTSPLIT_AUTOTUNE=1 on a (faked) CUDA device the autotuner is made from the configs that fit, before
    anything compiles."""
    monkeypatch.setattr(_common, "triton_interpreting", lambda: False)
    monkeypatch.setattr(_common, "fixed_configs", lambda: False)
    monkeypatch.setattr(_common, "autotune", lambda: True)
    monkeypatch.setattr(_common, "smem_budget", lambda index: 232_448)
    monkeypatch.setattr(_common, "_TUNERS", {})
    fp = kst.footprint(2, block_m=64, block_n=64, has_dw=True, has_lora=False, block_r=16)
    device = torch.device("cuda", 0)
    tuner, meta = _common.tuned(kst._steered_linear_fwd_kernel, kst.gpu_configs, fp, device, key=["M"],
                                fixed=kst.FIXED, interpret=kst.INTERPRET_CONFIG)
    assert meta == {}
    kept = tuner.configs
    assert kept and all(fp(_common.config_meta(c)) <= 232_448 for c in kept)
    assert len(kept) == sum(fp(_common.config_meta(c)) <= 232_448 for c in kst.gpu_configs()) < len(kst.gpu_configs())
    again, _ = _common.tuned(kst._steered_linear_fwd_kernel, kst.gpu_configs, fp, device, key=["M"],
                             fixed=kst.FIXED, interpret=kst.INTERPRET_CONFIG)
    assert again is tuner  # built once per kernel, budget and footprints
    monkeypatch.setattr(_common, "fixed_configs", lambda: True)
    kernel, meta = _common.tuned(kst._steered_linear_fwd_kernel, kst.gpu_configs, fp, device, key=["M"],
                                 fixed=kst.FIXED, interpret=kst.INTERPRET_CONFIG)
    assert kernel is kst._steered_linear_fwd_kernel and meta["num_stages"] == kst.FIXED.num_stages


@pytest.mark.parametrize("budget", list(BUDGETS.values()), ids=list(BUDGETS))
@pytest.mark.parametrize("name,footprint,configs,fixed", CASES, ids=[c[0] for c in CASES])
def test_pruning_keeps_exactly_the_configs_that_fit(name, footprint, configs, fixed, budget):
    kept = _common.fits(configs, footprint, budget)
    needs = [footprint(_common.config_meta(c)) for c in configs]
    assert kept, name
    assert all(footprint(_common.config_meta(c)) <= budget for c in kept), "a kept config overflows"
    assert len(kept) == sum(n <= budget for n in needs), "a config that fits was dropped"
    for c in fixed:  # the one-config-per-shape-class mode of the test suite fits everywhere too
        assert footprint(_common.config_meta(c)) <= budget, f"{name}: fixed config {c} overflows"


def test_fits_never_returns_an_empty_list():
    configs = kst.gpu_configs()
    kept = _common.fits(configs, lambda c: 10 ** 9, budget=1)
    assert len(kept) == 1


def test_budget_is_tritons_own_figure(monkeypatch):
    """The budget comes from Triton's device properties (what its OutOfResources compares with), faked here."""
    import types

    import triton

    fake = types.SimpleNamespace(active=types.SimpleNamespace(utils=types.SimpleNamespace(
        get_device_properties=lambda index: {"max_shared_mem": 232_448, "multiprocessor_count": 132})))
    monkeypatch.setattr(triton.runtime, "driver", fake)
    assert _common.smem_budget.__wrapped__(0) == 232_448


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
def test_every_fitting_config_compiles_and_runs_on_this_device(form, monkeypatch):
    """Each config that survives the prune, once, at a small odd shape in bf16 with per-row m: none may raise
    OutOfResources, and each matches the torch path."""
    import triton

    from fastsplit import steered_linear

    budget = _common.smem_budget(torch.cuda.current_device())
    fp = kst.footprint(2, block_m=16, block_n=kst.BLOCK_N_DECODE, has_dw=form == "local_weight",
                       has_lora=form == "lora", block_r=16)
    x = torch.randn(5, 600, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(77, 600, device="cuda", dtype=torch.bfloat16) * 0.05
    kw = {"delta_bias": torch.randn(77, device="cuda", dtype=torch.bfloat16)}
    if form == "lora":
        kw.update(lora_a=torch.randn(3, 600, device="cuda", dtype=torch.bfloat16) * 0.05,
                  lora_b=torch.randn(77, 3, device="cuda", dtype=torch.bfloat16))
    elif form == "local_weight":
        kw["delta_weight"] = torch.randn(77, 600, device="cuda", dtype=torch.bfloat16) * 0.05
    m = torch.linspace(-2, 2, 5, device="cuda")
    want = steered_linear(x, w, **kw, m1=m, backend="torch")
    monkeypatch.setattr(_common, "fixed_configs", lambda: True)
    for cfg in _common.fits(kst.gpu_configs(), fp, budget):
        monkeypatch.setattr(kst, "FIXED", cfg)
        got = steered_linear(x, w, **kw, m1=m, backend="triton")
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2, msg=lambda s: f"{cfg}: {s}")


# --- configs that spill registers (the spill table of python -m fastsplit.kernels.check_targets) -------------------
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _on_cuda(monkeypatch, budget=232_448):
    monkeypatch.setattr(_common, "triton_interpreting", lambda: False)
    monkeypatch.setattr(_common, "fixed_configs", lambda: False)
    monkeypatch.setattr(_common, "autotune", lambda: False)
    monkeypatch.setattr(_common, "smem_budget", lambda index: budget)
    return torch.device("cuda", 0)


def test_a_config_that_spills_is_skipped_by_the_default_launch(monkeypatch):
    device = _on_cuda(monkeypatch)
    fp = kst.footprint(2, block_m=16, block_n=64, has_dw=False, has_lora=False, block_r=16)
    launch = lambda drop: _common.tuned(kst._steered_linear_fwd_kernel, kst.gpu_configs, fp, device, key=["M"],
                                        fixed=kst.FIXED, interpret=kst.INTERPRET_CONFIG, drop=drop)[1]
    configs = kst.gpu_configs()
    assert launch(()) == _common.config_launch_meta(configs[0])
    assert launch({0: 16}) == _common.config_launch_meta(configs[1])  # the first that fits and does not spill
    assert launch({0: 16, 1: 8}) == _common.config_launch_meta(configs[2])
    # where every config that fits spills, the one that spills least still launches (spilling beats not running)
    fits_two = lambda c: 1 if c["BLOCK_K"] == 64 and c["num_stages"] in (2, 3) else 10 ** 9
    a, b = [i for i, c in enumerate(configs) if fits_two(_common.config_meta(c)) == 1]  # (64, 4, 3), (64, 4, 2)
    least = _common.tuned(kst._steered_linear_fwd_kernel, kst.gpu_configs, fits_two, device, key=["M"],
                          fixed=kst.FIXED, interpret=kst.INTERPRET_CONFIG, drop={a: 900, b: 8})[1]
    assert least == _common.config_launch_meta(configs[b])
    assert _common.without_spills(configs, fits_two, 100, {a: 900, b: 8}) == [b]
    assert _common.without_spills(configs, fits_two, 100, {b: 8}) == [a]


def test_the_shipped_spill_table_is_keyed_as_the_launch_looks_it_up(monkeypatch):
    table = _common.spill_table()
    assert table, "fastsplit/kernels/spills.json is missing or empty"
    n = len(kst.gpu_configs())
    for (target, kernel, variant), configs in table.items():
        d = json.loads(variant)
        flags = {k: v for k, v in d.items() if k not in ("M_IS_1", "dtype")}
        rows = 1 if d["M_IS_1"] else flags["BLOCK_M"]
        assert kst.spill_variant(flags, rows, _DTYPES[d["dtype"]]) == variant
        assert kernel == kst.KERNEL and target.startswith("sm_") and configs
        assert all(0 <= i < n and spilled > 0 for i, spilled in configs.items())
    # a device of that target finds the entry at launch (one cached probe per variant)
    monkeypatch.setattr(kst, "_INTERPRET", False)
    monkeypatch.setattr(_common, "device_target", lambda index: target)
    kst._spilling.cache_clear()
    try:
        assert kst.spilling_configs(flags, rows, _DTYPES[d["dtype"]], torch.device("cuda", 0)) == configs
        assert kst.spilling_configs(flags, rows, _DTYPES[d["dtype"]], torch.device("cpu")) == {}
    finally:
        kst._spilling.cache_clear()


def test_the_tuner_records_a_spilling_config_as_refused(monkeypatch):
    import types

    from fastsplit.ops import steered_linear as ops_sl

    monkeypatch.setattr(kst, "spilling_configs", lambda flags, M, dtype, device: {3: 44})
    monkeypatch.setattr(kst, "_sm_count", lambda device: 132)
    monkeypatch.setattr(_common, "device_target", lambda index: "sm_90")
    x = types.SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cuda", 0))
    refused = ops_sl._spilling_refusals(4, 3584, 18944, x, True, True, 0)
    assert refused == {"triton:cfg3": "spills 44 B of registers on sm_90 (python -m fastsplit.kernels.check_targets)"}
    with pytest.raises(RuntimeError, match="spills 44 B"):  # the tuner runs it, records the error, never routes there
        ops_sl._refuse(refused["triton:cfg3"])()


def test_a_spill_table_of_another_format_is_refused_in_one_line(monkeypatch, tmp_path):
    bad = tmp_path / "spills.json"
    bad.write_text('{"format": "something/else"}')
    monkeypatch.setattr(_common, "SPILLS_FILE", str(bad))
    _common.spill_table.cache_clear()
    try:
        with pytest.raises(ValueError, match="is not a fastsplit.spills/1 table: regenerate it"):
            _common.spill_table()
    finally:
        monkeypatch.undo()
        _common.spill_table.cache_clear()
