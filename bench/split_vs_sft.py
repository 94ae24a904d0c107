"""SPLIT against SFT on held-out pairs, the comparison of the paper's Table 3 (arXiv 2602.02343), measured on
real polarity-paired data: Anthropic's persona evals in ../shared/data (skipped when absent).

For each concept, one seed-fixed split; a SPLIT and an SFT vector trained on the same pairs with the same seed,
layer and optimiser (the demo's settings); both swept over m on the held-out pairs; and for each:
  * ``fastsplit.analyze``: both fits, held-out-m R², the operating point m_op and its pair-bootstrap interval;
  * the measured preference gain at m_op, pref(m_op) − pref(0), and the measured utility cost there,
    util(0) − util(m_op), as pair means with pair-bootstrap 95% intervals;
  * matched utility (Table 3's question, with no fit in between): the largest measured mean preference gain
    among swept m > 0 whose measured mean utility drop stays within the limit, the m re-chosen per resample;
  * the answer groups (pairs by their positive's first token) and the share of pairs whose preference rises.

Run: python bench/split_vs_sft.py [--concepts psychopathy,narcissism] [--train 200] [--test 60] [--out DIR]
Writes DIR/split_vs_sft.json and prints one markdown table (the one in bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np

import fastsplit
from fastsplit.analysis import analyze, logodds_sweep

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "anthropic-evals")
MULTIPLIERS = [float(m) for m in range(-10, 11)]


def at(values: np.ndarray, ms: np.ndarray, m: float) -> np.ndarray:
    """Per-pair values [N] at strength m, linear between swept strengths."""
    order = np.argsort(ms)
    return np.array([np.interp(m, ms[order], row[order]) for row in values])


def gains(sweep, m: float, rows=None):
    """(mean preference gain, mean measured utility cost) at m, over ``rows`` (all pairs by default)."""
    rows = np.arange(sweep.pref_odds.shape[0]) if rows is None else rows
    ms = sweep.multipliers
    gain = at(sweep.pref_odds[rows], ms, m) - at(sweep.pref_odds[rows], ms, 0.0)
    cost = at(sweep.util_odds[rows], ms, 0.0) - at(sweep.util_odds[rows], ms, m)
    return float(gain.mean()), float(cost.mean())


def matched(sweep, rows, limit: float):
    """(m, gain, cost): the swept m > 0 with the largest mean preference gain whose mean utility cost ≤ limit."""
    best = (0.0, 0.0, 0.0)
    for m in sweep.multipliers[sweep.multipliers > 0]:
        g, c = gains(sweep, float(m), rows)
        if c <= limit and g > best[1]:
            best = (float(m), g, c)
    return best


def interval(samples) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def measure(sweep, report, *, limit: float, n_boot: int, seed: int) -> dict:
    op = report["operating_point"]
    N = sweep.pref_odds.shape[0]
    rng = np.random.default_rng(seed)
    boot = {"gain": [], "cost": [], "matched_gain": [], "matched_m": []}
    for _ in range(n_boot):
        rows = rng.integers(0, N, N)
        g, c = gains(sweep, op.multiplier, rows)
        mm, mg, _ = matched(sweep, rows, limit)
        boot["gain"].append(g), boot["cost"].append(c), boot["matched_gain"].append(mg), boot["matched_m"].append(mm)
    g, c = gains(sweep, op.multiplier)
    mm, mg, mc = matched(sweep, None, limit)
    groups = report["groups"]
    share = at(np.asarray(groups["share_rising"])[None], sweep.multipliers, groups["m_probe"])[0]
    return {"m_op": op.multiplier, "m_op_ci": (report["bootstrap"] or {}).get("m_op"),
            "at_edge": op.at_edge, "within_limit": op.within_limit,
            "gain": g, "gain_ci": interval(boot["gain"]), "cost": c, "cost_ci": interval(boot["cost"]),
            "matched": {"m": mm, "gain": mg, "cost": mc, "gain_ci": interval(boot["matched_gain"]),
                        "m_ci": interval(boot["matched_m"])},
            "r2": {"preference": report["preference"].r2, "utility": report["utility"].r2},
            "heldout_m_r2": report["heldout_m"],
            "groups": {k: {"pairs": v["pairs"], "change_at_probe": v["change_at_probe"]}
                       for k, v in groups["by_group"].items()},
            "m_probe": groups["m_probe"], "share_rising_at_probe": float(share),
            "opposite_groups": groups["opposite"], "warnings": report["warnings"]}


def run_concept(model, tok, name, args) -> dict:
    pairs = fastsplit.load_pairs(os.path.join(DATA, f"{name}.jsonl"))
    train_pairs, rest = fastsplit.split_pairs(pairs, test_size=len(pairs) - args.train, seed=args.seed)
    test_pairs = rest[:args.test]
    if args.balance:  # the same held-out pairs; training drawn from the rest with each answer equally often
        held = set(map(id, test_pairs))
        pool = [p for p in train_pairs + rest if id(p) not in held]
        answers = sorted({p.positive for p in pool})
        per = args.train // len(answers)
        train_pairs = [p for a in answers for p in [q for q in pool if q.positive == a][:per]]
        if len(train_pairs) != per * len(answers):
            raise SystemExit(f"--balance: fewer than {per} training pairs for some answer of {name}")
    out = {"concept": name, "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
           "train_answers": dict(Counter(p.positive for p in train_pairs)),
           "test_answers": dict(Counter(p.positive for p in test_pairs)), "methods": {}}
    for loss in args.losses.split(","):
        t0 = time.time()
        steering = fastsplit.attach(model, args.layer, "vector")
        fastsplit.train(model, tok, steering, train_pairs, loss=loss, theta=args.theta, pair_types=("add", "sub"),
                        lr=args.lr, epochs=args.epochs, batch_size=8, seed=args.seed, progress=args.progress)
        t_train = time.time() - t0
        sweep = logodds_sweep(model, tok, steering, test_pairs, MULTIPLIERS, progress=args.progress)
        report = analyze(sweep, max_util_drop=args.limit, bootstrap_samples=args.bootstrap, seed=args.seed)
        out["methods"][loss] = measure(sweep, report, limit=args.limit, n_boot=args.bootstrap, seed=args.seed) | {
            "vector_norm": float(steering.parameters()[0].detach().norm()), "train_s": t_train,
            "sweep_and_fit_s": time.time() - t0 - t_train}
        sweep.to_csv(os.path.join(args.out, f"sweep_{name}_{loss}.csv"))
        steering.detach()
        print(f"{name} {loss}: {json.dumps(out['methods'][loss]['matched'])}", file=sys.stderr)
    return out


def ci(x, lo_hi) -> str:
    return f"{x:+.2f} [{lo_hi[0]:+.2f}, {lo_hi[1]:+.2f}]"


def table(results, limit) -> str:
    head = ("| concept | loss | m_op [95% CI] | pref gain at m_op | util cost at m_op | best gain with cost ≤ "
            f"{limit:g} (at m) | groups: change at m_probe | share rising | R² pref / util (held-out m) |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        for loss, v in r["methods"].items():
            mci = v["m_op_ci"] or [float("nan")] * 2
            groups = ", ".join(f"{k.strip()!s} ({g['pairs']}) {g['change_at_probe']:+.2f}" for k, g in v["groups"].items())
            lines.append(
                f"| {r['concept']} | {loss} | {v['m_op']:.2f} [{mci[0]:.2f}, {mci[1]:.2f}]{' edge' if v['at_edge'] else ''}"
                f" | {ci(v['gain'], v['gain_ci'])} | {ci(v['cost'], v['cost_ci'])} | "
                f"{ci(v['matched']['gain'], v['matched']['gain_ci'])} ({v['matched']['m']:g}) | {groups} "
                f"(m = {v['m_probe']:.2f}) | {v['share_rising_at_probe']:.2f} | {v['r2']['preference']:.3f} / "
                f"{v['r2']['utility']:.3f} ({v['heldout_m_r2']['preference']:.3f} / {v['heldout_m_r2']['utility']:.3f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--concepts", default="psychopathy,narcissism", help="files in ../shared/data/anthropic-evals")
    p.add_argument("--train", type=int, default=200, help="training pairs per concept")
    p.add_argument("--test", type=int, default=60, help="held-out pairs swept per concept")
    p.add_argument("--layer", type=int, default=15, help="decoder layer steered (down_proj bias)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (the demo's)")
    p.add_argument("--lr", type=float, default=2e-2, help="AdamW learning rate (the demo's)")
    p.add_argument("--theta", type=float, default=2.0, help="SPLIT hinge margin (the demo's)")
    p.add_argument("--losses", default="split,sft", help="which training losses to compare")
    p.add_argument("--balance", action="store_true",
                   help="train on exactly as many pairs per positive answer (Yes/No); the held-out pairs stay the same")
    p.add_argument("--limit", type=float, default=1.0, help="utility drop allowed (nats of log-odds)")
    p.add_argument("--bootstrap", type=int, default=200, help="pair-bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training order")
    p.add_argument("--out", default="split-vs-sft", help="folder for split_vs_sft.json and the sweep CSVs")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    names = args.concepts.split(",")
    missing = [n for n in names if not os.path.exists(os.path.join(DATA, f"{n}.jsonl"))]
    if missing:
        print(f"skipped: no {missing} under {DATA}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    model, tok = fastsplit.load_default_model()
    results = [run_concept(model, tok, n, args) for n in names]
    with open(os.path.join(args.out, "split_vs_sft.json"), "w") as f:
        json.dump({"options": vars(args), "results": results}, f, indent=2)
    print(table(results, args.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
