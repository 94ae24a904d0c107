"""Argument types and readers shared by the commands."""
from __future__ import annotations

import argparse
import json


def floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def read_pairs(spec: str):
    import fastsplit

    return fastsplit.demo_pairs() if spec == "demo" else fastsplit.load_pairs(spec)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if line.startswith("{"):
                    row = json.loads(line)
                    if not isinstance(row.get("prompt"), str):
                        raise ValueError(f"{args.prompts}:{n}: a JSON line needs a string field 'prompt'")
                    line = row["prompt"]
                prompts.append(line)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts file")
    return prompts
