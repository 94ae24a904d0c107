"""What the completion encoding does to the NLLs: the unsteered model's teacher-forced NLL of each pair's two
completions, scored as before (the completion tokenised alone, its leading space kept after the chat template's
``assistant\\n``) and as now (:func:`fastsplit.encode_pair`: in context, the leading space dropped).

Data: the built-in demo set and Anthropic's persona evals in ../shared/data (skipped when absent).
Run: python bench/encoding_nll.py [--pairs 100]; prints one markdown table (the one in bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

import fastsplit
from fastsplit import hf
from fastsplit.data import chat_prompt_ids, encode_pair

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "anthropic-evals")


def leading_space(tok, pair):
    """The old encoding: the completion tokenised on its own, exactly as stored (" Yes")."""
    prompt = chat_prompt_ids(tok, pair.prompt)
    comp = lambda c: tok(c, add_special_tokens=False)["input_ids"]
    return prompt, comp(pair.positive), comp(pair.negative)


@torch.no_grad()
def nlls(model, tok, encoded, batch=16) -> np.ndarray:
    """Summed NLLs [N, 2] (positive, negative) of the completions after their prompts."""
    rows, spans = [], []
    for prompt, pos, neg in encoded:
        for comp in (pos, neg):
            rows.append(prompt + comp)
            spans.append((len(prompt), len(prompt) + len(comp)))
    out = []
    for s in range(0, len(rows), batch):
        ids, mask = hf.pad_rows(rows[s:s + batch], hf.pad_id_of(tok))
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, (a, b) in enumerate(spans[s:s + batch]):
            tgt = ids[i, a:b]
            out.append(-logp[i, a - 1:b - 1].gather(-1, tgt[:, None]).sum().item())
    return np.asarray(out).reshape(-1, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100, help="pairs per data set (the first N)")
    args = p.parse_args(argv)
    sets = {"demo (optimism)": fastsplit.demo_pairs()}
    for name in ("psychopathy", "narcissism"):
        path = os.path.join(DATA, f"{name}.jsonl")
        if os.path.exists(path):
            sets[name] = fastsplit.load_pairs(path)
    model, tok = fastsplit.load_default_model()
    print("| data | pairs | encoding | first positive token | mean NLL pos | mean NLL neg | mean pref L_n − L_p |"
          " mean utility log-odds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, pairs in sets.items():
        pairs = pairs[:args.pairs]
        for label, enc in (("leading space (before)", [leading_space(tok, q) for q in pairs]),
                           ("as written (now)", [encode_pair(tok, q) for q in pairs])):
            v = nlls(model, tok, enc)
            util, _ = fastsplit.analysis.util_odds(v[:, 0], v[:, 1])
            first = repr(tok.decode(enc[0][1][:1]))
            print(f"| {name} | {len(pairs)} | {label} | {first} | {v[:, 0].mean():.2f} | {v[:, 1].mean():.2f} | "
                  f"{(v[:, 1] - v[:, 0]).mean():+.2f} | {util.mean():+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
