"""``fastsplit generate``: batched generation over many strengths, JSONL out."""
from __future__ import annotations

import json

from ._common import (add_device_option, checked_steering, floats, is_main, model_config, positive_int, read_prompts,
                      writable_file)


def run(args) -> int:
    import fastsplit

    from .analysis import Engines, check_vllm

    check_vllm(args, unsupported={})
    prompts = read_prompts(args)
    checked_steering(args.steering, model_config(args), args.any_model)
    if args.resume and not args.out:
        raise ValueError("--resume continues a generation into --out (its finished prompts are kept beside it): "
                         "give --out")
    if args.out:
        writable_file(args.out)
    blocks = f"{args.out}.blocks" if args.out else None  # finished prompts, so a killed run resumes
    with Engines(args, [args.steering]).of(args.steering) as engine:
        texts = fastsplit.generate_sweep(engine, prompts, args.multipliers, max_new_tokens=args.max_new_tokens,
                                         progress=not args.quiet, checkpoint_dir=blocks, resume=args.resume)
    if not is_main():  # under torchrun every rank holds all the texts; rank 0 writes them
        return 0
    rows = [{"prompt": p, "multiplier": m, "text": texts[i][j]}
            for i, p in enumerate(prompts) for j, m in enumerate(args.multipliers)]
    if args.out:
        import os

        from fastsplit.dist import atomic_write

        def write(path):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # as train makes its folder
        atomic_write(args.out, write)
        import shutil

        shutil.rmtree(blocks, ignore_errors=True)  # complete
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


def add_command(sub, formatter) -> None:
    g = sub.add_parser("generate", help="generate at many strengths in shared batches; JSONL out",
                       formatter_class=formatter)
    g.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF model folder")
    g.add_argument("--steering", required=True, help="a steering.safetensors written by 'fastsplit train'")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="a file of prompts: one per line, or JSONL with a 'prompt' field")
    g.add_argument("--multipliers", type=floats, default=[-4.0, -2.0, 0.0, 2.0, 4.0],
                   help="comma-separated strengths; write --multipliers=-4,0,4 when the list starts with '-'")
    g.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per row")
    g.add_argument("--out", help="JSONL output file, its folder made if missing (default: stdout)")
    g.add_argument("--any-model", action="store_true", help="skip the check that the steering was trained on this model")
    from .analysis import add_engine_options

    add_engine_options(g)
    g.add_argument("--resume", action="store_true",
                   help="continue a generation that was stopped: the prompts finished in OUT.blocks are not run again")
    add_device_option(g)
    g.add_argument("--quiet", action="store_true", help="no progress bars and no loading messages")
    g.set_defaults(func=run)
