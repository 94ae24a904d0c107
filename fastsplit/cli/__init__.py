"""Command line: ``fastsplit train | generate | sweep | demo | info``. Thin: parse, call the library, print.

Every command exits non-zero with a one-line reason on error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ._common import floats, read_pairs, read_prompts


def _cmd_info(args) -> int:
    import fastsplit

    print(json.dumps(fastsplit.build_info(), indent=2))
    return 0


def _cmd_train(args) -> int:
    import fastsplit
    from fastsplit.hf import load_model

    model, tok = load_model(args.model)
    pairs = read_pairs(args.data)
    train_pairs, test_pairs = fastsplit.split_pairs(pairs, test_size=args.test_size, seed=args.seed)
    steering = fastsplit.attach(model, args.layer, args.form, rank=args.rank, site=args.site)
    os.makedirs(args.out, exist_ok=True)
    result = fastsplit.train(model, tok, steering, train_pairs, loss=args.loss, lambda_p=args.lambda_p,
                             lambda_n=args.lambda_n, gamma=args.gamma, theta=args.theta, reduction=args.reduction,
                             steering_factors=args.factors, lr=args.lr, epochs=args.epochs,
                             batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed,
                             pair_types=args.pair_types.split(","), checkpoint_dir=os.path.join(args.out, "checkpoints"),
                             resume=args.resume, progress=not args.quiet)
    path = os.path.join(args.out, "steering.safetensors")
    steering.save(path)
    summary = {"steering": path, "train_pairs": len(train_pairs), "test_pairs": len(test_pairs), **result,
               "options": {k: v for k, v in vars(args).items() if k != "func"}}
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump(summary, f, indent=2)
    last = result["history"][-1]
    print(f"trained {args.form} at layer {args.layer}: loss {last['loss']:.4f}, "
          f"preference log-odds {last['pref_log_odds']:+.4f}; wrote {path}")
    return 0


def _cmd_generate(args) -> int:
    import fastsplit
    from fastsplit.hf import load_model

    model, tok = load_model(args.model)
    steering = fastsplit.load_steering(model, args.steering, check_model_name=not args.any_model)
    prompts = read_prompts(args)
    texts = fastsplit.generate_sweep(model, tok, steering, prompts, args.multipliers,
                                     max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    rows = [{"prompt": p, "multiplier": m, "text": texts[i][j]}
            for i, p in enumerate(prompts) for j, m in enumerate(args.multipliers)]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


def _common_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF model folder")
    p.add_argument("--data", default="demo", help="pairs file (.jsonl/.csv/.parquet) or 'demo' for the built-in set")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--form", choices=["vector", "lora", "local_weight"], default="vector")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--site", choices=["down_proj", "residual"], default="down_proj")
    p.add_argument("--test-size", type=float, default=0.2, help="held-out fraction of the pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--factors", type=floats, default=[1.0], help="steering factors to draw from, e.g. 0.5,1,2")
    p.add_argument("--pair-types", default="add", help="'add', 'sub' or 'add,sub'")
    p.add_argument("--loss", choices=["split", "sft"], default="split")
    p.add_argument("--lambda-p", type=float, default=1.0)
    p.add_argument("--lambda-n", type=float, default=0.5)
    p.add_argument("--gamma", type=float, default=5.0)
    p.add_argument("--theta", type=float, default=0.4)
    p.add_argument("--reduction", choices=["batch", "pair"], default="batch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import analysis

    p = argparse.ArgumentParser(prog="fastsplit", description="Fused kernels and workflows for steering language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a steering intervention with SPLIT; writes steering.safetensors + train.json")
    _common_train_args(t)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate at many strengths in shared batches; JSONL out")
    g.add_argument("--model", default="default")
    g.add_argument("--steering", required=True, help="a steering.safetensors written by 'fastsplit train'")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="a file of prompts: one per line, or JSONL with a 'prompt' field")
    g.add_argument("--multipliers", type=floats, default=[-4.0, -2.0, 0.0, 2.0, 4.0],
                   help="comma-separated; write --multipliers=-4,0,4 when the list starts with '-'")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--out", help="JSONL output (default: stdout)")
    g.add_argument("--any-model", action="store_true", help="skip the check that the steering was trained on this model")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=_cmd_generate)

    analysis.add_commands(sub)

    i = sub.add_parser("info", help="print what this install can run (build_info) as JSON")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"fastsplit {args.command}: error: {exc}".splitlines()[0], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
