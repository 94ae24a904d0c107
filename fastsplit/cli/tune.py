"""``fastsplit tune``: measure backend="auto"'s candidates at a model's steerable shapes and cache the routes."""
from __future__ import annotations

import os

from ._common import add_device_option, begin_work, device_of, model_config, positive_int, save_json, writable_file

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _rows(text: str) -> list[int]:
    import argparse

    try:
        rows = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated row counts, got {text!r}") from None
    if not rows or any(r < 1 for r in rows):
        raise argparse.ArgumentTypeError(f"expected positive row counts, got {text!r}")
    return rows


def _forms(text: str) -> list[str]:
    import argparse

    from fastsplit.tuning import FORMS

    forms = [f.strip() for f in text.split(",") if f.strip()]
    if not forms or any(f not in FORMS for f in forms):
        raise argparse.ArgumentTypeError(f"expected forms among {','.join(FORMS)}, got {text!r}")
    return forms


def run(args) -> int:
    import torch

    from fastsplit import tuning as _tune
    from fastsplit.tuning import format_table, tune_shapes

    if args.json:
        writable_file(args.json, "--json")
    config = model_config(args)
    device = torch.device(device_of(args))
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")])
    k = int(getattr(config, "intermediate_size", 0) or 4 * config.hidden_size)
    n, vocab = int(config.hidden_size), int(config.vocab_size)
    print(f"tuning {args.model}'s down_proj ({k} -> {n}) and its SPLIT loss (V {vocab}) in {dtype} on "
          f"{_tune.device_identity(device)['name']}")
    path = _tune.cache_path(device)

    def write(results):
        if args.json:
            save_json(args.json, {"device": _tune.device_identity(device), "software": _tune.software(),
                                  "dtype": str(dtype).replace("torch.", ""), "cache": path, "results": results})
    begin_work()
    results = tune_shapes(k=k, n=n, vocab=None if args.no_loss else vocab, hidden=n, dtype=dtype, rows=args.rows,
                          forms=args.forms, loss_rows=args.loss_rows, rank=args.rank, device=device,
                          force=args.force, progress=not args.quiet, on_result=write)
    print(format_table(results))
    print(f"routes cached in {path}" if os.path.exists(path) else "nothing to cache (every case had one candidate)")
    return 0


def add_command(sub, formatter) -> None:
    t = sub.add_parser("tune", help="measure backend='auto''s candidates at a model's shapes on this device and "
                       "cache the fastest correct ones", formatter_class=formatter)
    t.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF model folder "
                   "(only its config is read)")
    t.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    t.add_argument("--rows", type=_rows, default=[1, 16, 512, 4096], help="token rows per call to tune for")
    t.add_argument("--forms", type=_forms, default=["vector", "lora", "local_weight"], help="forms to tune")
    t.add_argument("--rank", type=positive_int, default=16, help="LoRA rank")
    t.add_argument("--loss-rows", type=positive_int, default=4096, help="token rows a side for the SPLIT loss")
    t.add_argument("--no-loss", action="store_true", help="do not tune the SPLIT loss")
    t.add_argument("--force", action="store_true", help="measure again the keys the cache already holds")
    t.add_argument("--json", default=None, help="also write the table as JSON here")
    add_device_option(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run)
