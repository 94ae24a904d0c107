"""Every Triton autotune config against the shared memory a block may use, on the CPU (no GPU needed).

The footprints are what Triton's pipeliner allocates; they reproduce the three figures an H100 refused
(245,760 and 393,216 / 327,680 bytes), so a config that would fail to compile is pruned before launch.
"""
import itertools

import pytest
import torch

from fastsplit.kernels import _common
from fastsplit.kernels import split_loss as ksl
from fastsplit.kernels import steered_linear as kst

BUDGETS = {"hopper-227KiB": _common.HOPPER_SMEM, "ada-99KiB": _common.CONSUMER_SMEM}
DTYPES = {"f32": 4, "f16": 2, "bf16": 2}


def _steered_cases():
    """(name, footprint, configs, fixed configs) for every form, m kind and dtype of both kernels."""
    fixed_fwd = list(kst.FIXED_FWD.values())
    for (dt, es), (form, per_row) in itertools.product(DTYPES.items(), [
            ("vector", False), ("vector", True), ("lora", False), ("lora", True),
            ("local_weight", False), ("local_weight", True)]):
        # FOLD (scalar m) still loads the ΔW tile, so both local_weight cases count two B operands.
        fp = kst.fwd_footprint(es, has_dw=form == "local_weight", has_lora=form == "lora", block_r=16)
        yield f"fwd-{form}-{'row' if per_row else 'scalar'}-{dt}", fp, kst.gpu_fwd_configs(), fixed_fwd
        fp = kst.bwd_footprint(es, per_row_dw=form == "local_weight" and per_row)
        yield f"bwd-{form}-{'row' if per_row else 'scalar'}-{dt}", fp, kst.gpu_bwd_configs(), [kst.FIXED_BWD["any"]]
    for dt, es in DTYPES.items():
        yield (f"split-fwd-{dt}", ksl.fwd_footprint(es, ksl.GPU_BLOCK_V),
               ksl._configs(ksl.FWD_NAMES, ksl.FWD_TABLE, interpret=False), [ksl.FIXED_FWD])
        yield (f"split-bwd-{dt}", ksl.bwd_footprint(es),
               ksl._configs(ksl.BWD_NAMES, ksl.BWD_TABLE, interpret=False), [ksl.FIXED_BWD])


CASES = list(_steered_cases())


def test_footprints_reproduce_what_an_h100_refused():
    meta = lambda bm, bn, bk, s: {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_stages": s, "num_warps": 8}
    lw = lambda es: kst.fwd_footprint(es, has_dw=True, has_lora=False, block_r=16)
    assert lw(2)(meta(128, 256, 64, 3)) == 245_760  # local_weight per-row, bf16
    assert lw(4)(meta(128, 128, 64, 4)) == 393_216  # fp32
    assert lw(4)(meta(64, 128, 64, 4)) == 327_680


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


def test_pruner_leaves_cpu_launches_alone_and_prunes_on_a_device_budget(monkeypatch):
    prune = _common.pruner(lambda named, kw: kst.fwd_footprint(4, has_dw=True, has_lora=False, block_r=16))
    configs = kst.gpu_fwd_configs()
    assert prune["early_config_prune"](configs, {"X": torch.zeros(1)}) == configs  # CPU tensor: untouched

    class FakeCuda:  # a CUDA tensor as the pruner sees it
        device = torch.device("cuda", 0)

        def data_ptr(self):
            return 0

    monkeypatch.setattr(_common, "smem_budget", lambda index: _common.CONSUMER_SMEM)
    kept = prune["early_config_prune"](configs, {"X": FakeCuda()})
    assert 0 < len(kept) < len(configs)


def test_fits_never_returns_an_empty_list():
    configs = kst.gpu_fwd_configs()
    kept = _common.fits(configs, lambda c: 10 ** 9, budget=1)
    assert len(kept) == 1
