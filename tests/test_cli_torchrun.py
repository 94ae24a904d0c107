"""``torchrun --nproc-per-node 2 -m fastsplit ...`` on the CPU (gloo) against the same command in one process:
the same outputs, written once by rank 0, and a clear refusal with nothing written."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastsplit.cli import main
from tests.test_cli import model_dir  # noqa: F401 - the tiny saved model, a fixture

MS = "--multipliers=" + ",".join(str(v) for v in range(-5, 6))


def _torchrun(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "fastsplit", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_steerings(model_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("steer")
    files = []
    for layer in (1, 2):
        out = str(root / f"layer{layer}")
        assert main(["train", "--model", model_dir, "--layer", str(layer), "--epochs", "1", "--test-size", "0.9",
                     "--out", out, "--quiet"]) == 0
        files.append(os.path.join(out, "steering.safetensors"))
    return files


def test_torchrun_sweep_of_two_files_equals_one_process(model_dir, two_steerings, tmp_path):  # noqa: F811
    common = ["sweep", "--model", model_dir, "--steering", *two_steerings, "--data", "demo", "--max-pairs", "5", MS,
              "--bootstrap", "0", "--device", "cpu", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    r = _torchrun(*common, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("preference fit R²") == 2  # rank 0 reports, once per steering file
    for run in ("layer1-steering", "layer2-steering"):
        one, two = _rows(tmp_path / "one" / run / "sweep.csv"), _rows(tmp_path / "two" / run / "sweep.csv")
        assert len(one) == len(two) == 5 * 11
        for a, b in zip(one, two):
            assert (a["pair"], a["group"], a["multiplier"]) == (b["pair"], b["group"], b["multiplier"])
            for k in ("nll_pos", "nll_neg"):
                # Shards batch other pairs together (other padding, other GEMM shapes): float32 sums of ~70
                # nats then differ in their last bits (1.5e-5 seen), so 1e-5 plus 4e-7 relative.
                assert abs(float(a[k]) - float(b[k])) <= 1e-5 + 4e-7 * abs(float(b[k])), (run, k)
        assert sorted(os.listdir(tmp_path / "two" / run)) == ["fit.json", "plot.png", "plot.svg", "sweep.csv"]


def test_torchrun_training_equals_one_process(model_dir, tmp_path):  # noqa: F811
    common = ["train", "--model", model_dir, "--layer", "1", "--form", "lora", "--rank", "2", "--epochs", "1",
              "--test-size", "0.9", "--device", "cpu", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    r = _torchrun(*common, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained lora at layer 1") == 1
    one = load_file(tmp_path / "one" / "steering.safetensors")
    two = load_file(tmp_path / "two" / "steering.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=0, msg=k)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert not [f for f in os.listdir(tmp_path / "two") if f.startswith(".tmp-")]


def test_torchrun_refuses_more_ranks_than_pairs_before_writing(model_dir, two_steerings, tmp_path):  # noqa: F811
    out = tmp_path / "none"
    r = _torchrun("sweep", "--model", model_dir, "--steering", two_steerings[0], "--data", "demo", "--max-pairs", "1",
                  MS, "--device", "cpu", "--out", str(out), "--quiet")
    assert r.returncode != 0
    assert "world size 2 is larger than the number of pairs (1)" in r.stderr
    assert not out.exists()
