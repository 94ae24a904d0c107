"""``fastsplit train``: SPLIT (or SFT) training of a steering intervention, and the options it shares with
``fastsplit demo``."""
from __future__ import annotations

import argparse
import os

from ._common import (add_device_option, begin_work, checked_layer, device_of, floats, is_main, model_config,
                      nonneg_float, nonneg_int, pair_types, positive_float, positive_int, read_pairs, save_json,
                      test_size, writable_dir, write_pairs)


def add_training_options(p: argparse.ArgumentParser, *, test_default) -> None:
    """The model, data and training options shared by ``train`` and ``demo`` (one set of defaults: the
    demo's. The library's ``fastsplit.train()`` keeps the paper's θ = 0.4 and "add" pairs.)"""
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF model folder")
    p.add_argument("--data", default="demo",
                   help="pairs file (.jsonl persona/AxBench, .csv, .parquet with fastsplit[parquet]) or 'demo'")
    p.add_argument("--layer", type=int, default=15,
                   help="decoder layer to steer; negative counts from the last (-1 is the last), saved resolved")
    p.add_argument("--form", choices=["vector", "lora", "local_weight"], default="vector", help="intervention form")
    p.add_argument("--rank", type=positive_int, default=4, help="LoRA rank (form lora)")
    p.add_argument("--site", choices=["down_proj", "residual"], default="down_proj",
                   help="where the update enters: the MLP's down_proj (the paper's) or the layer's output")
    p.add_argument("--no-delta-bias", action="store_true",
                   help="LoRA and local_weight: train no Δb, so the peft export is a plain adapter that vLLM serves")
    p.add_argument("--max-pairs", type=nonneg_int, default=0, help="use only the first N pairs of --data (0: all)")
    p.add_argument("--test-size", type=test_size, default=test_default,
                   help="held-out pairs: a fraction in [0, 1) or a count; 0 trains on every pair")
    p.add_argument("--balance-answers", action="store_true",
                   help="train on as many pairs per positive answer as the rarest has (Yes/No data; see balance_answers)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the balancing, the initialisation (LoRA's A) and the training order")
    p.add_argument("--epochs", type=positive_int, default=2, help="passes over the training pairs")
    p.add_argument("--batch-size", type=positive_int, default=8, help="pairs per step")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="steps per optimizer update")
    p.add_argument("--lr", type=positive_float, default=2e-2, help="AdamW learning rate (linear decay to 0)")
    p.add_argument("--factors", type=floats, default=[1.0], help="steering factors m to draw from, e.g. 0.5,1,2")
    p.add_argument("--pair-types", type=pair_types, default=None,
                   help="'add' trains the positive at +m; 'sub' swaps the completions at -m (default: add,sub; "
                        "add with --loss reps, which is bidirectional by itself)")
    p.add_argument("--loss", choices=["split", "sft", "reps"], default="split",
                   help="SPLIT, SFT on the positives, or RePS (Wu et al. 2025: reference-free bidirectional preference "
                        "steering)")
    p.add_argument("--lambda-p", type=nonneg_float, default=1.0, help="SPLIT weight of L_pos")
    p.add_argument("--lambda-n", type=nonneg_float, default=0.5, help="SPLIT weight of L_neg")
    p.add_argument("--gamma", type=nonneg_float, default=5.0, help="SPLIT weight of the hinge")
    p.add_argument("--theta", type=float, default=2.0,
                   help="SPLIT hinge margin θ on L_neg - L_pos (the demo's setting; the paper's 0.4 is weaker)")
    p.add_argument("--reduction", choices=["batch", "pair"], default="batch",
                   help="hinge on batch means, or per pair")
    add_device_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars and no loading messages")


def prepare(args):
    """Every check that needs no weights: data, layer, split. Returns (config, layer, train pairs, test pairs)."""
    import fastsplit

    if args.loss == "reps" and args.pair_types not in (None, ["add"]):
        raise ValueError("--loss reps is bidirectional by itself (its second term nulls the intervention): "
                         "--pair-types must be add")
    if args.no_delta_bias and args.form == "vector":
        raise ValueError("--no-delta-bias leaves the vector form nothing to train (its update is Δb alone)")
    pairs = read_pairs(args.data)[: args.max_pairs or None]
    config = model_config(args)
    layer = checked_layer(args.layer, config)
    if args.test_size in (0, 0.0):
        train_pairs, test_pairs = list(pairs), []
    else:
        train_pairs, test_pairs = fastsplit.split_pairs(pairs, test_size=args.test_size, seed=args.seed)
    if args.balance_answers:  # the training pairs only: the held-out pairs stay as drawn
        train_pairs = fastsplit.balance_answers(train_pairs, seed=args.seed)
    return config, layer, train_pairs, test_pairs


def attach_steering(model, layer: int, args):
    """The intervention the options ask for, its random initialisation (LoRA's A) drawn from ``--seed``: the
    same seed gives the same run."""
    import torch

    import fastsplit

    torch.manual_seed(args.seed)
    return fastsplit.attach(model, layer, args.form, rank=args.rank, site=args.site,
                            delta_bias=not args.no_delta_bias)


def train_options(args) -> dict:
    return dict(loss=args.loss, lambda_p=args.lambda_p, lambda_n=args.lambda_n, gamma=args.gamma, theta=args.theta,
                reduction=args.reduction, steering_factors=args.factors, lr=args.lr, epochs=args.epochs,
                batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed, pair_types=pair_types_of(args),
                progress=not args.quiet)


def pair_types_of(args) -> list[str]:
    """--pair-types as given, else the loss's default (add,sub; add for RePS)."""
    if args.pair_types is not None:
        return args.pair_types
    return ["add"] if args.loss == "reps" else ["add", "sub"]


def read_texts(path: str, flag: str) -> list[str]:
    """A text file, one text a line (blank lines skipped): at least one text, or one line naming ``flag``."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no file at {path}")
    with open(path, encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise ValueError(f"{flag}: {path} holds no text (one text a line)")
    return texts


def check_method(args) -> tuple[list[str] | None, list[str] | None]:
    """--method diffmean's options, before anything loads: the vector form, both text files or neither."""
    given = (args.positive_texts, args.negative_texts)
    if args.method != "diffmean":
        if any(given) or args.normalize:
            raise ValueError("--positive-texts, --negative-texts and --normalize go with --method diffmean")
        return None, None
    if args.form != "vector":
        raise ValueError(f"--method diffmean makes a vector (--form vector), not {args.form}")
    if args.resume:
        raise ValueError("--method diffmean has nothing to resume: it takes seconds")
    if any(given) and not all(given):
        raise ValueError("--positive-texts and --negative-texts go together (or neither: the pairs of --data)")
    if not any(given):
        return None, None
    return read_texts(args.positive_texts, "--positive-texts"), read_texts(args.negative_texts, "--negative-texts")


def run(args) -> int:
    import time

    import fastsplit
    from fastsplit.dist import atomic_write
    from fastsplit.hf import load_model

    positive, negative = check_method(args)
    _, layer, train_pairs, test_pairs = prepare(args)
    writable_dir(args.out)
    begin_work()
    model, tok = load_model(args.model, device=device_of(args))
    os.makedirs(args.out, exist_ok=True)
    if args.method == "diffmean":
        t0 = time.perf_counter()
        steering = fastsplit.diffmean(model, tok, None if positive else train_pairs, layer=layer, site=args.site,
                                      positive_texts=positive, negative_texts=negative, normalize=args.normalize)
        result = {"method": "diffmean", "norm": float(steering.notes["diffmean_norm"]),
                  "source": steering.notes["diffmean_source"], "seconds": time.perf_counter() - t0}
    else:
        steering = attach_steering(model, layer, args)
        result = fastsplit.train(model, tok, steering, train_pairs,
                                 checkpoint_dir=os.path.join(args.out, "checkpoints"), resume=args.resume,
                                 **train_options(args))
    if not is_main():  # rank 0 writes (under torchrun every rank holds the same parameters)
        return 0
    path = os.path.join(args.out, "steering.safetensors")
    atomic_write(path, steering.save)
    test_path = os.path.join(args.out, "test_pairs.jsonl")
    if test_pairs:
        atomic_write(test_path, lambda p: write_pairs(test_pairs, p))
    summary = {"steering": path, "layer": steering.layer, "train_pairs": len(train_pairs),
               "test_pairs": len(test_pairs), "test_pairs_file": test_path if test_pairs else None, **result,
               "options": {k: v for k, v in vars(args).items() if k != "func"}}
    save_json(os.path.join(args.out, "train.json"), summary)
    if args.method == "diffmean":
        print(f"difference of means at layer {steering.layer} ({args.site}, from {result['source']}): norm "
              f"{result['norm']:.4g}{' (saved normalised)' if args.normalize else ''}, {result['seconds']:.1f} s; "
              f"wrote {path}" + (f"; held-out pairs in {test_path}" if test_pairs else ""))
        return 0
    last = result["history"][-1]
    held = f"; held-out pairs in {test_path}" if test_pairs else ""
    print(f"trained {args.form} at layer {steering.layer}: loss {last['loss']:.4f}, preference log-odds "
          f"{last['pref_log_odds']:+.4f}; wrote {path}{held}")
    return 0



def add_command(sub, formatter) -> None:
    t = sub.add_parser("train", help="train a steering intervention with SPLIT; writes steering.safetensors, "
                       "train.json and the held-out pairs", formatter_class=formatter)
    add_training_options(t, test_default=0.2)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    t.add_argument("--method", choices=["gradient", "diffmean"], default="gradient",
                   help="gradient: train with --loss; diffmean: the difference of means of the hidden states of the "
                        "positive and negative texts at --layer/--site (a vector, no optimisation, seconds)")
    t.add_argument("--positive-texts", help="diffmean: a text file of concept texts, one a line (with "
                   "--negative-texts; default: the pairs of --data, prompt + completion)")
    t.add_argument("--negative-texts", help="diffmean: a text file of contrast texts, one a line (the paper: the "
                   "model's own unconditioned samples)")
    t.add_argument("--normalize", action="store_true", help="diffmean: save a unit vector (its norm is in the "
                   "metadata either way)")
    t.set_defaults(func=run)
