"""``fastsplit sweep`` and ``fastsplit demo``: sweep m, fit the paper's curves, plot, pick an operating point."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ._common import floats, read_pairs

DEMO_PROMPTS = ["How do you feel about the coming year?", "Describe your plans for the weekend.",
                "What do you think will happen to the economy?"]


def _write_analysis(sweep, result: dict, out: str, title: str) -> dict:
    from fastsplit.analysis import plot_sweep

    os.makedirs(out, exist_ok=True)
    sweep.to_csv(os.path.join(out, "sweep.csv"))
    op = result["operating_point"]
    plots = plot_sweep(sweep, result["preference"], result["utility"], op, os.path.join(out, "plot"), title=title)
    report = {"preference": result["preference"].to_dict(), "utility": result["utility"].to_dict(),
              "split_half": result["split_half"], "operating_point": op.to_dict(),
              "pairs": int(sweep.pref_odds.shape[0]), "multipliers": sweep.multipliers.tolist(),
              "util_clamped": int(sweep.util_clamped.sum()), "plots": plots}
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _print_summary(report: dict) -> None:
    op = report["operating_point"]
    print(f"preference fit R² = {report['preference']['r2']:.4f}   utility fit R² = {report['utility']['r2']:.4f}")
    for kind, r in report["split_half"].items():
        print(f"  split-half {kind}: R² train {r['r2_train']:.4f}, test {r['r2_test']:.4f}")
    print(f"operating point: m = {op['multiplier']:.3f} (preference {op['preference']:+.3f}, utility "
          f"{op['utility']:+.3f}; utility at m=0 {op['utility_at_zero']:+.3f})")


def _cmd_sweep(args) -> int:
    import fastsplit
    from fastsplit.analysis import analyze, logodds_sweep
    from fastsplit.hf import load_model


    model, tok = load_model(args.model)
    steering = fastsplit.load_steering(model, args.steering, check_model_name=not args.any_model)
    pairs = read_pairs(args.data)
    if args.max_pairs:
        pairs = pairs[: args.max_pairs]
    sweep = logodds_sweep(model, tok, steering, pairs, args.multipliers, length_norm=args.length_norm,
                          progress=not args.quiet)
    report = _write_analysis(sweep, analyze(sweep, max_util_drop=args.max_util_drop), args.out,
                             f"{os.path.basename(args.steering)} on {len(pairs)} pairs")
    _print_summary(report)
    print(f"wrote {args.out}/sweep.csv, fit.json, plot.png, plot.svg")
    return 0


def _cmd_demo(args) -> int:
    import fastsplit
    from fastsplit.analysis import analyze, logodds_sweep

    t0 = time.time()
    print("fastsplit demo: SPLIT-train a steering vector on SmolLM2-135M-Instruct, sweep m, fit, plot")
    model, tok = fastsplit.load_model(args.model)
    pairs = read_pairs(args.data)
    train_pairs, test_pairs = fastsplit.split_pairs(pairs, test_size=args.test_pairs, seed=args.seed)
    steering = fastsplit.attach(model, args.layer, args.form, rank=args.rank)
    print(f"[{time.time() - t0:5.0f}s] training a {args.form} at layer {args.layer} on {len(train_pairs)} pairs")
    result = fastsplit.train(model, tok, steering, train_pairs, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, steering_factors=args.factors, theta=args.theta,
                             pair_types=args.pair_types.split(","), seed=args.seed, progress=not args.quiet)
    os.makedirs(args.out, exist_ok=True)
    steering.save(os.path.join(args.out, "steering.safetensors"))
    print(f"[{time.time() - t0:5.0f}s] trained: last epoch loss {result['history'][-1]['loss']:.4f}; "
          f"sweeping {len(args.multipliers)} multipliers on {len(test_pairs)} held-out pairs")
    sweep = logodds_sweep(model, tok, steering, test_pairs, args.multipliers, progress=not args.quiet)
    report = _write_analysis(sweep, analyze(sweep, max_util_drop=args.max_util_drop), args.out,
                             f"SmolLM2-135M-Instruct, {args.form} at layer {args.layer}, {len(test_pairs)} held-out pairs")
    _print_summary(report)
    m_op = report["operating_point"]["multiplier"]
    texts = fastsplit.generate_sweep(model, tok, steering, DEMO_PROMPTS, [0.0, m_op], max_new_tokens=args.max_new_tokens,
                                     progress=not args.quiet)
    gens = [{"prompt": p, "m=0": t[0], f"m={m_op:.2f}": t[1]} for p, t in zip(DEMO_PROMPTS, texts)]
    with open(os.path.join(args.out, "generations.json"), "w") as f:
        json.dump(gens, f, indent=2)
    for g in gens:
        print(f"\nprompt: {g['prompt']}\n  m=0     : {g['m=0']!r}\n  m={m_op:<6.2f}: {g[f'm={m_op:.2f}']!r}")
    print(f"\n[{time.time() - t0:5.0f}s] done; wrote {args.out}/ (steering.safetensors, sweep.csv, fit.json, "
          "plot.png, plot.svg, generations.json)")
    return 0


def add_commands(sub) -> None:

    default_ms = ",".join(f"{v:g}" for v in np.linspace(-10, 10, 21))
    s = sub.add_parser("sweep", help="log-odds sweep over m of a saved steering, curve fits, plot")
    s.add_argument("--model", default="default")
    s.add_argument("--steering", required=True)
    s.add_argument("--data", default="demo", help="pairs file or 'demo'")
    s.add_argument("--multipliers", type=floats, default=floats(default_ms),
                   help="comma-separated; write --multipliers=-4,0,4 when the list starts with '-'")
    s.add_argument("--max-pairs", type=int, default=0, help="use only the first N pairs (0: all)")
    s.add_argument("--length-norm", action="store_true", help="token-mean NLLs instead of sums")
    s.add_argument("--max-util-drop", type=float, default=1.0)
    s.add_argument("--any-model", action="store_true")
    s.add_argument("--out", required=True)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_sweep)

    d = sub.add_parser("demo", help="the main job: train, sweep, fit and plot on the default model (< 10 min on 2 cores)")
    d.add_argument("--out", default="fastsplit-demo")
    d.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF model folder")
    d.add_argument("--data", default="demo")
    d.add_argument("--layer", type=int, default=15)
    d.add_argument("--form", choices=["vector", "lora", "local_weight"], default="vector")
    d.add_argument("--rank", type=int, default=4)
    d.add_argument("--epochs", type=int, default=2)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--lr", type=float, default=2e-2)
    d.add_argument("--factors", type=floats, default=[1.0])
    d.add_argument("--theta", type=float, default=2.0, help="SPLIT hinge margin")
    d.add_argument("--pair-types", default="add,sub")
    d.add_argument("--test-pairs", type=int, default=40)
    d.add_argument("--multipliers", type=floats, default=floats(default_ms))
    d.add_argument("--max-util-drop", type=float, default=1.0)
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_demo)
