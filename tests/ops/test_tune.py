"""backend="auto"'s tuner (fastsplit.ops._tune): verified candidates, the fastest chosen, the cache on disk, where it
may not tune, and ranks agreeing. Timers and candidates are injected where the choice must not depend on this
machine's speed; the last tests tune the CPU's real decisions (fold or not, chunk sizes) with the real timer."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import fastsplit
from fastsplit import _env
from fastsplit.ops import _tune
from fastsplit.ops import steered_linear as sl_mod
from tests.helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tuner(monkeypatch, tmp_path):
    """A fresh tuner, its cache under tmp_path, tuning on for the CPU."""
    monkeypatch.setenv("FASTSPLIT_CACHE", str(tmp_path))
    fresh = _tune.Tuner()
    monkeypatch.setattr(_tune, "TUNER", fresh)
    _env.set_tuning(True)
    yield fresh
    _env.set_tuning(None)


def fake_timer(times: dict):
    """A one-call timer that reads each candidate's time from ``times`` by its run function's name."""
    return lambda fn, device: times[fn.__name__]


def named_candidates(real):
    """The op's candidate builder, with each candidate's run function named after it (for :func:`fake_timer`)."""
    def candidates(*args):
        cands, check = real(*args)
        for c in cands:
            c.run.__name__ = c.name
        return cands, check
    return candidates


def named(name, fn):
    fn.__name__ = name
    return fn


CPU = torch.device("cpu")


def _check(y):
    return _tune.Check(sample=lambda out: [out[0]], reference=[y.double()])


def test_fastest_verified_candidate_is_chosen_and_bad_ones_never(tuner, caplog):
    y = torch.randn(7, 5)
    good = named("good", lambda: (y.clone(),))
    fast = named("fast", lambda: (y.clone(),))
    wrong = named("wrong", lambda: (y + 1e-2,))  # off by 1e-2: fastest of all, never chosen

    def boom():
        raise RuntimeError("out of resources: shared memory")
    cands = [_tune.Candidate("torch", good, torch_path=True), _tune.Candidate("fast", fast),
             _tune.Candidate("wrong", wrong), _tune.Candidate("raises", named("raises", boom))]
    tuner.once = fake_timer({"good": 3.0, "fast": 1.0, "wrong": 0.1, "raises": 0.01})
    with caplog.at_level(logging.WARNING, logger="fastsplit"):
        got = tuner.route(("k", 1), CPU, lambda: (cands, _check(y)), "torch")
    assert got == "fast"
    entry = tuner.entry(("k", 1), CPU)
    assert set(entry.times) == {"torch", "fast"}
    assert "disagrees" in entry.errors["wrong"] and "out of resources" in entry.errors["raises"]
    on_disk = json.load(open(_tune.cache_path(CPU)))["entries"]["k|1"]
    assert on_disk["choice"] == "fast" and set(on_disk["refused"]) == {"wrong", "raises"}
    assert on_disk["tune_ms"] > 0
    warned = [r.message for r in caplog.records if "refused" in r.getMessage()]
    assert len(warned) == 1 and "wrong" in caplog.text and "raises" in caplog.text
    # A second key with the same failures warns again only for its own key, never twice for one.
    caplog.clear()
    assert tuner.route(("k", 1), CPU, lambda: (cands, _check(y)), "torch") == "fast"  # from memory or disk
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


def test_only_failing_candidates_fall_back_to_the_torch_path(tuner):
    y = torch.randn(3, 3)
    cands = [_tune.Candidate("torch", named("t", lambda: (y + 1.0,)), torch_path=True),
             _tune.Candidate("nan", named("n", lambda: (torch.full_like(y, float("nan")),)))]
    tuner.once = fake_timer({"t": 1.0, "n": 0.5})
    assert tuner.route(("k2",), CPU, lambda: (cands, None), "torch") == "torch"
    assert "non-finite" in tuner.entry(("k2",), CPU).errors["nan"]


def _lw_inputs(rows=24):
    x, W, b = torch.randn(rows, 40), torch.randn(48, 40), torch.randn(48)
    return x, W, b, torch.randn(48, 40) * 0.1, torch.randn(48)


@pytest.mark.parametrize("prefer", ["torch:fold", "torch:two_gemm"])
def test_op_follows_the_timings_and_stays_exact(tuner, prefer):
    x, W, b, dW, db = _lw_inputs()
    other = {"torch:fold": "torch:two_gemm", "torch:two_gemm": "torch:fold"}[prefer]
    candidates = named_candidates(sl_mod._candidates)
    tuner.once = fake_timer({prefer: 1.0, other: 2.0})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sl_mod, "_candidates", candidates)
        y = fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=1.5)
    key = sl_mod.tune_key(x, W, b, dW, None, None, db, 1.5)
    assert tuner.names[key] == prefer
    ref = fastsplit.steered_linear_ref(x.double(), W.double(), b.double(), delta_weight=dW.double(),
                                       delta_bias=db.double(), m1=1.5)
    assert_close(y, ref, torch.float32, prefer)


@pytest.mark.parametrize("bad", ["output", "gradient"])
def test_a_candidate_wrong_in_its_output_or_gradient_is_refused(tuner, bad):
    x, W, b, dW, db = _lw_inputs()
    dW.requires_grad_(True)
    real = sl_mod._candidates

    def candidates(*args):
        cands, check = named_candidates(real)(*args)
        base = cands[0].run

        def wrong():
            out = list(base())
            out[0 if bad == "output" else 1] = out[0 if bad == "output" else 1] + 1e-2
            return tuple(out)
        return cands + [_tune.Candidate("torch:wrong", named("torch:wrong", wrong))], check
    tuner.once = fake_timer({"torch:fold": 2.0, "torch:two_gemm": 3.0, "torch:wrong": 0.1})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sl_mod, "_candidates", candidates)
        y = fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=-2.0)
    y.sum().backward()
    key = sl_mod.tune_key(x, W, b, dW, None, None, db, -2.0)
    grad = key[8]
    assert grad and tuner.names[key] == "torch:fold"
    assert "disagrees" in tuner.entry(key, CPU).errors["torch:wrong"]
    expect = (torch.ones(24, 48).t() @ x) * -2.0
    assert_close(dW.grad, expect.double(), torch.float32, "dΔW")


def test_second_process_reads_the_cache_and_runs_no_candidate(tmp_path):
    code = ("import torch, fastsplit; from fastsplit.ops import _tune; torch.manual_seed(0);"
            "x, W, dW = torch.randn(32, 64), torch.randn(80, 64), torch.randn(80, 64);"
            "y = fastsplit.steered_linear(x, W, delta_weight=dW, m1=2.0);"
            "print(_tune.TUNER.runs, list(_tune.TUNER.names.values()))")
    env = {**os.environ, "FASTSPLIT_CACHE": str(tmp_path), "FASTSPLIT_TUNE": "1", "PYTHONPATH": ROOT}
    outs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    for o in outs:
        assert o.returncode == 0, o.stderr
    first, second = (o.stdout.split(" ", 1) for o in outs)
    assert int(first[0]) >= 4 and int(second[0]) == 0  # 2 candidates verified and timed, then none
    assert first[1] == second[1]


def test_corrupted_stale_and_foreign_files_warn_once_and_are_rewritten(tuner, caplog):
    x, W, b, dW, db = _lw_inputs()
    path = _tune.cache_path(CPU)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stale = {"format": _tune.FORMAT, "device": _tune.device_identity(CPU),
             "software": {**_tune.software(), "torch": "0.0.1"}, "entries": {}}
    for text in ("{not json", json.dumps(stale), json.dumps({**stale, "device": {"name": "other", "capability": None}})):
        with open(path, "w") as f:
            f.write(text)
        tuner.clear(disk=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastsplit"):
            y = fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=0.5)
        assert len([r for r in caplog.records if "ignoring the tuning cache" in r.getMessage()]) == 1
        ref = fastsplit.steered_linear_ref(x.double(), W.double(), b.double(), delta_weight=dW.double(),
                                           delta_bias=db.double(), m1=0.5)
        assert_close(y, ref, torch.float32)
        data = json.load(open(path))  # rewritten whole, for this device and install
        assert data["software"] == _tune.software() and data["device"] == _tune.device_identity(CPU)
        assert len(data["entries"]) == 1


def test_two_processes_writing_one_cache_leave_a_valid_file(tmp_path):
    code = ("import sys, torch, fastsplit; from fastsplit.ops import _tune;"
            "rows = int(sys.argv[1]); x, W, dW = torch.randn(rows, 64), torch.randn(80, 64), torch.randn(80, 64);"
            "[fastsplit.steered_linear(x[:r], W, delta_weight=dW, m1=2.0) for r in (rows, rows // 4, rows // 16)]")
    env = {**os.environ, "FASTSPLIT_CACHE": str(tmp_path), "FASTSPLIT_TUNE": "1", "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, stderr=subprocess.PIPE, text=True)
             for r in (1024, 512)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    files = os.listdir(os.path.join(tmp_path, "tune"))
    data = json.load(open(os.path.join(tmp_path, "tune", [f for f in files if f.endswith(".json")][0])))
    assert len(data["entries"]) == 6  # row buckets 1024, 256, 64 from one process, 512, 128, 32 from the other


def test_no_tuning_while_compiling_capturing_or_on_a_side_stream(tuner, monkeypatch):
    x, W, b, dW, db = _lw_inputs()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=0.5)
    assert tuner.runs == 0 and not tuner.memory  # the static default, and nothing remembered
    ref = fastsplit.steered_linear_ref(x.double(), W.double(), b.double(), delta_weight=dW.double(),
                                       delta_bias=db.double(), m1=0.5)
    assert_close(y, ref, torch.float32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    cuda = torch.device("cuda", 0)
    streams = {"current": object(), "default": object()}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: streams["current"])
    monkeypatch.setattr(torch.cuda, "default_stream", lambda d=None: streams["default"])
    assert not _tune.may_tune(cuda)  # capturing
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not _tune.may_tune(cuda)  # a side stream
    streams["current"] = streams["default"]
    assert _tune.may_tune(cuda)
    _env.set_tuning(False)  # FASTSPLIT_TUNE=0
    assert not _tune.may_tune(cuda) and not _tune.may_tune(CPU)


def test_a_cached_route_is_used_where_tuning_may_not_run(tuner, monkeypatch):
    x, W, b, dW, db = _lw_inputs()
    fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=0.5)  # eager: tunes
    key = sl_mod.tune_key(x, W, b, dW, None, None, db, 0.5)
    tuner.memory[key] = ("torch", False, None, None)  # pretend two GEMMs won
    calls = []
    real = sl_mod.steered_linear_torch
    monkeypatch.setattr(sl_mod, "steered_linear_torch", lambda *a, **k: calls.append(k["fold"]) or real(*a, **k))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=0.5)
    assert calls == [False]  # the tuned route, not the static rule (which folds at 24 rows on the CPU)


def test_cpu_tunes_the_fold_decision_for_real(tuner):
    x, W, b, dW, db = _lw_inputs(rows=64)
    fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=0.5)
    key = sl_mod.tune_key(x, W, b, dW, None, None, db, 0.5)
    entry = tuner.entry(key, CPU)
    assert set(entry.times) == {"torch:fold", "torch:two_gemm"} and not entry.errors
    assert entry.choice == min(entry.times, key=entry.times.get) == tuner.names[key]
    assert 0 < entry.tune_ms < 5000


def test_tuning_off_on_the_cpu_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSPLIT_CACHE", str(tmp_path))
    monkeypatch.delenv("FASTSPLIT_TUNE", raising=False)
    _env.set_tuning(None)
    assert not _env.tuning("cpu") and _env.tuning("cuda")
    x, W, b, dW, db = _lw_inputs()
    fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=0.5)
    assert not os.path.exists(os.path.join(tmp_path, "tune"))


@pytest.mark.parametrize("merged", [True, False], ids=["sides-merged", "side-by-side"])
def test_split_loss_tuned_routes_are_exact(tuner, monkeypatch, merged):
    from fastsplit.ops import split_loss as sl

    if not merged:  # rows above the merge limit: a launch (and a key) per side
        monkeypatch.setattr(sl, "_MERGE_ROWS", 0)
    H, V = 24, 300
    W, b = torch.randn(V, H) * 0.3, torch.randn(V)
    hp, hn = torch.randn(2, 9, H, requires_grad=True), torch.randn(2, 7, H, requires_grad=True)
    lp, ln = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 7))
    lp[:, :3] = -100
    loss = fastsplit.split_loss(hp, hn, W, lp, ln, lm_head_bias=b, logit_softcap=4.0)
    loss.backward()
    ref_h = [t.detach().double().requires_grad_() for t in (hp, hn)]
    ref = fastsplit.split_loss_ref(*ref_h, W.double(), lp, ln, lm_head_bias=b.double(), logit_softcap=4.0)
    ref.backward()
    assert_close(loss, ref.detach(), torch.float32, "loss")
    assert_close(hp.grad, ref_h[0].grad, torch.float32, "dh_pos")
    entries = [k for k in json.load(open(_tune.cache_path(CPU)))["entries"] if k.startswith("split_loss")]
    # merged: one launch of both sides' 32 rows; else one key per side's row count (18 and 14 rows: buckets 32, 16)
    assert sorted(k.split("|")[1] for k in entries) == (["rows<=32"] if merged else ["rows<=16", "rows<=32"])
    for k in entries:
        assert tuner._files[_tune.cache_path(CPU)][k].times  # measured


def test_reference_rows_match_the_torch_launcher_with_softcap():
    from fastsplit.ops.split_loss import _reference_rows, split_loss_fwd_torch

    h, W, b = torch.randn(5, 16, dtype=torch.float64), torch.randn(70, 16, dtype=torch.float64), torch.randn(70).double()
    t = torch.randint(0, 70, (5,))
    for cap in (None, 2.5):
        ref = _reference_rows(h, t, W, b, cap, True, block=32)  # three vocabulary blocks
        nll, lse, dh = split_loss_fwd_torch(h, t, W, b, cap, True)
        for a, e in zip(ref, (nll, lse, dh)):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


def _gloo_worker(rank, port, cache, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FASTSPLIT_CACHE=f"{cache}/{rank}")
    import time

    import torch.distributed as dist

    from fastsplit import _env
    from fastsplit.ops import _tune
    from fastsplit.ops import steered_linear as sl

    dist.init_process_group("gloo", rank=rank, world_size=2)
    _env.set_tuning(True)
    prefer = ["torch:fold", "torch:two_gemm"][rank]  # each rank's fake timings favour another route
    sl._candidates = named_candidates(sl._candidates)
    _tune.TUNER.once = lambda fn, d: 1.0 if fn.__name__ == prefer else 2.0
    if rank == 1:
        time.sleep(0.5)  # rank 0 settles first
    torch.manual_seed(0)
    x, W, dW = torch.randn(20, 32), torch.randn(40, 32), torch.randn(40, 32)
    fastsplit.steered_linear(x, W, delta_weight=dW, m1=1.0)
    names = list(_tune.TUNER.names.values())
    dist.barrier()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(names, f)
    fastsplit.dist.shutdown(barrier=False)  # the barrier above came first


def test_two_gloo_ranks_with_different_timings_take_one_route(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_worker, args=(port, str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    routes = [json.load(open(tmp_path / f"{r}.json")) for r in (0, 1)]
    assert routes[0] == routes[1] == ["torch:fold"]  # rank 0 settled first; rank 1's timings favoured two GEMMs


def test_torch_compile_fullgraph_with_tuning_on(tuner):
    """Under torch.compile a cached route is read and a missing one takes the static rule: nothing to trace but
    tensor code (fullgraph), and nothing tuned while tracing."""
    x, W, b, dW, db = _lw_inputs(rows=40)
    y_eager = fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=0.5)  # tunes this key
    runs = tuner.runs
    fn = torch.compile(lambda x: fastsplit.steered_linear(x, W, b, delta_weight=dW, delta_bias=db, m1=0.5),
                       fullgraph=True)
    assert_close(fn(x), y_eager.double(), torch.float32, "cached route")
    big = torch.randn(300, 40)  # another row bucket: not in the cache
    want = fastsplit.steered_linear_ref(big.double(), W.double(), b.double(), delta_weight=dW.double(),
                                        delta_bias=db.double(), m1=0.5)
    assert_close(fn(big), want, torch.float32, "static rule")
    assert tuner.runs == runs
