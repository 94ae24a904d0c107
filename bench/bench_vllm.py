"""The vLLM engine against the torch engine in the same run (run it in an environment with vLLM; .ci/run makes one).

Rows:
  logodds   a log-odds sweep, 40 pairs x 21 m (fastsplit.logodds_sweep on transformers against
            fastsplit.analysis.logodds_sweep on a VLLMEngine: every (pair, completion, m) one request), and the largest
            difference of their completion NLLs
  generate  a generation sweep, 8 prompts x 11 m, 32 new tokens, greedy (generate_sweep on both engines)
  tokens/s  vLLM steered generation at mixed strengths against an engine with no steering registered, the same
            requests (goal on a GPU: >= 0.9x); the engines' start times are reported, not counted

On this project's 2-core CPU expect vLLM to lose: its CPU build runs eager float32 with its own attention kernels and
a scheduler built for GPUs, while the torch engine's sweep shares the prompts' prefix and runs the layers below the
steered one once per pair.

Run: python bench/bench_vllm.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

import fastsplit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 pairs x 5 m, 2 prompts x 3 m")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from fastsplit.engines import VLLMEngine
    from fastsplit.vllm import Engine

    cuda = torch.cuda.is_available()
    n_pairs, ms = (8, [-4.0, -2.0, 0.0, 2.0, 4.0]) if args.quick else (40, [float(m) for m in np.linspace(-10, 10, 21)])
    n_prompts, gms = (2, [-4.0, 0.0, 4.0]) if args.quick else (8, [float(m) for m in np.linspace(-5, 5, 11)])
    model, tok = fastsplit.load_default_model(device="cuda" if cuda else "cpu")
    pairs = fastsplit.split_pairs(fastsplit.demo_pairs(), test_size=n_pairs, seed=0)[1]
    prompts = [p.prompt for p in fastsplit.demo_pairs()[:n_prompts]]
    s = fastsplit.attach(model, 15, "vector")
    torch.manual_seed(0)
    with torch.no_grad():
        s.module.delta_bias.normal_(0, 0.05)
    res = {"device": torch.cuda.get_device_name() if cuda else f"cpu x{os.cpu_count()}", "pairs": n_pairs,
           "multipliers": len(ms), "prompts": n_prompts, "gen_multipliers": len(gms)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.safetensors")
        s.save(path)
        t0 = time.perf_counter()
        ref = fastsplit.logodds_sweep(model, tok, s, pairs, ms, progress=False)
        res["torch_logodds_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fastsplit.generate_sweep(model, tok, s, prompts, gms, max_new_tokens=32, progress=False)
        res["torch_generate_s"] = time.perf_counter() - t0
        s.detach()
        del model
        gc.collect()
        kw = {} if cuda else {"dtype": "float32", "enforce_eager": True}
        t0 = time.perf_counter()
        eng = Engine(fastsplit.hf.default_model_folder(), {"s": path}, max_model_len=1024, **kw)
        res["vllm_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = fastsplit.logodds_sweep(VLLMEngine(eng, tok, "s"), pairs, ms, progress=False)
        res["vllm_logodds_s"] = time.perf_counter() - t0
        res["max_abs_nll_diff"] = float(max(np.abs(got.nll_pos - ref.nll_pos).max(),
                                            np.abs(got.nll_neg - ref.nll_neg).max()))
        t0 = time.perf_counter()
        texts = fastsplit.generate_sweep(VLLMEngine(eng, tok, "s"), prompts, gms, max_new_tokens=32, progress=False)
        res["vllm_generate_s"] = time.perf_counter() - t0
        new_tokens = sum(len(tok(t)["input_ids"]) for row in texts for t in row)
        res["vllm_steered_tokens_per_s"] = new_tokens / res["vllm_generate_s"]
        eng.close()
        gc.collect()
        plain = Engine(fastsplit.hf.default_model_folder(), None, max_model_len=1024, **kw)
        t0 = time.perf_counter()
        base = fastsplit.generate_sweep(VLLMEngine(plain, tok, None), prompts, gms, max_new_tokens=32, progress=False)
        res["vllm_unsteered_generate_s"] = time.perf_counter() - t0
        res["vllm_unsteered_tokens_per_s"] = sum(len(tok(t)["input_ids"]) for row in base for t in row) / \
            res["vllm_unsteered_generate_s"]
        res["steered_over_unsteered_tokens_per_s"] = res["vllm_steered_tokens_per_s"] / res["vllm_unsteered_tokens_per_s"]
        plain.close()
        gc.collect()
    res["logodds_vllm_over_torch"] = res["vllm_logodds_s"] / res["torch_logodds_s"]
    res["generate_vllm_over_torch"] = res["vllm_generate_s"] / res["torch_generate_s"]
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
