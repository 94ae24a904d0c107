"""The Triton decode kernel (``fastsplit.kernels.steered_linear``) against the float64 reference, on its own launcher:
row counts on both sides of each row tile, K long enough to be split (two programs per "SM" under the interpreter),
every form and m kind, outputs NaN-poisoned (this folder's conftest), and the launch plan's invariants."""
import pytest
import torch

from fastsplit import steered_linear_ref
from fastsplit.kernels import steered_linear as k
from fastsplit.ops._checks import multiplier_rows
from tests.helpers import DEVICE, assert_close

N, R = 77, 3


def _case(form, rows, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)
    t = {"x": r(rows, K), "weight": r(N, K, scale=K ** -0.5), "bias": r(N), "delta_bias": r(N)}
    if form == "lora":
        t["lora_a"], t["lora_b"] = r(R, K, scale=K ** -0.5), r(N, R, scale=0.5)
    elif form == "local_weight":
        t["delta_weight"] = r(N, K, scale=K ** -0.5)
    return t, {key: v.to(DEVICE, dtype) for key, v in t.items()}


def _run(t, m1, m2):
    rows1, rows2 = multiplier_rows(m1, (t["x"].shape[0],)), multiplier_rows(m2, (t["x"].shape[0],))
    return k.launch_fwd(t["x"], t["weight"], t["bias"], t.get("delta_weight"), t.get("lora_a"), t.get("lora_b"),
                        t["delta_bias"], rows1, rows2, 0.0 if rows1 is not None else m1,
                        0.0 if rows2 is not None else m2)


@pytest.mark.parametrize("K", [123, 600], ids=["K123", "K600-split"])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 64, 77], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("mkind", ["scalar", "per_row"])
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
def test_decode_kernel_matches_reference(form, mkind, rows, K):
    t64, t = _case(form, rows, K)
    m = 1.7 if mkind == "scalar" else torch.linspace(-2, 3, rows, dtype=torch.float64)
    m2 = -0.6 if mkind == "scalar" else torch.linspace(1, -1, rows, dtype=torch.float64)
    dev = lambda v: v.to(DEVICE, torch.float32) if isinstance(v, torch.Tensor) else v
    y = _run(t, dev(m), dev(m2))
    ref = steered_linear_ref(t64["x"], t64["weight"], t64["bias"], **{key: t64[key] for key in t64
                             if key not in ("x", "weight", "bias")}, m1=m, m2=m2)
    assert_close(y, ref.to(DEVICE), torch.float32, f"{form}-{mkind}-{rows}x{K}")


@pytest.mark.parametrize("M,N_,K,sms", [(1, 18944, 3584, 132), (16, 3584, 18944, 132), (64, 4096, 4096, 132),
                                         (1, 77, 123, 2), (3, 77, 600, 2), (4096, 3584, 18944, 132)])
def test_launch_plan(M, N_, K, sms):
    bm, bn, split, per = k.plan(M, N_, K, sms)
    assert bm >= 16 and bm >= min(M, 64) and bn == k.BLOCK_N_DECODE
    assert per % k.K_ALIGN == 0 and split * per >= K and (split - 1) * per < K  # every K once, no empty split
    assert 1 <= split <= k.MAX_SPLIT
    programs = -(-M // bm) * -(-N_ // bn) * split
    if split > 1:  # a split only where the feature tiles alone fall short of the waves
        assert -(-M // bm) * -(-N_ // bn) < k.WAVES_PER_SM * sms
    # Rounding each split's K up to K_ALIGN can lose a split or two, never half the target.
    assert 2 * programs >= min(k.WAVES_PER_SM * sms, -(-M // bm) * -(-N_ // bn) * -(-K // k.K_ALIGN))


def test_plan_of_the_h200_shapes():
    assert k.plan(1, 3584, 18944, 132) == (16, 64, 10, 2048)  # 56 feature tiles: K split ten ways
    assert k.plan(16, 18944, 3584, 132) == (16, 64, 2, 1792)  # 296 feature tiles: split in two


def test_traced_launch_path_matches():
    """The path torch.compile traces (launches through wrap_triton), run eagerly: the same numbers."""
    _, t = _case("lora", 5, 600)
    m = torch.linspace(-1, 1, 5, device=DEVICE)
    args = (t["x"], t["weight"], t["bias"], None, t["lora_a"], t["lora_b"], t["delta_bias"], m, m, 0.0, 0.0)
    torch.testing.assert_close(k.launch_fwd(*args, traced=True), k.launch_fwd(*args))


def test_empty_rows():
    _, t = _case("vector", 1, 123)
    y = k.launch_fwd(t["x"][:0], t["weight"], t["bias"], None, None, None, None, None, None, 1.0, 1.0)
    assert y.shape == (0, N)


def test_footprint_counts_every_pipelined_operand():
    need = k.footprint(2, block_m=16, block_n=64, has_dw=True, has_lora=False, block_r=16)
    pipe = k.PIPELINE_BYTES  # the pipeline's barriers beside the tiles
    assert need({"BLOCK_K": 256, "num_stages": 4, "num_warps": 4}) == 4 * (16 * 256 + 2 * 64 * 256) * 2 + pipe
    lora = k.footprint(2, block_m=16, block_n=64, has_dw=False, has_lora=True, block_r=16)
    assert lora({"BLOCK_K": 128, "num_stages": 3, "num_warps": 4}) == 3 * (16 + 64) * 128 * 2 + (16 + 64) * 16 * 4 + pipe
