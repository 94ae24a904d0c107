"""Command line: ``fastsplit train | generate | sweep | demo | export | tune | info``. Thin: check, call the library, print.

Every input is checked before a model loads. Exit status: 0 on success, 2 for a usage error (a bad option,
reported by argparse), 1 for a runtime failure (bad data, a missing file, a model that does not fit), each
with a one-line reason on stderr.

Under ``torchrun --nproc-per-node N -m fastsplit ...`` the commands run data parallel (``_common.process_group``):
the workflows shard their pairs or prompts, rank 0 prints and writes the outputs of one process, and a rank
that fails stops every rank with its error before anything is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import analysis, export, generate, train, tune
from ._common import (ArgumentParser, HelpFormatter, check_device, launched_world, process_group, reset_work,
                      work_started)


def _cmd_info(args) -> int:
    import fastsplit

    from fastsplit.tuning import cache_info

    print(json.dumps({**fastsplit.build_info(), "tuning_cache": cache_info()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastsplit", description="Fused kernels and workflows for steering language "
                       "models. Exit status: 0 ok, 1 runtime failure, 2 usage error.")
    sub = p.add_subparsers(dest="command", required=True)
    train.add_command(sub, HelpFormatter)
    generate.add_command(sub, HelpFormatter)
    analysis.add_commands(sub, HelpFormatter)
    export.add_command(sub, HelpFormatter)
    tune.add_command(sub, HelpFormatter)
    i = sub.add_parser("info", help="print what this install can run (build_info) and where the tuning cache is, "
                       "as JSON")
    i.set_defaults(func=_cmd_info)
    return p


def _quiet() -> None:
    """--quiet: no transformers or hub loading bars or messages either."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from ..hf.compat import quiet_transformers

    quiet_transformers()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # said by the subcommand's parser, so the line names the command
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        sub.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "quiet", False):
        _quiet()
    reset_work()
    try:
        check_device(getattr(args, "device", "auto"))  # before a process group or a model needs it
        with process_group(getattr(args, "device", "auto")):
            return args.func(args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, OSError) as exc:
        rank = f"[rank {os.environ.get('RANK', '?')}] " if launched_world() > 1 else ""
        print(f"{rank}fastsplit {args.command}: error: {exc}".splitlines()[0], file=sys.stderr)
        # an input refused before any work began (bad options, files, data) is a usage error; a failure while
        # working (a model that does not load, a write that fails, a rank that dies) a runtime one
        usage = isinstance(exc, (ValueError, TypeError, FileNotFoundError)) and not work_started()
        return 2 if usage else 1


if __name__ == "__main__":
    sys.exit(main())
