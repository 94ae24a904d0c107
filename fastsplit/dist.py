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
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["active_group", "rank", "world_size", "is_main", "shard_range", "check_world", "all_gather_list",
           "agree", "atomic_write", "broadcast_object"]


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


def check_world(n: int, what: str, group=None) -> None:
    """Refuse a world larger than the work: a rank with nothing to do would only wait."""
    w = world_size(group)
    if w > n:
        raise ValueError(f"the world size {w} is larger than the number of {what} ({n}): launch at most {n} "
                         f"processes, or give more {what}")


def all_gather_list(items: Sequence[Any], group=None) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order, on every rank."""
    if group is None:
        return list(items)
    out: list = [None] * world_size(group)
    dist.all_gather_object(out, list(items), group=group)
    return [x for part in out for x in part]


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
    errors = all_gather_list([None if err is None else f"{type(err).__name__}: {err}"], group)
    if err is not None:
        raise err
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise RuntimeError(f"rank {r} failed during the {what}, so every rank stops: {e}")
    return out


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


def broadcast_object(obj, group=None):
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    group = active_group(group)
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]
