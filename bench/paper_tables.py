"""The paper's tables on this project's machine (arXiv 2602.02343, Table 2: the fits per form; Table 3: preference at
matched utility per objective), and its manifold explanation, on SmolLM2-135M-Instruct.

For each concept (Anthropic's psychopathy and narcissism evals in ../shared/data; skipped when absent): one seed-fixed
split, the training pairs balanced by answer (as many " Yes" as " No"), the same held-out pairs for everything;
then for every form (vector, LoRA, local_weight) and objective (SPLIT, SFT, RePS) one ``fastsplit train`` with the
same seed, layer, epochs and batch size, one ``fastsplit sweep --manifold`` of the held-out pairs, and one
``fastsplit compare`` of the nine per concept. Everything goes through the CLI, so the folders are what a user
gets (DIR/<concept>/<form>-<objective>/{run,sweep}, DIR/<concept>/compare).

Run: python bench/paper_tables.py [--out DIR] [--train 200] [--test 60] [--quick]
Writes DIR/paper_tables.json and DIR/paper_tables.md (the section in bench/RESULTS.md), and prints the tables.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

import fastsplit
from fastsplit.cli import main as cli

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "anthropic-evals")
FORMS = ("vector", "lora", "local_weight")
OBJECTIVES = ("split", "sft", "reps")
# One learning rate per form (the same for every objective): a full ΔW moves far more of the layer per step than a
# vector, so it takes a smaller step; the budget (pairs, epochs, batch, seed) is the same for all nine.
LR = {"vector": 2e-2, "lora": 5e-3, "local_weight": 5e-4}


def _run(args: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli(args)
    if code != 0:
        raise SystemExit(f"fastsplit {' '.join(args)} failed ({code})")
    return buf.getvalue()


def _split(name: str, n_train: int, n_test: int, seed: int, out: str):
    pairs = fastsplit.load_pairs(os.path.join(DATA, f"{name}.jsonl"))
    train, rest = fastsplit.split_pairs(pairs, test_size=len(pairs) - n_train * 2, seed=seed)
    test = rest[:n_test]
    balanced = fastsplit.balance_answers(train, seed=seed)  # as many of each answer, in the drawn order
    answers = sorted({p.positive.strip() for p in balanced})
    per = n_train // len(answers)
    train = [p for a in answers for p in [q for q in balanced if q.positive.strip() == a][:per]]
    if len(train) != per * len(answers):
        raise SystemExit(f"{name}: fewer than {per} training pairs for some answer")
    from fastsplit.cli._common import write_pairs

    paths = (os.path.join(out, "train.jsonl"), os.path.join(out, "test.jsonl"))
    write_pairs(train, paths[0])
    write_pairs(test, paths[1])
    return paths, len(train), len(test)


def run_concept(name: str, args) -> dict:
    root = os.path.join(args.out, name)
    os.makedirs(root, exist_ok=True)
    (train_file, test_file), n_train, n_test = _split(name, args.train, args.test, args.seed, root)
    ms = "--multipliers=" + ",".join(f"{m:g}" for m in args.multipliers)
    runs, sweeps, times = {}, [], {}
    for form in FORMS:
        for obj in OBJECTIVES:
            tag = f"{form}-{obj}"
            run, sw = os.path.join(root, tag, "run"), os.path.join(root, tag, "sweep")
            t0 = time.time()
            if not os.path.exists(os.path.join(run, "steering.safetensors")):
                _run(["train", "--data", train_file, "--test-size", "0", "--layer", str(args.layer), "--form", form,
                      "--loss", obj, "--epochs", str(args.epochs), "--batch-size", "8", "--lr", str(LR[form]),
                      "--seed", str(args.seed), "--out", run, "--quiet"])
            t1 = time.time()
            if not os.path.exists(os.path.join(sw, "fit.json")):
                _run(["sweep", "--steering", os.path.join(run, "steering.safetensors"), "--data", test_file, ms,
                      "--bootstrap", str(args.bootstrap), "--manifold", "--out", sw, "--quiet"])
            t2 = time.time()
            train_json = json.load(open(os.path.join(run, "train.json")))
            times[tag] = {"train_s": t1 - t0, "sweep_s": t2 - t1, "steps": train_json["steps"]}
            print(f"{name} {tag}: train {t1 - t0:.0f} s, sweep {t2 - t1:.0f} s", file=sys.stderr)
            runs[tag] = json.load(open(os.path.join(sw, "fit.json")))
            sweeps.append(sw)
    cmp_dir = os.path.join(root, "compare")
    _run(["compare", *sweeps, "--out", cmp_dir, "--bootstrap", str(args.compare_bootstrap), "--quiet",
          "--labels", ",".join(f"{f} {o}" for f in FORMS for o in OBJECTIVES)])
    return {"concept": name, "train_pairs": n_train, "test_pairs": n_test, "fits": runs, "times": times,
            "compare": json.load(open(os.path.join(cmp_dir, "compare.json")))}


def _ci(c: dict | None, share=False) -> str:
    if not c or c.get("value") is None:
        return "not reached"
    if share:
        return f"{c['value']:.0%} [{c['lo']:.0%}, {c['hi']:.0%}]"
    return f"{c['value']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"


def tables(results: list[dict], drops=(0.5, 1.0, 2.0)) -> str:
    out = ["**Table 2 analogue (fits per form)**: R² of the paper's curves, in-sample and on held-out m "
           "(preference / utility).", "",
           "| concept | form | objective | preference R² (held-out m) | utility R² (held-out m) | m_op [95% CI] |",
           "|---|---|---|---|---|---|"]
    for r in results:
        for tag, fit in r["fits"].items():
            form, obj = tag.rsplit("-", 1)
            s, op, b = fit["scores"], fit["operating_point"], (fit.get("bootstrap") or {}).get("m_op") or [None] * 2
            fmt = lambda v: "n/a" if v is None else "< −1" if v < -1 else f"{v:.3f}"  # a refit that ran away
            band = f" [{b[0]:.2f}, {b[1]:.2f}]" if b[0] is not None else ""
            out.append(f"| {r['concept']} | {form} | {obj} | {fmt(s['preference_r2_fit'])} "
                       f"({fmt(s['preference_r2_heldout_m'])}) | {fmt(s['utility_r2_fit'])} "
                       f"({fmt(s['utility_r2_heldout_m'])}) | {op['multiplier']:.2f}{band} |")
    out += ["", "**Table 3 analogue (preference at matched utility)**: mean preference gain (nats) where the measured "
            "utility drop first reaches 0.5, 1 and 2 nats (m ≥ 0), and the paper's accuracy (share of pairs with "
            "L_neg > L_pos) at m = 0 and at m_op; pair-bootstrap 95% intervals.", "",
            "| concept | form | objective | " + " | ".join(f"gain @ drop {d:g}" for d in drops)
            + " | accuracy m = 0 | accuracy m_op |", "|---|---|---|" + "---|" * (len(drops) + 2)]
    for r in results:
        for row in r["compare"]["interventions"]:
            form, obj = row["label"].split(" ")
            f = row["figures"]
            out.append(f"| {r['concept']} | {form} | {obj} | " + " | ".join(_ci(f[f"gain@{d:g}:positive"])
                                                                           for d in drops)
                       + f" | {_ci(f['accuracy_m0'], True)} | {_ci(f['accuracy_op'], True)} |")
    out += ["", "**Objectives compared at matched utility** (differences of the gain, paired bootstrap; a verdict only "
            "where the interval excludes 0):", "", "| concept | form | pair | drop 0.5 | drop 1 | drop 2 |",
            "|---|---|---|---|---|---|"]
    for r in results:
        for form in FORMS:
            for a, b in (("split", "sft"), ("split", "reps"), ("reps", "sft")):
                pw = r["compare"]["pairwise"]
                key, flip = f"{form} {a} − {form} {b}", 1.0
                if key not in pw:  # compare lists each pair once, in input order: the other way round
                    key, flip = f"{form} {b} − {form} {a}", -1.0
                block = pw.get(key)
                if not block:
                    continue
                cells = []
                for d in drops:
                    c = block["positive"][f"{d:g}"]
                    if c["diff"] is None or c["lo"] is None:
                        cells.append("not reached by both")
                    else:
                        diff, lo, hi = (flip * c["diff"], *sorted((flip * c["lo"], flip * c["hi"])))
                        who = a if lo > 0 else b if hi < 0 else "neither"
                        cells.append(f"{diff:+.2f} [{lo:+.2f}, {hi:+.2f}] ({who})")
                out.append(f"| {r['concept']} | {form} | {a} − {b} | " + " | ".join(cells) + " |")
    out += ["", "**The manifold explanation**: how well each pair's utility drop is predicted by the off-manifold "
            "distance at the last layer, against |m| alone (monotone-fit R², Spearman ρ; 95% pair-bootstrap "
            "intervals of the R² difference).", "",
            "| concept | form | objective | off-manifold R² / ρ | abs(m) R² / ρ | R² difference | verdict |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        for tag, fit in r["fits"].items():
            form, obj = tag.rsplit("-", 1)
            m = (fit.get("manifold") or {}).get("last")
            if not m:
                continue
            o, a, d = m["off_manifold"], m["abs_m"], m["difference"]["r2"] or [float("nan")] * 2
            out.append(f"| {r['concept']} | {form} | {obj} | {o['r2_monotone']:.3f} / {o['spearman']:.3f} | "
                       f"{a['r2_monotone']:.3f} / {a['spearman']:.3f} | [{d[0]:+.3f}, {d[1]:+.3f}] | "
                       + m['verdict'].replace("|", "\\|") + " |")  # |m| inside a cell ends it
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--concepts", default="psychopathy,narcissism", help="files in ../shared/data/anthropic-evals")
    p.add_argument("--train", type=int, default=200, help="training pairs per concept (balanced by answer)")
    p.add_argument("--test", type=int, default=60, help="held-out pairs swept per concept")
    p.add_argument("--layer", type=int, default=15, help="decoder layer steered")
    p.add_argument("--epochs", type=int, default=2, help="training epochs for every run")
    p.add_argument("--multipliers", type=lambda t: [float(v) for v in t.split(",")],
                   default=[float(m) for m in range(-10, 11)], help="strengths swept")
    p.add_argument("--bootstrap", type=int, default=100, help="pair-bootstrap resamples of each sweep's fits")
    p.add_argument("--compare-bootstrap", type=int, default=1000, help="pair-bootstrap resamples of compare")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, balancing, initialisation and order")
    p.add_argument("--out", default="paper-tables", help="folder for the runs, sweeps, comparisons and tables")
    p.add_argument("--quick", action="store_true", help="a smoke run: 24 training and 8 held-out pairs, 1 epoch, "
                   "11 multipliers, one concept")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs, args.bootstrap, args.compare_bootstrap = 24, 8, 1, 10, 50
        args.multipliers, args.concepts = [float(m) for m in range(-10, 11, 2)], args.concepts.split(",")[0]
    names = args.concepts.split(",")
    missing = [n for n in names if not os.path.exists(os.path.join(DATA, f"{n}.jsonl"))]
    if missing:
        print(f"skipped: no {missing} under {DATA}")
        return 0
    t0 = time.time()
    results = [run_concept(n, args) for n in names]
    elapsed = time.time() - t0
    md = tables(results) + f"\n\nTook {elapsed / 60:.1f} min on {os.cpu_count()} cores (options: {vars(args)})."
    with open(os.path.join(args.out, "paper_tables.json"), "w") as f:
        json.dump({"options": vars(args), "elapsed_s": elapsed, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "paper_tables.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
