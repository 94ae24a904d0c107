"""Resumable sweeps and generations, balanced shards, a rank killed half-way, and two "nodes" on 127.0.0.1.

A sweep (or generation) writes its finished pairs (prompts) in blocks; a resumed one skips them and ends equal to an
uninterrupted run; blocks of other inputs are refused; a rank killed with SIGKILL under torchrun leaves only whole
blocks and the resumed command completes; two torchrun launchers with one rank each (--nnodes 2) equal one process.
"""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastsplit
from fastsplit import dist as fdist
from fastsplit.analysis import Sweep, analyze
from fastsplit.engines import transformers as lo
from fastsplit.cli import main
from tests.test_cli import model_dir  # noqa: F401 - the tiny saved model, a fixture
from tests.tiny import randomize, tiny_model, tiny_tokenizer

PAIRS = fastsplit.demo_pairs()[:10]
MS = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]


def test_shard_by_work_balances_and_covers_every_item(monkeypatch):
    costs = [9, 1, 1, 1, 1, 1, 1, 1, 1, 5, 5]
    shards = []
    for r in range(3):
        monkeypatch.setattr(fdist, "rank", lambda g=None, r=r: r)
        monkeypatch.setattr(fdist, "world_size", lambda g=None: 3)
        shards.append(fdist.shard_by_work(costs, object()))
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= 1 and max(loads) == 9  # the costliest item alone is the floor
    contiguous = [sum(costs[s.start:s.stop]) for s in (range(0, 4), range(4, 8), range(8, 11))]
    assert max(loads) < max(contiguous)  # what equal counts gave: 12


def test_run_tasks_reports_the_work_finished_in_one_process():
    seen = []
    out = fdist.run_tasks(lambda i: i * 10, 3, None, sizes=[0.5, 1, 2], on_done=lambda i, f: seen.append((i, f)))
    assert out == [0, 10, 20] and seen == [(0, 0.5), (1, 1.5), (2, 3.5)]
    with pytest.raises(ValueError, match="sizes has 2 entries for 3 tasks"):
        fdist.run_tasks(lambda i: i, 3, None, sizes=[1, 1])


def test_sweep_batches_hold_pairs_of_similar_lengths_costliest_first():
    """The sweep's batches (which the ranks take from a counter): every pair once, pairs of similar lengths together
    (less padding), and the costliest batch first, so the ranks end on small ones."""
    rng = np.random.default_rng(3)
    enc = [([1] * int(rng.integers(5, 40)), [2] * int(rng.integers(1, 6)), [3] * int(rng.integers(1, 6)))
           for _ in range(11)]
    batches = lo._batches(enc, 3, 4)
    assert sorted(i for b in batches for i in b) == list(range(11)) and [len(b) for b in batches].count(2) == 1
    rest = lambda b: max(len(enc[i][0]) for i in b) - 4
    comp = lambda b: max(max(len(enc[i][1]), len(enc[i][2])) for i in b)
    costs = [len(b) * (rest(b) + 2 * (1 + comp(b))) for b in batches]
    assert costs == sorted(costs, reverse=True)
    by_length = sorted(range(11), key=lambda i: (len(enc[i][0]), max(len(enc[i][1]), len(enc[i][2]))))
    assert sorted(map(sorted, batches)) == sorted(sorted(by_length[s:s + 3]) for s in range(0, 11, 3))
    # split_last: the last batches go as one pair each (ranks then finish within about one pair of each other)
    split = lo._batches(enc, 3, 4, split_last=2)
    assert split[:2] == batches[:2] and sorted(i for b in split[2:] for i in b) == sorted(batches[2] + batches[3])
    assert [len(b) for b in split[2:]] == [1] * (len(batches[2]) + len(batches[3]))
    assert [len(b) for b in lo._batches(enc, 3, 4, split_last=9)] == [1] * 11


def _steering(model):
    s = fastsplit.attach(model, 2, "lora", rank=2)
    randomize(s, scale=0.3)
    return s


class _Killed(Exception):
    pass


def _cut_after(monkeypatch, blocks: int):
    """Make the run stop (an exception) right after it wrote ``blocks`` blocks: a process killed there."""
    real = fdist.Blocks.write
    count = {"n": 0}

    def write(self, items):
        real(self, items)
        count["n"] += 1
        if count["n"] == blocks:
            raise _Killed()
    monkeypatch.setattr(fdist.Blocks, "write", write)
    return lambda: monkeypatch.setattr(fdist.Blocks, "write", real)


def test_a_resumed_sweep_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = _steering(model)
    whole = fastsplit.logodds_sweep(model, tok, s, PAIRS, MS, progress=False, batch_size=2)
    ckpt = str(tmp_path / "blocks")
    restore = _cut_after(monkeypatch, 2)
    with pytest.raises(_Killed):
        fastsplit.logodds_sweep(model, tok, s, PAIRS, MS, progress=False, batch_size=2, checkpoint_dir=ckpt)
    restore()
    assert len([f for f in os.listdir(ckpt) if f.startswith("block-")]) == 2
    swept = []
    real = lo._sweep_nll
    monkeypatch.setattr(lo, "_sweep_nll", lambda m, st, enc, *a, **k: swept.append(len(enc)) or real(m, st, enc, *a,
                                                                                                     **k))
    resumed = fastsplit.logodds_sweep(model, tok, s, PAIRS, MS, progress=False, batch_size=2, checkpoint_dir=ckpt,
                                      resume=True)
    assert swept == [6]  # the 4 pairs of the two blocks were not swept again
    np.testing.assert_allclose(resumed.nll_pos, whole.nll_pos, atol=1e-5)
    np.testing.assert_allclose(resumed.nll_neg, whole.nll_neg, atol=1e-5)
    assert resumed.groups == whole.groups
    # blocks of another steering, data set or grid are refused in one line
    for kw, what in ((dict(pairs=PAIRS[1:]), "pairs"), (dict(multipliers=MS[1:]), "multipliers")):
        args = dict(pairs=PAIRS, multipliers=MS) | kw
        with pytest.raises(ValueError, match=f"other {what}") as e:
            fastsplit.logodds_sweep(model, tok, s, args["pairs"], args["multipliers"], progress=False,
                                    checkpoint_dir=ckpt, resume=True)
        assert "\n" not in str(e.value)
    other = _steering(tiny_model("llama", seed=3))
    with torch.no_grad():
        other.module.lora_b.add_(1.0)
    with pytest.raises(ValueError, match="other steering"):
        fastsplit.logodds_sweep(other.model, tok, other, PAIRS, MS, progress=False, checkpoint_dir=ckpt, resume=True)
    # without resume, old blocks are removed first
    fastsplit.logodds_sweep(model, tok, s, PAIRS[:3], MS, progress=False, checkpoint_dir=ckpt)
    assert all(json.load(open(os.path.join(ckpt, f)))["header"]["multipliers"] == MS for f in os.listdir(ckpt))


def test_a_resumed_generation_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = _steering(model)
    prompts = [p.prompt for p in PAIRS[:5]]
    whole = fastsplit.generate_sweep(model, tok, s, prompts, [-2.0, 0.0, 2.0], max_new_tokens=4, progress=False,
                                     batch_size=3)
    ckpt = str(tmp_path / "gen")
    restore = _cut_after(monkeypatch, 2)
    with pytest.raises(_Killed):
        fastsplit.generate_sweep(model, tok, s, prompts, [-2.0, 0.0, 2.0], max_new_tokens=4, progress=False,
                                 batch_size=3, checkpoint_dir=ckpt)
    restore()
    resumed = fastsplit.generate_sweep(model, tok, s, prompts, [-2.0, 0.0, 2.0], max_new_tokens=4, progress=False,
                                       batch_size=3, checkpoint_dir=ckpt, resume=True)
    assert resumed == whole
    with pytest.raises(ValueError, match="other max_new_tokens"):
        fastsplit.generate_sweep(model, tok, s, prompts, [-2.0, 0.0, 2.0], max_new_tokens=5, progress=False,
                                 checkpoint_dir=ckpt, resume=True)


# --- under torchrun --------------------------------------------------------------------------------------------------

def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTSPLIT_DIST_TIMEOUT="60", **extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _same_sweep(a, b):
    one, two = _rows(a), _rows(b)
    assert len(one) == len(two)
    for x, y in zip(one, two):
        assert (x["pair"], x["multiplier"]) == (y["pair"], y["multiplier"])
        for k in ("nll_pos", "nll_neg"):
            assert abs(float(x[k]) - float(y[k])) <= 1e-5 + 4e-7 * abs(float(y[k])), k


@pytest.fixture(scope="module")
def steering_file(model_dir, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("steer") / "run")
    assert main(["train", "--model", model_dir, "--layer", "1", "--epochs", "1", "--test-size", "0.5", "--out", out,
                 "--quiet"]) == 0
    return os.path.join(out, "steering.safetensors")


def _workers(marker: str) -> dict:
    """{rank: pid} of the torchrun workers whose environment carries ``marker``."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"FASTSPLIT_TEST_MARKER={marker}".encode() in env:
            ranks = [e for e in env if e.startswith(b"RANK=")]
            if ranks:
                found[int(ranks[0][5:])] = int(pid)
    return found


def test_a_rank_killed_half_way_leaves_whole_blocks_and_the_sweep_resumes(model_dir, steering_file, tmp_path):  # noqa: F811
    ms = "--multipliers=" + ",".join(str(v) for v in range(-10, 11))
    common = ["sweep", "--model", model_dir, "--steering", steering_file, "--data", "demo", "--max-pairs", "120", ms,
              "--bootstrap", "0", "--device", "cpu", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "two"
    blocks = out / "blocks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastsplit",
           *common, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(FASTSPLIT_TEST_MARKER="kill"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed, deadline = False, time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        n = len([f for f in os.listdir(blocks) if f.startswith("block-")]) if blocks.exists() else 0
        if n >= 8 and not killed:  # about a quarter to a half of the blocks: kill rank 1 hard
            pid = _workers("kill").get(1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert killed, "the sweep finished before rank 1 could be killed"
    assert proc.returncode != 0 and re.search(r"rank\s*:\s*1\b", err), err[-3000:]  # the failed rank, named
    for f in os.listdir(blocks):  # only whole blocks (a cut write leaves a temporary file at most)
        if f.startswith("block-"):
            json.load(open(blocks / f))
    left = len([f for f in os.listdir(blocks) if f.startswith("block-")])
    r = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert left >= 8 and not (out / "blocks").exists()  # resumed from the blocks, which go once the sweep is whole
    _same_sweep(tmp_path / "one" / "sweep.csv", out / "sweep.csv")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_equal_one_process(model_dir, steering_file, tmp_path):  # noqa: F811
    ms = "--multipliers=" + ",".join(str(v) for v in range(-5, 6))
    common = ["sweep", "--model", model_dir, "--steering", steering_file, "--data", "demo", "--max-pairs", "9", ms,
              "--bootstrap", "20", "--device", "cpu", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(k), "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", "fastsplit-test", "-m", "fastsplit", *common, "--out",
                               str(tmp_path / "two")], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in (0, 1)]
    outs = [n.communicate(timeout=300) for n in nodes]
    for n, (_, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    _same_sweep(tmp_path / "one" / "sweep.csv", tmp_path / "two" / "sweep.csv")
    one, two = (json.load(open(tmp_path / d / "fit.json")) for d in ("one", "two"))
    for k in ("preference_r2_fit", "utility_r2_fit"):
        np.testing.assert_allclose(two["scores"][k], one["scores"][k], rtol=1e-4)
    # The fits the two nodes shared are one process's fits of the same sweep, bit for bit. (Not of one process's
    # sweep: the two differ by float32 rounding, which a bootstrap refit of this run's weakly identified utility
    # curve moves by about 3e-3 in an interval's end.)
    alone = analyze(Sweep.from_csv(str(tmp_path / "two" / "sweep.csv")), bootstrap_samples=20)
    assert two["bootstrap"]["resamples"] == alone["bootstrap"]["resamples"] == 20
    for k in ("preference_r2", "utility_r2", "m_op"):
        assert two["bootstrap"][k] == alone["bootstrap"][k], k
    assert two["scores"]["utility_r2_fit"] == alone["utility"].r2
