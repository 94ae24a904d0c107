"""torch.distributed: 2 gloo ranks spawned from pytest (bounded in time) against one process.

A sharded sweep and a sharded generation equal the one-process results; 2-rank data-parallel SPLIT training
equals 1-rank training with the same global batch after 3 steps; resume works with 2 ranks; a failing rank
stops every rank and nothing is left half-written; a world larger than the work is refused.
"""
import faulthandler
import json
import os
import subprocess
import sys
import time
import traceback
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsplit
from tests.tiny import tiny_model, tiny_tokenizer

PAIRS = fastsplit.demo_pairs()[:12]
MS = [-4.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 4.0]
TIMEOUT_S = 240


def _fresh(form="lora"):
    model = tiny_model("llama")
    s = fastsplit.attach(model, 2, form, rank=2)
    torch.manual_seed(9)
    for p in s.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model, s


def _train(model, s, pairs=PAIRS, **kw):
    opts = dict(epochs=1, batch_size=4, lr=5e-2, steering_factors=[0.5, 1.0, 2.0], pair_types=("add", "sub"),
                progress=False, seed=1)
    return fastsplit.train(model, tiny_tokenizer(), s, pairs, **(opts | kw))


# --- what each rank runs: module-level, so spawn can pickle it --------------------------------------------
def _task_sweep(out, rank, ms=MS, slow_rank0=False):
    """The sweep in batches of one pair, how many m rows of the shared prefix this process ran itself, and the
    batches it took (each as its pairs' tokens). Each batch waits a while (longer on rank 0 with ``slow_rank0``), so
    that both ranks surely take some."""
    import fastsplit.engines.transformers as lo

    model, s = _fresh()
    real_prefix, real_batch, prefix_rows, took = lo._prefix_caches, lo._batch_nll, [], []

    def counted(model, steering, prefix, m_all, *a):
        prefix_rows.append(len(m_all))
        return real_prefix(model, steering, prefix, m_all, *a)

    def batch(model, steering, chunk, *a, **k):
        took.append([(tuple(p), tuple(a), tuple(n)) for p, a, n in chunk])
        time.sleep(1.5 if slow_rank0 and rank == 0 else 0.3)
        return real_batch(model, steering, chunk, *a, **k)
    lo._prefix_caches, lo._batch_nll = counted, batch
    try:
        sweep = fastsplit.logodds_sweep(model, tiny_tokenizer(), s, PAIRS[:5], ms, progress=False, batch_size=1)
    finally:
        lo._prefix_caches, lo._batch_nll = real_prefix, real_batch
    return {"nll_pos": sweep.nll_pos, "nll_neg": sweep.nll_neg, "groups": sweep.groups, "prefix_rows": prefix_rows,
            "took": took}


def _task_generate(out, rank):
    model, s = _fresh()
    prompts = [p.prompt for p in PAIRS[:3]]
    return fastsplit.generate_sweep(model, tiny_tokenizer(), s, prompts, [-2.0, 0.0, 2.0], max_new_tokens=4,
                                    progress=False)


def _task_train(out, rank, **kw):
    if rank != 0:
        torch.manual_seed(1234)  # a different init on rank 1: DDP must start every rank from rank 0's tensors
    model, s = _fresh()
    if rank != 0:
        with torch.no_grad():
            for p in s.parameters():
                p.add_(1.0)
    res = _train(model, s, **kw)
    return {"params": s.state_dict(), "history": res["history"], "steps": res["steps"]}


def _task_bad_shard(out, rank):
    import fastsplit.engines.transformers as lo

    model, s = _fresh()
    real = lo._batch_nll

    def batch(*a, **k):  # rank 0's batches succeed, slowly (so rank 1 surely takes one); rank 1's fail
        if rank == 1:
            raise ValueError("a completion tokenises to nothing (rank 1's batch)")
        time.sleep(2.0)
        return real(*a, **k)
    lo._batch_nll = batch
    fastsplit.logodds_sweep(model, tiny_tokenizer(), s, PAIRS[:4], MS, progress=False, batch_size=1)


def _task_bad_pair(out, rank):
    model, s = _fresh()
    pairs = PAIRS[:3] + [fastsplit.Pair(PAIRS[3].prompt, "", "")]  # found when every rank encodes every pair
    fastsplit.logodds_sweep(model, tiny_tokenizer(), s, pairs, MS, progress=False)


def _task_too_few(out, rank):
    model, s = _fresh()
    fastsplit.logodds_sweep(model, tiny_tokenizer(), s, PAIRS[:1], MS, progress=False)


def _synthetic_sweep():
    rng = np.random.default_rng(4)
    ms = np.linspace(-8, 8, 17)
    P = 0.6 * ms[None] + rng.normal(0, 0.5, (30, 17))
    U = -3.0 - 0.05 * ms[None] ** 2 + rng.normal(0, 0.3, (30, 17))
    a = 1 / (1 + np.exp(-U))
    lp = -np.log(a / (1 + np.exp(-P)))
    return fastsplit.Sweep.from_nll(ms, lp, lp + P)


def _task_gather(out, rank):
    """gather_tensors: each rank's tensors (other counts and shapes) united on every rank; run_tasks: every index run
    once, in order, whoever ran it."""
    local = {f"r{rank}-{k}": torch.full((k + 1, 3), float(rank * 10 + k)) for k in range(rank + 2)}
    group = fastsplit.dist.active_group()
    every = fastsplit.dist.gather_tensors(local, group)
    # device=: the results go there, whatever device this rank's tensors are on (or when it has none)
    elsewhere = fastsplit.dist.gather_tensors(local if rank == 0 else {}, group, device="meta")
    ran, finished = [], []
    results = fastsplit.dist.run_tasks(lambda i: ran.append(i) or i * i, 9, group)
    # on_done: how much of the work (sizes) every rank has finished, after each task this rank ran
    fastsplit.dist.run_tasks(lambda i: time.sleep(0.05), 9, group, sizes=range(1, 10),
                             on_done=lambda i, f: finished.append(f))
    return {"keys": sorted(every), "sums": {k: float(v.sum()) for k, v in every.items()}, "results": results,
            "ran": ran, "elsewhere": {k: (v.device.type, tuple(v.shape)) for k, v in elsewhere.items()},
            "finished": finished}


def _task_analyze(out, rank, slow_rank0=False, fail_rank0=False):
    """The fits shared out; with slow_rank0, rank 0 first spends a while on work of its own (the CLI's plot) while
    rank 1 takes the bootstrap's refits; with fail_rank0 that work fails."""
    drew = []

    def draw(result):
        if fail_rank0:
            raise OSError("the plot cannot be written")
        time.sleep(1.0)
        drew.append(result["bootstrap"])
    rep = fastsplit.analyze(_synthetic_sweep(), bootstrap_samples=12, on_fits=draw if slow_rank0 and rank == 0
                            else None)
    return {"bootstrap": rep["bootstrap"], "heldout": rep["heldout_m"], "m_op": rep["operating_point"].multiplier,
            "drew": drew}


def _task_captured(out, rank):
    """A function whose default argument took the live default group (as torch.distributed.nn.functional's
    collectives do when first imported after init_process_group), and the first meta-tensor ``torch.cat`` of the
    process, which imports torch._dynamo and with it that module."""
    def reduce(t, group=dist.group.WORLD):
        dist.all_reduce(t, group=group)
        return t
    globals()["_captured_reduce"] = reduce  # module-level, as an imported module's function is
    torch.cat([torch.zeros(2, device="meta"), torch.zeros(3, device="meta")])
    import torch.distributed.nn.functional as fn
    return {"sum": float(reduce(torch.ones(1))), "nn_default_is_none": fn.all_reduce.__defaults__[-1] is None}


TASKS = {"sweep": _task_sweep, "generate": _task_generate, "train": _task_train, "bad_shard": _task_bad_shard,
         "bad_pair": _task_bad_pair, "too_few": _task_too_few, "analyze": _task_analyze, "gather": _task_gather,
         "captured": _task_captured}


def _threads() -> set:
    """This process's thread ids (Linux: /proc); empty elsewhere."""
    root = f"/proc/{os.getpid()}/task"
    return set(os.listdir(root)) if os.path.isdir(root) else set()


def _left(started: set, wait_s: float = 5.0) -> set:
    """Which of the threads ``started`` are still alive, after giving them ``wait_s`` to finish exiting (a thread
    the group's destructor has released may take a moment to leave /proc; one the group still holds never does)."""
    deadline = time.monotonic() + wait_s
    while (alive := started & _threads()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def _worker(rank, world, store, out, task, kw):
    faulthandler.enable()  # a rank that aborts in C++ (gloo) prints where each of its threads was
    torch.set_num_threads(1)
    before = _threads()
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    group_threads = _threads() - before  # gloo's: its transport loop and the group's work threads
    try:
        record = {"ok": TASKS[task](out, rank, **kw)}
    except Exception as e:  # recorded for the test to read; the error itself is the subject of some tests
        record = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    # Every task ends in a collective (a gather, or the agreement on a failure), so every rank gets here.
    # shutdown: the barrier, destroy_process_group, and no reference to the group left behind, so gloo's threads
    # end here rather than in interpreter finalization (where they aborted ranks: fastsplit.dist's import notes).
    released = fastsplit.dist.shutdown()
    record["teardown"] = {"released": released, "group_threads": len(group_threads),
                          "gloo_threads": len(_left(group_threads))}
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))


def _launch(tmp_path, task, world=2, **kw) -> list[dict]:
    """Run ``task`` on ``world`` gloo ranks; returns each rank's {"ok": result} or {"error": message}."""
    launch = len(list(tmp_path.glob(f"{task}-*")))  # the outputs of earlier launches of this task stay
    out = tmp_path / f"{task}-{launch}"
    out.mkdir()
    store = tmp_path / f"{task}-{launch}.store"  # a fresh rendezvous per launch
    ctx = mp.start_processes(_worker, args=(world, str(store), str(out), task, kw),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks of {task!r} did not finish in {TIMEOUT_S} s")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    # Every launch checks the teardown: the threads that init_process_group started (gloo's) had ended on each rank
    # before it exited (none counted off Linux).
    teardown = [res.pop("teardown") for res in results]
    assert all(t["gloo_threads"] == 0 for t in teardown), f"{task}: gloo's threads outlived the group: {teardown}"
    assert all(t["group_threads"] > 0 for t in teardown) or not _threads(), teardown  # the check saw them
    want = 1 if task == "captured" else 0  # only the task that captures the group leaves a reference to release
    assert [t["released"] for t in teardown] == [want] * world, f"{task}: {teardown}"
    return results


def _ok(results):
    for r, res in enumerate(results):
        assert "ok" in res, f"rank {r}: {res.get('trace', res)}"
    return [res["ok"] for res in results]


# --- the tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ms", [MS, [2.0]], ids=["9m", "1m-a-rank-without-prefix-rows"])
def test_sharded_sweep_equals_one_process(tmp_path, ms):
    ranks = _ok(_launch(tmp_path, "sweep", ms=ms))
    one = _task_sweep(None, 0, ms)
    for got in ranks:  # every rank returns the whole sweep, in the input order
        for k in ("nll_pos", "nll_neg"):
            assert got[k].shape == one[k].shape == (5, len(ms))
            assert abs(got[k] - one[k]).max() <= 1e-5, k
        assert got["groups"] == one["groups"]
    # The shared prefix's m rows were shared out in blocks (earlier ranks larger), not run whole on every rank.
    half = (len(ms) + 1) // 2
    assert one["prefix_rows"] == [len(ms)] and [r["prefix_rows"] for r in ranks] == [[half], [len(ms) - half]]
    # Each of the 5 batches ran once, on one rank: the ranks took them from a shared counter, costliest first.
    assert sorted(ranks[0]["took"] + ranks[1]["took"]) == sorted(one["took"]) and len(set(map(str, one["took"]))) == 5
    assert ranks[0]["took"] and ranks[1]["took"]


def test_a_slower_rank_takes_fewer_batches(tmp_path):
    ranks = _ok(_launch(tmp_path, "sweep", slow_rank0=True))
    one = _task_sweep(None, 0)
    for k in ("nll_pos", "nll_neg"):
        assert abs(ranks[0][k] - one[k]).max() <= 1e-5, k
    assert len(ranks[0]["took"]) < len(ranks[1]["took"])  # fixed shares would have given rank 0 three of five


def test_sharded_generation_equals_one_process(tmp_path):
    ranks = _ok(_launch(tmp_path, "generate"))
    one = _task_generate(None, 0)
    assert ranks[0] == ranks[1] == one and len(one) == 3


@pytest.mark.parametrize("kw", [dict(reduction="batch"), dict(reduction="pair"), dict(loss="sft"),
                                dict(batch_size=1, pairs=PAIRS[:3])],
                         ids=["split-batch", "split-pair", "sft", "batch1-ranks-idle"])
def test_two_rank_training_equals_one_rank(tmp_path, kw):
    ranks = _ok(_launch(tmp_path, "train", **kw))
    model, s = _fresh()
    res = _train(model, s, **kw)
    assert res["steps"] == ranks[0]["steps"] == 3
    for got in ranks:
        for k, v in s.state_dict().items():
            torch.testing.assert_close(got["params"][k], v, atol=1e-5, rtol=0, msg=k)
        assert got["history"][0]["loss"] == pytest.approx(res["history"][0]["loss"], rel=1e-5)
    assert not torch.equal(ranks[0]["params"]["lora_b"], _fresh()[1].state_dict()["lora_b"])  # it trained


def test_two_rank_resume_matches_an_uninterrupted_run(tmp_path):
    ck = tmp_path / "ck"
    _ok(_launch(tmp_path, "train", epochs=2, checkpoint_dir=str(ck)))
    assert sorted(os.listdir(ck)) == ["checkpoint-epoch1.pt", "checkpoint-epoch2.pt"]  # rank 0 wrote, whole
    (ck / "checkpoint-epoch2.pt").unlink()  # as if stopped after epoch 1
    resumed = _ok(_launch(tmp_path, "train", epochs=2, checkpoint_dir=str(ck), resume=True))
    model, s = _fresh()
    _train(model, s, epochs=2)
    assert [h["epoch"] for h in resumed[0]["history"]] == [1, 2]
    for k, v in s.state_dict().items():
        torch.testing.assert_close(resumed[1]["params"][k], v, atol=1e-5, rtol=0, msg=k)


def test_a_failing_rank_stops_every_rank(tmp_path):
    results = _launch(tmp_path, "bad_shard")
    assert "tokenises to nothing" in results[1]["error"]  # the failing rank: its own error
    assert results[0]["error"].startswith("RuntimeError: rank 1 failed during the log-odds sweep")
    assert "tokenises to nothing" in results[0]["error"]
    for res in _launch(tmp_path, "bad_pair"):  # bad data: every rank refuses it, before any work
        assert res["error"].startswith("ValueError: a completion tokenises to nothing")


def test_a_world_larger_than_the_pairs_is_refused(tmp_path):
    for res in _launch(tmp_path, "too_few"):
        assert "world size 2 is larger than the number of pairs (1)" in res["error"]


def test_shared_fits_equal_one_process_bit_for_bit(tmp_path):
    """The fits, their held-out-m refits and the pair bootstrap are shared out between the ranks; every rank ends
    with one process's figures exactly."""
    one = _task_analyze(None, 0)
    for res in _launch(tmp_path, "analyze"):
        assert res["ok"] == one
    # Rank 0 drawing before its first refit (on_fits) leaves the figures as they are; it drew once, rank 1 never.
    slow = _ok(_launch(tmp_path, "analyze", slow_rank0=True))
    assert [r["drew"] for r in slow] == [[None], []]
    for r in slow:
        assert {**r, "drew": []} == one
    # That work failing on rank 0 stops both ranks, rank 1 with an error naming rank 0.
    failed = _launch(tmp_path, "analyze", slow_rank0=True, fail_rank0=True)
    assert failed[0]["error"] == "OSError: the plot cannot be written"
    assert failed[1]["error"].startswith("RuntimeError: rank 0 failed during the pair bootstrap")


def test_tensors_and_tasks_are_shared_between_ranks(tmp_path):
    res = [r["ok"] for r in _launch(tmp_path, "gather")]
    want = {f"r{r}-{k}": float((k + 1) * 3 * (r * 10 + k)) for r in range(2) for k in range(r + 2)}
    for r in res:
        assert r["keys"] == sorted(want) and r["sums"] == want
        assert r["results"] == [i * i for i in range(9)]
        assert r["elsewhere"] == {f"r0-{k}": ("meta", (k + 1, 3)) for k in range(2)}  # rank 1 had none
    assert sorted(res[0]["ran"] + res[1]["ran"]) == list(range(9))  # every task once, shared out
    fins = [r["finished"] for r in res]
    assert all(f == sorted(f) for f in fins) and len(fins[0]) + len(fins[1]) == 9
    assert max(fins[0] + fins[1]) == 45  # the last task done anywhere saw all of the work (1 + ... + 9)


def test_no_gloo_thread_outlives_the_teardown(tmp_path):
    """The cause of ranks aborting at exit: a reference to the default group that outlived destroy_process_group
    kept gloo's threads alive into interpreter finalization. fastsplit imports torch.distributed.nn.functional
    before any group exists (its defaults stay None), and shutdown() releases a default argument that captured the
    group all the same; _launch checks every launch for that (gloo_threads 0, one reference released here)."""
    for res in _ok(_launch(tmp_path, "captured")):
        assert res["sum"] == 2.0 and res["nn_default_is_none"]


def test_shutdown_releases_a_captured_group_in_process(tmp_path):
    """One rank, in this process: a default argument holding the group is released, gloo's threads end at
    shutdown, and a second shutdown (no group) does nothing."""
    before = _threads()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    group_threads = _threads() - before

    def held(group=dist.group.WORLD, *, also=dist.group.WORLD):
        return group, also

    class Holder:
        def method(self, group=dist.group.WORLD):
            return group
    Holder.__module__ = __name__  # a class of this module, as one defined at its top level
    globals().update(_held=held, _Holder=Holder)

    class Lazy(types.ModuleType):  # a lazy stand-in in sys.modules (six's moved modules): any attribute imports
        def __getattr__(self, name):
            raise ModuleNotFoundError("No module named '_gdbm'")

    class Odd:  # not a module at all, and as touchy
        def __getattr__(self, name):
            raise ModuleNotFoundError("No module named '_gdbm'")
    sys.modules.update(_fastsplit_lazy=Lazy("_fastsplit_lazy"), _fastsplit_odd=Odd())
    try:
        assert fastsplit.dist.shutdown() == 3
        assert held() == (None, None) and Holder().method() is None
        assert group_threads and not _left(group_threads)
        assert fastsplit.dist.shutdown() == 0
    finally:
        globals().pop("_held")
        globals().pop("_Holder")
        sys.modules.pop("_fastsplit_lazy")
        sys.modules.pop("_fastsplit_odd")
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fifty_launches_tear_down_cleanly(tmp_path):
    """CI's short run of bench/stress_teardown.py: 50 two-rank launches, two at once, both ranks of a launch on one
    core, random sleeps around each teardown; every rank leaves through interpreter finalization with exit 0."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "stress_teardown.py")
    out = tmp_path / "teardown.json"
    r = subprocess.run([sys.executable, script, "--launches", "50", "--parallel", "2", "--pin", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["fork"]["launches"] == 50 and res["fork"]["failed"] == 0, res["fork"]["failures"][:2]
