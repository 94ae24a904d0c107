"""Argument types, readers and the checks every command runs before a model loads."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile


_work = {"started": False}


def begin_work() -> None:
    """Mark that the command's inputs are checked and its work (loading a model, tuning, writing) begins: an error
    from here on is a runtime failure (exit 1); one before it is a usage error (exit 2)."""
    _work["started"] = True


def work_started() -> bool:
    return _work["started"]


def reset_work() -> None:
    _work["started"] = False


def floats(text: str) -> list[float]:
    """``"-4,0,4"`` -> [-4.0, 0.0, 4.0]; finite numbers only."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    if not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return vals


def _bounded(kind, low, *, strict: bool, what: str):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


positive_int = _bounded(int, 0, strict=True, what="a positive integer")
nonneg_int = _bounded(int, 0, strict=False, what="an integer >= 0")
positive_float = _bounded(float, 0.0, strict=True, what="a positive number")
nonneg_float = _bounded(float, 0.0, strict=False, what="a number >= 0")


def test_size(text: str) -> float | int:
    """A held-out fraction in [0, 1) or a count >= 1 of pairs; 0 means no hold-out."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole count, got {text!r}") from None
    if v >= 1:
        if v != int(v):
            raise argparse.ArgumentTypeError(f"a count of pairs must be whole, got {text!r}")
        return int(v)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole count, got {text!r}")
    return v


def pair_types(text: str) -> list[str]:
    kinds = [t.strip() for t in text.split(",") if t.strip()]
    if not kinds or any(k not in ("add", "sub") for k in kinds):
        raise argparse.ArgumentTypeError(f"expected 'add', 'sub' or 'add,sub', got {text!r}")
    return kinds


def read_pairs(spec: str):
    import fastsplit

    return fastsplit.demo_pairs() if spec == "demo" else fastsplit.load_pairs(spec)


def write_pairs(pairs, path: str) -> None:
    """Pairs as persona-format JSONL, which ``--data`` reads back."""
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"question": p.prompt, "answer_matching_behavior": p.positive,
                                "answer_not_matching_behavior": p.negative}) + "\n")


def save_json(path: str, obj) -> None:
    """``obj`` as indented JSON at ``path``, whole or not at all (written to a temporary file, then renamed)."""
    from fastsplit.dist import atomic_write

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise FileNotFoundError(f"no prompts file at {args.prompts}")
        with open(args.prompts, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if line.startswith("{"):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{args.prompts}:{n}: not valid JSON ({exc.msg})") from None
                    if not isinstance(row.get("prompt"), str):
                        raise ValueError(f"{args.prompts}:{n}: a JSON line needs a string field 'prompt'")
                    line = row["prompt"]
                prompts.append(line)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts file")
    return prompts


def model_config(args):
    """The chosen model's config only (no weights): enough to check layers and steering files up front."""
    from fastsplit.hf import load_config

    return load_config(args.model)


def checked_layer(layer: int, config) -> int:
    """The layer as an index in [0, n): a negative layer counts from the last (-1 is n - 1)."""
    from fastsplit.hf import resolve_layer

    return resolve_layer(layer, config.num_hidden_layers)


def checked_steering(path: str, config, any_model: bool) -> dict:
    from fastsplit.hf import check_steering_metadata, read_steering_metadata

    meta = read_steering_metadata(path)
    check_steering_metadata(meta, config, path, check_model_name=not any_model)
    return meta


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="'auto' (a GPU if there is one, else the CPU), 'cpu', 'cuda' (under torchrun: "
                        "this rank's GPU) or 'cuda:N'")


def device_of(args) -> str:
    return resolve_device(args.device)


def resolve_device(device: str) -> str:
    """--device as a torch device: 'auto' and 'cuda' become this rank's GPU (LOCAL_RANK, 0 without torchrun),
    'auto' without a GPU the CPU; anything else is kept."""
    import torch

    if device not in ("auto", "cuda"):
        return device
    if device == "cuda" or torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def launched_world() -> int:
    """The number of processes torchrun (or another launcher setting WORLD_SIZE) started: 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """Under torchrun, one process group for the command: NCCL when the command runs on GPUs (``device``
    "auto" with a GPU, or "cuda..."), gloo on the CPU. The workflows find it by themselves and shard their
    work. Ranks other than 0 print nothing to stdout: rank 0 reports and writes. Without a launcher this does
    nothing."""
    if launched_world() <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if resolve_device(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    from fastsplit.dist import shutdown, timeout

    kw = {"timeout": timeout()} if timeout() is not None else {}
    dist.init_process_group(backend, **kw)  # FASTSPLIT_DIST_TIMEOUT: how long ranks wait on a lost peer
    quiet = None if dist.get_rank() == 0 else open(os.devnull, "w")
    ok = False
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            yield
        ok = True
    finally:
        if quiet:
            quiet.close()
        shutdown(barrier=ok)  # the barrier only after success: on an error a peer may be gone


def is_main() -> bool:
    from fastsplit import dist

    return dist.is_main()


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, as it would be typed (lists comma-joined); none for required options,
    flags, options without a default, or help that already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (action.required or d is None or d is argparse.SUPPRESS or "default:" in text
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction))):
            return text
        if isinstance(d, (list, tuple)):
            d = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in d)
        return f"{text} (default: {str(d).replace('%', '%%')})"


class ArgumentParser(argparse.ArgumentParser):
    """One line on stderr for a usage error (``fastsplit train: error: ...``, exit 2); the usage text only when a
    required argument is missing, where it is what the user needs."""

    def error(self, message):
        if message.startswith("the following arguments are required"):
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def writable_dir(path: str, flag: str = "--out", *, shown: str | None = None) -> None:
    """That folder ``path`` can be made (as the command will make it) and written, checked by making it and writing a
    probe file there; every folder made for the check is removed again, so a failing command leaves nothing.
    Under torchrun only rank 0 checks: it alone writes the outputs, and ranks probing one folder would race."""
    if not is_main():
        return
    target = os.path.abspath(path)
    shown = shown or path
    if os.path.exists(target) and not os.path.isdir(target):
        where = "" if shown == path else f": {target} is"
        raise ValueError(f"{flag} {shown}{where or ' is'} a file, not a folder")
    missing, up = [], target
    while not os.path.exists(up):
        missing.append(up)
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise ValueError(f"{flag} {shown} cannot be made: {up} is a file, not a folder")
    made, step = [], None
    try:
        for folder in reversed(missing):
            step = f"the folder {folder} cannot be made"
            try:
                os.mkdir(folder)
                made.append(folder)
            except FileExistsError:  # made meanwhile by another process: it is there, which is what counts
                pass
        step = f"{target} does not take new files"
        fd, probe = tempfile.mkstemp(dir=target, prefix=".fastsplit-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {shown} cannot be written: {step} ({exc.strerror or exc})") from None
    finally:
        for folder in reversed(made):
            try:
                os.rmdir(folder)
            except OSError:  # another process wrote into it meanwhile: it stays, as that process made use of it
                pass


def writable_file(path: str, flag: str = "--out") -> None:
    """That file ``path`` can be written (its folder made if missing, as the command will), before any work."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder, not a file")
    writable_dir(os.path.dirname(os.path.abspath(path)), flag, shown=path)


def check_device(device: str) -> None:
    """``--device`` names a device this torch build has: auto, cpu, cuda or cuda:N (N below the GPU count)."""
    if device in ("auto", "cpu"):
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if d.type != "cuda":
        raise ValueError(f"--device {device}: fastsplit runs on cpu or cuda")
    if not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device {device}: no CUDA device is available (torch {torch.__version__}, {build})")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
