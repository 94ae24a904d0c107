"""torch.distributed for the workflows: which process group, which shard, gathering, and failing together.

fastsplit has no launcher or transport of its own: launch with ``torchrun`` (or any code that calls
``torch.distributed.init_process_group``); gloo on the CPU, NCCL on CUDA. The workflows (``logodds_sweep``,
``generate_sweep``, ``train``) find an initialised process group by themselves; ``group=`` picks another.

Shards are contiguous blocks in rank order, so gathering them in rank order restores the input order.

Example (``torchrun --nproc-per-node 2 sweep.py``)::

    import torch.distributed as dist
    dist.init_process_group("gloo")                 # "nccl" on GPUs, after torch.cuda.set_device(local_rank)
    sweep = fastsplit.logodds_sweep(model, tok, steering, pairs, ms)   # every rank gets the whole sweep
    if dist.get_rank() == 0:
        sweep.to_csv("sweep.csv")
    fastsplit.dist.shutdown()                       # not destroy_process_group() alone: see shutdown()
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

# Why this import, here: torch.distributed.nn.functional's ten collectives take ``group=group.WORLD`` as a default
# argument, evaluated when the module is first imported. Imported after ``init_process_group`` (torch._dynamo
# imports it: the first meta-tensor ``torch.cat`` does, so does ``torch.compile``), those defaults hold the default
# group past ``destroy_process_group``: its gloo threads then live on into interpreter finalization, where a thread
# that needs the GIL to drop a tensor is ended by Python and aborts the rank ("terminate called without an active
# exception"; the class of pytorch/pytorch#190489 and of the abandoned atexit fix in pytorch/pytorch#179291).
# Imported with fastsplit, before any group exists, the defaults are None. :func:`shutdown` releases a group that
# was captured all the same (a module that was imported earlier than fastsplit, a user's own default argument).
if dist.is_available():
    import torch.distributed.nn.functional  # noqa: E402,F401

__all__ = ["active_group", "rank", "world_size", "is_main", "shard_range", "shard_by_work", "check_world",
           "all_gather_list", "gather_indexed", "gather_tensors", "run_tasks", "split_work", "agree", "atomic_write",
           "file_lock", "broadcast_object", "first_published", "timeout", "shutdown", "Blocks"]


def active_group(group=None):
    """The process group to work in: ``group`` if given, else the default group when one is initialised with
    more than one rank, else None (one process)."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def rank(group=None) -> int:
    return dist.get_rank(group) if group is not None else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if group is not None else 1


def is_main(group=None) -> bool:
    """True on the rank that writes outputs (rank 0 of ``group``; always in one process)."""
    group = active_group(group)
    return rank(group) == 0


def shard_range(n: int, group=None) -> range:
    """This rank's contiguous block of ``range(n)``: sizes differ by at most one, earlier ranks larger."""
    r, w = rank(group), world_size(group)
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def shard_by_work(costs: Sequence[float], group=None) -> list[int]:
    """This rank's indices of ``range(len(costs))`` when the items are spread so that the busiest rank has as little
    work as a greedy schedule allows: the costliest first, each to the rank with the least work so far (ties: the
    lower rank). Every rank computes the same schedule; the indices come back in ascending order.

    Example::

        >>> shard_by_work([5, 1, 1, 1, 1, 1])   # on rank 0 of 2: [0]; rank 1 gets the five small items
    """
    w = world_size(group)
    if w == 1:
        return list(range(len(costs)))
    load = [0.0] * w
    mine, me = [], rank(group)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(w), key=lambda r: (load[r], r))
        load[r] += float(costs[i])
        if r == me:
            mine.append(i)
    return sorted(mine)


def gather_tensors(local: dict, group=None, *, what: str = "work", device=None) -> dict:
    """``{key: tensor}`` of every rank united on every rank: the tensors travel as one flat buffer per rank through
    ``all_gather`` (no pickling), only their keys, shapes and dtypes as objects. Tensors of one dtype per call.
    ``device``: where the results go; by default where this rank's tensors are, the CPU on a rank that has none."""
    if group is None:
        return {k: v.to(device) for k, v in local.items()} if device is not None else dict(local)
    keys = list(local)
    metas = all_gather_list([[(k, tuple(local[k].shape), str(local[k].dtype).replace("torch.", ""))
                              for k in keys]], group, what=what)
    home = (torch.device(device) if device is not None else
            next(iter(local.values())).device if local else torch.device("cpu"))  # where the results go
    device = home
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtypes = {d for part in metas for _, _, d in part}
    if len(dtypes) > 1:
        raise ValueError(f"gather_tensors takes one dtype per call, got {sorted(dtypes)}")
    dtype = getattr(torch, dtypes.pop()) if dtypes else torch.float32
    sizes = [sum(int(torch.Size(shape).numel()) for _, shape, _ in part) for part in metas]
    flat = torch.zeros(max(sizes) if sizes else 0, dtype=dtype, device=device)
    if keys:
        mine = torch.cat([local[k].reshape(-1).to(device, dtype) for k in keys])
        flat[:mine.numel()] = mine
    parts = [torch.empty_like(flat) for _ in metas]
    dist.all_gather(parts, flat, group=group)
    out = {}
    for part, buf in zip(metas, parts):
        at = 0
        for k, shape, _ in part:
            n = int(torch.Size(shape).numel())
            out[k] = buf[at:at + n].reshape(shape).to(home).clone()
            at += n
    return out


_TASKS: dict = {}  # calls of run_tasks so far, per group (its ranks)


def run_tasks(fn: Callable[[int], Any], n: int, group=None, *, what: str = "work",
              before: Callable[[], None] | None = None, sizes: Sequence[float] | None = None,
              on_done: Callable[[int, float], None] | None = None) -> list:
    """``[fn(0), ..., fn(n - 1)]`` on every rank, the calls shared out dynamically: each rank takes the next index
    nobody took from an atomic counter in the group's store, so a few slow tasks (a fit that runs to its iteration
    limit), or a rank whose core runs slower, do not hold the others back; give the costliest tasks the lowest
    indices, so the ranks end on small ones. ``fn`` must be deterministic in its index (the result is then one
    process's, bit for bit). Without a store it falls back to :func:`split_work`'s fixed shares.

    ``before``: work of this rank alone (rank 0 drawing a plot), done before it takes its first task; meanwhile the
    other ranks take more tasks, so its time is shared out too. An error in it stops every rank, as an error in a
    task does.

    ``on_done(i, finished)``: called on the rank that ran task ``i``, right after it, with how much of the work every
    rank has finished so far (the sum of ``sizes`` of the finished tasks, each 1 by default; counted in the store, so
    every rank must pass it; with sizes that are not whole numbers, or without a store, this rank's own): a progress
    bar on rank 0 that follows all ranks.

    Example::

        >>> squares = run_tasks(lambda i: i * i, 9)     # on every rank of a torchrun job: [0, 1, 4, ..., 64]
    """
    sizes = [1.0] * n if sizes is None else list(sizes)
    if len(sizes) != n:
        raise ValueError(f"sizes has {len(sizes)} entries for {n} tasks")
    tally = {"local": 0.0}
    whole = all(float(x).is_integer() for x in sizes)  # the store's counter adds integers

    def finish(i, result):
        if on_done is not None:
            if store is not None and whole:
                finished = float(store.add(done_key, int(sizes[i])))
            else:  # this rank's own work only
                tally["local"] += sizes[i]
                finished = tally["local"]
            on_done(i, finished)
        return result

    if group is None:
        store = None
        if before is not None:
            before()
        return [finish(i, fn(i)) for i in range(n)]
    # Every rank of a group makes the same calls in the same order: the same counter key. The key names the group's
    # ranks, so groups that share the default store (subgroups making other numbers of calls) never share a counter.
    ranks = tuple(dist.get_process_group_ranks(group))
    _TASKS[ranks] = _TASKS.get(ranks, 0) + 1
    key = f"fastsplit/tasks/{','.join(map(str, ranks))}/{_TASKS[ranks]}"
    done_key = key + "/done"
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: fixed shares
        store = None

    def work():
        local = {}
        if before is not None:
            before()
        if store is None:
            for i in split_work(n, group):
                local[i] = finish(i, fn(i))
            return local
        while True:
            i = int(store.add(key, 1)) - 1
            if i >= n:
                return local
            local[i] = finish(i, fn(i))
    return gather_indexed(agree(work, group, what=what), n, group, what=what)


def split_work(n: int, group=None) -> list[int]:
    """This rank's share of ``n`` equal tasks, interleaved (rank r takes r, r + w, ...): for work whose results are
    gathered back in task order (:func:`gather_indexed`), such as bootstrap resamples."""
    return list(range(rank(group), n, world_size(group)))


def gather_indexed(local: dict, n: int, group=None, *, what: str = "work") -> list:
    """``local`` ({index: result} of this rank) from every rank, as one list ordered by index ``0..n-1`` on every
    rank; an index no rank holds is an error."""
    merged = dict(pair for part in all_gather_list([list(local.items())], group, what=what) for pair in part)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"the {what} lost {len(missing)} of {n} results (first: #{missing[0]})")
    return [merged[i] for i in range(n)]


def check_world(n: int, what: str, group=None) -> None:
    """Refuse a world larger than the work: a rank with nothing to do would only wait."""
    w = world_size(group)
    if w > n:
        raise ValueError(f"the world size {w} is larger than the number of {what} ({n}): launch at most {n} "
                         f"processes, or give more {what}")


def all_gather_list(items: Sequence[Any], group=None, *, what: str = "work") -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order, on every rank. A rank that died (killed, out of
    memory) makes the others stop within the group's timeout with an error that names it (gloo's monitored
    barrier), rather than waiting on it forever."""
    if group is None:
        return list(items)
    check_peers(group, what)
    out: list = [None] * world_size(group)
    dist.all_gather_object(out, list(items), group=group)
    return [x for part in out for x in part]


def timeout():
    """The process groups' timeout: ``FASTSPLIT_DIST_TIMEOUT`` seconds if set, else torch's default (30 minutes)."""
    import datetime

    value = os.environ.get("FASTSPLIT_DIST_TIMEOUT")
    return datetime.timedelta(seconds=float(value)) if value else None


def check_peers(group, what: str) -> None:
    """Every rank of ``group`` is alive and here (gloo: a monitored barrier, whose error names the ranks that did not
    arrive within the timeout); on other backends nothing (NCCL reports a lost peer itself, and torchrun stops
    the job when a rank dies)."""
    if dist.get_backend(group) != "gloo":
        return
    try:
        dist.monitored_barrier(group=group, timeout=timeout(), wait_all_ranks=True)
    except RuntimeError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RuntimeError(f"rank {rank(group)} stops the {what}: a peer did not arrive ({text})") from None


def agree(fn: Callable[[], Any], group=None, *, what: str = "work"):
    """Run ``fn`` on every rank and fail together: when any rank raised, every rank raises (the failing rank
    its own error, the others a RuntimeError naming that rank and its error), so no rank goes on to write
    outputs or blocks in a later collective waiting for a rank that is gone."""
    if group is None:
        return fn()
    try:
        out, err = fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        out, err = None, e
    errors = all_gather_list([None if err is None else f"{type(err).__name__}: {err}"], group, what=what)
    if err is not None:
        raise err
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise RuntimeError(f"rank {r} failed during the {what}, so every rank stops: {e}")
    return out


def shutdown(*, barrier: bool = True) -> int:
    """The end of a distributed run on this rank: a barrier (so no rank tears its connections down while a peer still
    reads from them; pass ``barrier=False`` on an error path, where a peer may be gone), ``destroy_process_group``,
    the release of every function or method default that still holds the destroyed default group, and a garbage
    collection (for reference cycles that hold it: an error's traceback), so that its gloo threads end here, on the
    main thread, while the interpreter is whole (see the import of
    ``torch.distributed.nn.functional`` above for why they would otherwise outlive it). Returns how many such
    references it released (0 when nothing held the group). Nothing to do without an initialised group.

    Example::

        >>> dist.init_process_group("gloo")
        >>> ...                                  # the work
        >>> fastsplit.dist.shutdown()            # in place of dist.barrier(); dist.destroy_process_group()
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    import gc

    world = dist.group.WORLD
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        released = _release_defaults(world)
        del world
        # A reference cycle can hold the group too: a caught error's traceback keeps the frames that had the group
        # in a local (agree() keeps the error it re-raises). The collector would free it only in finalization.
        gc.collect()
    return released


def _release_defaults(group) -> int:
    """Replace ``group`` by None wherever a loaded module's function, or a method of a module's class, holds it as a
    default argument (``def f(group=dist.group.WORLD)`` evaluated while the group existed); how many."""
    import sys
    import types

    def functions(module):
        # Only real modules, read through their __dict__: sys.modules also holds lazy stand-ins (six's moved
        # modules) that import something when an attribute is asked of them, and that import may fail.
        if not issubclass(type(module), types.ModuleType):
            return
        try:
            values = list(object.__getattribute__(module, "__dict__").values())
        except Exception:  # noqa: BLE001 - a module without a readable namespace holds nothing to release
            return
        for value in values:
            if type(value) is types.FunctionType:  # type(), not isinstance: no proxy's __class__ (a warning)
                yield value
            elif type(value) is type and value.__dict__.get("__module__") == module.__dict__.get("__name__"):
                for attr in list(value.__dict__.values()):
                    fn = attr.__func__ if type(attr) in (staticmethod, classmethod) else attr
                    if type(fn) is types.FunctionType:
                        yield fn

    released = 0
    for module in list(sys.modules.values()):
        try:
            for fn in functions(module):
                if fn.__defaults__ and any(d is group for d in fn.__defaults__):
                    released += sum(d is group for d in fn.__defaults__)
                    fn.__defaults__ = tuple(None if d is group else d for d in fn.__defaults__)
                if fn.__kwdefaults__ and any(d is group for d in fn.__kwdefaults__.values()):
                    released += sum(d is group for d in fn.__kwdefaults__.values())
                    fn.__kwdefaults__ = {k: None if d is group else d for k, d in fn.__kwdefaults__.items()}
        except Exception:  # noqa: BLE001 - the teardown of a finished run never fails on a module's oddity
            continue
    return released


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then rename onto ``path``: a reader (or a failed launch) never sees half a file. An
    error names ``path``, not the temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    except OSError as exc:
        raise OSError(f"cannot write {path}: {exc.strerror}") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the output gets a new file's usual mode
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created if absent) while the block runs: another process (another
    rank, another job on the machine) waits at its ``with`` until this block ends. Where there is no ``fcntl``
    (Windows) there is no lock, and callers rely on :func:`atomic_write`'s renames alone."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def broadcast_object(obj, group=None):
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    group = active_group(group)
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def first_published(key: str, value: str) -> str:
    """The value that the first rank to get here published under ``key`` in the default process group's store
    (an atomic compare-and-set: later ranks read it, nobody waits); ``value`` itself without a store."""
    try:
        store = dist.distributed_c10d._get_default_store()
        got = store.compare_set(key, "", value)
    except Exception:  # noqa: BLE001 - no default group, or a store without compare_set: decide locally
        return value
    got = got.decode() if isinstance(got, bytes) else str(got)
    return got or value


class Blocks:
    """Finished work kept on disk in blocks, so that a killed run resumes where it stopped (``--resume``).

    Each block is one JSON file (``block-<first item>-<random>.json``) written atomically by the rank that did the
    work: a header saying what the work is (the steering's digest, the data's digest, the multipliers, ...) and
    ``{item index: result}``. :meth:`load` reads every block a rank can see, refuses in one line a block whose header
    differs (another steering, data set or m grid is never mixed in), and unites what all ranks saw, so every rank
    agrees on what is done even where the nodes share no file system. Temporary files of a write that was cut off
    are not blocks: they are removed.

    Example::

        >>> blocks = Blocks("out/blocks", {"steering": s.digest(), "pairs": pairs_digest(pairs)}, "log-odds sweep")
        >>> done = blocks.load() if resume else blocks.clear()
        >>> blocks.write({7: [..], 8: [..]})
    """

    FORMAT = "fastsplit.blocks/1"

    def __init__(self, folder: str, header: dict, what: str, group=None):
        self.folder, self.what, self.group = folder, what, active_group(group)
        self.header = {"format": self.FORMAT, "work": what, **header}

    def _files(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, f) for f in os.listdir(self.folder)
                      if f.startswith("block-") and f.endswith(".json"))

    def _remove_partial(self) -> None:
        if os.path.isdir(self.folder):
            for f in os.listdir(self.folder):
                if f.startswith(".tmp-"):
                    try:
                        os.remove(os.path.join(self.folder, f))
                    except OSError:  # another rank removed it first
                        pass

    def load(self) -> dict:
        """{index: result} of every finished item, on every rank (a collective under a process group)."""
        import json

        def read() -> list:
            self._remove_partial()
            items = []
            for path in self._files():
                try:
                    with open(path) as f:
                        block = json.load(f)
                except (OSError, ValueError) as exc:
                    raise ValueError(f"{path} is not a readable block of a {self.what} ({exc})") from None
                head = block.get("header", {})
                if head != self.header:
                    diff = sorted(k for k in set(head) | set(self.header) if head.get(k) != self.header.get(k))
                    raise ValueError(f"{path} holds a {head.get('work', 'run')} of other {', '.join(diff)} than this "
                                     f"{self.what}: remove {self.folder} or resume with the same inputs")
                items += [(int(k), v) for k, v in block["items"].items()]
            return items
        found = all_gather_list([agree(read, self.group, what=f"resume of the {self.what}")], self.group,
                                what=f"resume of the {self.what}")
        return dict(pair for part in found for pair in part)

    def clear(self) -> dict:
        """Remove the blocks of an earlier run (every rank removes what it sees); returns an empty done-set."""
        def remove():
            for path in self._files():
                try:
                    os.remove(path)
                except FileNotFoundError:  # another rank on the same file system removed it
                    pass
            self._remove_partial()
        agree(remove, self.group, what=f"start of the {self.what}")
        return {}

    def write(self, items: dict) -> None:
        """One block of finished items, whole or not at all."""
        import json
        import uuid

        if not items:
            return
        os.makedirs(self.folder, exist_ok=True)
        first = min(items)
        path = os.path.join(self.folder, f"block-{first:07d}-{uuid.uuid4().hex[:8]}.json")
        doc = {"header": self.header, "items": {str(k): v for k, v in items.items()}}

        def dump(p):
            with open(p, "w") as f:
                json.dump(doc, f)
        atomic_write(path, dump)

    def remove(self) -> None:
        """Delete the blocks (rank 0, after the outputs are written): the run is complete."""
        if not is_main(self.group):
            return
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
