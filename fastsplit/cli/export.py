"""``fastsplit export``: a trained steering file at a chosen strength as a llama.cpp control vector, a peft LoRA
adapter, or merged weights (``fastsplit.hf.export``)."""
from __future__ import annotations

import math
import os

from ._common import begin_work, checked_steering, model_config, writable_dir, writable_file


def strength(text: str):
    """``--m``: a number, or ``op`` for the operating point of the ``--fit`` file."""
    if text == "op":
        return text
    try:
        v = float(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a number or 'op', got {text!r}") from None
    if not math.isfinite(v):
        import argparse

        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def recorded_model(steering: str) -> str:
    """The model a steering file was trained on, as ``--model`` takes it: "default" for the default model, else the
    folder its metadata names, which must exist here (or one line says to give ``--model``)."""
    from fastsplit.hf import DEFAULT_MODEL_NAME, read_steering_metadata

    name = read_steering_metadata(steering)["model"]
    if name == DEFAULT_MODEL_NAME:
        return "default"
    if os.path.isdir(name):
        return name
    raise ValueError(f"{steering} was trained on the model {name!r}, which is not a folder here: give its folder "
                     "with --model")


def run(args) -> int:
    from fastsplit.hf.export import check_export, export_steering, operating_point_of, read_steering_tensors

    if args.model is None:
        args.model = recorded_model(args.steering)
    config = model_config(args)
    meta = checked_steering(args.steering, config, args.any_model)
    read_steering_tensors(args.steering)  # a corrupt tensor section is found now, not after a model loads
    if args.m == "op":
        if not args.fit:
            raise ValueError("--m op takes the operating point from a fit.json: give it with --fit")
        m, warnings = operating_point_of(args.fit, args.steering)
        for w in warnings:  # what the sweep said about this operating point holds for the export too
            print(f"warning (from {args.fit}): {w}")
    else:
        if args.fit:
            raise ValueError("--fit is read only with --m op")
        m = args.m
    check_export(meta, config, args.format, m=m, full=args.full)
    if args.full and args.format != "merged":
        raise ValueError("--full is for --format merged")
    folder = args.format == "peft" or args.full
    (writable_dir if folder else writable_file)(args.out)
    begin_work()
    paths = export_steering(args.steering, args.out, m=m, format=args.format, model=args.model, full=args.full,
                            check_model_name=not args.any_model)
    use = {"control-vector": f"llama.cpp's CLI: llama-cli -m MODEL.gguf --control-vector {args.out}; from Python: "
                             f"fastsplit.hf.export.apply_control_vector(llama_cpp.Llama(...), {args.out!r})",
           "peft": f"PeftModel.from_pretrained(base_model, {args.out!r}) or "
                   f"AutoPeftModelForCausalLM.from_pretrained({args.out!r})",
           "merged": (f"AutoModelForCausalLM.from_pretrained({args.out!r})" if args.full else
                      f"the weight and bias of model.layers.{meta['layer']}.mlp.down_proj (a layer without a bias "
                      "needs an nn.Linear with one; --full writes a whole model folder instead)")}[args.format]
    shown = ", ".join(os.path.relpath(p) for p in paths)
    print(f"exported {meta['form']} at layer {meta['layer']}, m = {m:g}, as {args.format}: {shown}\nuse: {use}")
    return 0


def add_command(sub, formatter) -> None:
    e = sub.add_parser("export", help="write a steering file at strength m as a llama.cpp control vector, a peft "
                       "adapter, or merged weights", formatter_class=formatter)
    e.add_argument("--steering", required=True, help="a steering.safetensors written by 'fastsplit train' or 'demo'")
    e.add_argument("--m", required=True, type=strength,
                   help="the strength: a number, or 'op' for the operating point of --fit")
    e.add_argument("--fit", help="a fit.json from 'fastsplit sweep' or 'demo' (with --m op)")
    e.add_argument("--format", required=True, choices=["control-vector", "peft", "merged"],
                   help="control-vector: a GGUF for llama.cpp/ollama (vector form); peft: a LoRA adapter folder; "
                        "merged: the changed down_proj tensors (a .safetensors file), or with --full a model folder")
    e.add_argument("--full", action="store_true", help="merged: a complete save_pretrained folder")
    e.add_argument("--out", required=True, help="output: a .gguf file, an adapter folder, a .safetensors file or "
                   "a model folder (with --full)")
    e.add_argument("--model", default=None,
                   help="'default' (SmolLM2-135M-Instruct) or a local HF model folder (default: the model the steering "
                        "file was trained on, as its metadata records it)")
    e.add_argument("--any-model", action="store_true", help="skip the check that the steering was trained on this model")
    e.add_argument("--quiet", action="store_true", help="no loading messages")
    e.set_defaults(func=run)
