"""Command line: ``fastsplit demo`` and ``fastsplit info``. Thin: parse, call the library, print."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    import fastsplit

    print(json.dumps(fastsplit.build_info(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    import torch

    import fastsplit

    torch.manual_seed(args.seed)
    layer = fastsplit.SteeredLinear.from_linear(torch.nn.Linear(64, 32), form="lora", rank=4)
    torch.nn.init.normal_(layer.lora_b, std=0.1)
    torch.nn.init.normal_(layer.delta_bias, std=0.1)
    x = torch.randn(5, 7, 64)
    ms = torch.linspace(-2, 2, 5)
    layer.multiplier = ms  # five strengths, one batch
    y = layer(x)
    print("fastsplit demo: one batch carries 5 steering strengths m =", [round(v, 2) for v in ms.tolist()])
    for i, m in enumerate(ms.tolist()):
        layer.multiplier = m
        alone = layer(x[i:i + 1])[0]
        print(f"  m={m:+.1f}: |y - base| = {(y[i] - torch.nn.functional.linear(x[i], layer.weight, layer.bias)).norm():.4f}"
              f", matches a run at that m alone: {torch.allclose(y[i], alone, atol=1e-5)}")
    print(json.dumps(fastsplit.build_info()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsplit", description="Fused kernels for steering language models.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="a short example of per-row steering strengths")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_demo)
    i = sub.add_parser("info", help="print what this install can run (build_info) as JSON")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as exc:
        print(f"fastsplit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
