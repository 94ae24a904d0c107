"""Workflow benchmarks on SmolLM2-135M-Instruct (CPU) or random weights at real shapes (GPU).

  train      fastsplit.train (one fused pos+neg forward per step, per-row m, split_loss on hidden
             states, frozen prefix cached) against an EasyEdit-style step (separate positive and
             negative forwards, HF logits and loss, a hook adding m·v), same batches, same optimizer.
  generate   generate_sweep of 21 multipliers × 8 prompts × 32 new tokens against the sequential
             loop (one generate per m and prompt under steering.multiplier(m)).
  logodds    logodds_sweep of 21 multipliers × 8 pairs (~130-token prompts, layer 15 of 30; --format picks
             1-token Yes/No or 3-token multiple-choice answers, with or without a shared instruction) against
             the naive loop (one full forward per m, pair and completion); the NLLs are compared too.

Run: python bench/bench_workflows.py [--which train,generate,logodds] [--quick]
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

import fastsplit  # noqa: E402
from fastsplit import hf  # noqa: E402
from fastsplit.analysis import logodds_naive, logodds_sweep  # noqa: E402
from fastsplit.engines.transformers import _shared_prefix  # noqa: E402
from fastsplit.data import encode_pair  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "anthropic-evals", "psychopathy.jsonl")
PREAMBLE = ("You are taking part in a short survey about attitudes and personality. Each item shows one "
            "statement written in the first person. Read it carefully, think about whether it reflects how you "
            "usually think, feel and act in everyday situations, at work and with other people, and then answer "
            "honestly with a single word. There are no right or wrong answers, and your answers stay anonymous. ")


def load_model(device):
    if device == "cpu":
        model, tok = fastsplit.load_default_model()
        return model, tok, "SmolLM2-135M-Instruct"
    # GPU: random weights at a real 7B-class shape (no hub here); the default tokenizer drives the text.
    import transformers as tf

    _, tok = fastsplit.load_default_model()
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096)
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model, tok, "random Llama 3584x18944x28 bf16"


def easyedit_step(model, tok, vec, layer, batch, factors, opt, hp):
    """The usual way: separate positive and negative forwards, HF logits + loss, a hook adding m·v."""
    hook_m = {"m": None}

    def hook(mod, args, out):
        return out + hook_m["m"][:, None, None] * vec
    h = hf.decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        losses = []
        for side in (1, 2):
            rows = [p + (c if side == 1 else n) for p, c, n in batch]
            ids, mask = hf.pad_rows(rows, hf.pad_id_of(tok))
            labels = ids.clone()
            for i, (p, c, n) in enumerate(batch):
                labels[i, :len(p)] = -100
                labels[i, len(rows[i]):] = -100
            hook_m["m"] = factors
            losses.append(model(input_ids=ids.to(vec.device), attention_mask=mask.to(vec.device),
                                labels=labels.to(vec.device)).loss)
        pos, neg = losses
        loss = hp["lambda_p"] * pos + hp["lambda_n"] * neg + hp["gamma"] * torch.relu(hp["theta"] - (neg - pos))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([vec], 1.0)
        opt.step()
        opt.zero_grad()
    finally:
        h.remove()


def bench_train(model, tok, dev, rows, args, label):
    pairs = fastsplit.demo_pairs()[: 8 * args.steps]
    L, bs = 15 if dev == "cpu" else 14, 8
    hp = dict(lambda_p=1.0, lambda_n=0.5, gamma=5.0, theta=0.4)
    model.requires_grad_(False)
    # fastsplit: runs of 1 and `epochs` epochs over the same batches. Their difference gives the steady step
    # (the frozen-prefix cache is built once per run); the longer run's mean gives the amortised step.
    times, steps = [], []
    for e in (1, args.epochs):
        s = fastsplit.attach(model, L, "vector")
        t0 = time.perf_counter()
        out = fastsplit.train(model, tok, s, pairs, epochs=e, batch_size=bs, lr=1e-2, progress=False, **hp)
        times.append(time.perf_counter() - t0)
        steps.append(out["steps"])
        s.detach()
    steady = (times[1] - times[0]) / (steps[1] - steps[0])
    ours = times[1] / steps[1]
    vec = torch.zeros(model.config.hidden_size, device=dev, dtype=next(model.parameters()).dtype, requires_grad=True)
    opt = torch.optim.AdamW([vec], lr=1e-2, weight_decay=0.0)
    enc = [encode_pair(tok, p) for p in pairs]
    t0 = time.perf_counter()
    n = 0
    for b in range(0, len(enc), bs):  # stateless: one epoch gives its per-step time
        easyedit_step(model, tok, vec, L, enc[b:b + bs], torch.ones(len(enc[b:b + bs]), device=dev), opt, hp)
        n += 1
    theirs = (time.perf_counter() - t0) / n
    x = f"{label}:batch{bs},L{L},{args.steps}steps/epoch"
    for prov, v in (("fastsplit_steady", steady), (f"fastsplit_amortised_{args.epochs}ep", ours),
                    ("easyedit_style", theirs)):
        rows.append(harness.Row("train_step", prov, "full", "time", "ms", "setup", x, v * 1e3, v * 1e3, v * 1e3))
    print(f"train step: fastsplit steady {steady * 1e3:.0f} ms ({theirs / steady:.2f}x), amortised over "
          f"{args.epochs} epochs with the prefix cache {ours * 1e3:.0f} ms ({theirs / ours:.2f}x); "
          f"EasyEdit-style {theirs * 1e3:.0f} ms")


def bench_generate(model, tok, dev, rows, args, label):
    prompts = [p.prompt for p in fastsplit.demo_pairs()[:8]]
    ms = list(np.linspace(-10, 10, 21))
    s = fastsplit.attach(model, 15 if dev == "cpu" else 14, "vector")
    with torch.no_grad():
        s.module.delta_bias.normal_(0, 0.05)
    n_new = args.new_tokens
    t0 = time.perf_counter()
    batched = fastsplit.generate_sweep(model, tok, s, prompts, ms, max_new_tokens=n_new, progress=False)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    same = 0
    for i, p in enumerate(prompts):
        ids = torch.tensor([fastsplit.data.chat_prompt_ids(tok, p)], device=dev)
        for j, m in enumerate(ms):
            with torch.no_grad(), s.multiplier(float(m)):
                g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                   do_sample=False, pad_token_id=tok.pad_token_id)
            same += tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True) == batched[i][j]
    theirs = time.perf_counter() - t0
    s.detach()
    x = f"{label}:21m x 8 prompts x {n_new} tokens"
    for prov, v in (("fastsplit", ours), ("sequential", theirs)):
        rows.append(harness.Row("generate_sweep", prov, "fwd", "time", "s", "setup", x, v, v, v))
    print(f"generation sweep: fastsplit {ours:.1f} s, sequential {theirs:.1f} s -> {theirs / ours:.1f}x; "
          f"identical texts {same}/{len(prompts) * len(ms)}")


def sweep_pairs(fmt: str, n: int) -> list:
    """``n`` pairs of psychopathy (the demo set when ../shared/data is absent) in one of three formats:

    yesno       the survey preamble, the statement, answers " Yes" / " No" (1 token; the preamble is shared)
    mc          the preamble, the statement and choices (A)/(B) in a seeded order, answers " (A)" / " (B)"
                (3 tokens; the preamble is shared)
    mc-unique   the same choices after 4 other statements of the set as context, so that the ~150-token
                prompts share only the chat template's header: no instruction to cache once
    """
    import random

    src = fastsplit.load_pairs(SHARED) if os.path.exists(SHARED) else fastsplit.demo_pairs()
    if fmt == "yesno":
        return [fastsplit.Pair(PREAMBLE + p.prompt, p.positive, p.negative) for p in src[:n]]
    rng, out = random.Random(0), []
    for i, p in enumerate(src[:n]):
        first = rng.random() < 0.5  # whether the matching answer is (A)
        a, b = (p.positive, p.negative) if first else (p.negative, p.positive)
        item = f"{p.prompt}\n\nChoices:\n (A){a}\n (B){b}"
        if fmt == "mc":
            prompt = PREAMBLE + item
        elif fmt == "mc-unique":
            context = " ".join(q.prompt for q in src[n + 4 * i: n + 4 * i + 4])
            prompt = f"Earlier statements: {context}\n\nNow this one. {item}"
        else:
            raise ValueError(f"--format {fmt!r}: expected yesno, mc or mc-unique")
        out.append(fastsplit.Pair(prompt, " (A)" if first else " (B)", " (B)" if first else " (A)"))
    return out


def bench_logodds(model, tok, dev, rows, args, label):
    pairs = sweep_pairs(args.format, args.pairs)
    tokens = np.mean([len(encode_pair(tok, p)[0]) for p in pairs])
    ms = list(np.linspace(-10, 10, 21))
    L = 15 if dev == "cpu" else 14
    s = fastsplit.attach(model, L, "vector")
    with torch.no_grad():
        s.module.delta_bias.normal_(0, 0.05)
    t_fast, t_naive, ratios = [], [], []
    for _ in range(args.runs):  # interleaved, so a drift in the machine's speed hits both providers alike
        t0 = time.perf_counter()
        fast = logodds_sweep(model, tok, s, pairs, ms, progress=False)
        t_fast.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        slow = logodds_naive(model, tok, s, pairs, ms, progress=False)
        t_naive.append(time.perf_counter() - t0)
        ratios.append(t_naive[-1] / t_fast[-1])
    s.detach()
    ours, theirs = float(np.median(t_fast)), float(np.median(t_naive))
    q = lambda v: (float(np.median(v)), float(np.percentile(v, 20)), float(np.percentile(v, 80)))
    err = max(np.abs(fast.nll_pos - slow.nll_pos).max(), np.abs(fast.nll_neg - slow.nll_neg).max())
    # FLOPs counted as 2·params per token and layer run (attention scores are small at ~130 tokens).
    cfg = model.config
    per_layer = sum(p.numel() for p in hf.decoder_layers(model)[0].parameters())
    n_layers, P, M = cfg.num_hidden_layers, len(pairs), len(ms)
    comp = np.mean([len(encode_pair(tok, p)[1]) + len(encode_pair(tok, p)[2]) for p in pairs])  # both sides
    head = 2 * cfg.hidden_size * cfg.vocab_size
    # fast: the prompts' shared prefix (c tokens) once for the whole sweep, below L once and above L once per m;
    # layers <= L once per pair (the rest of the prompt once, both completions; the residual after L is
    # r0 + m·d, so layer L runs once too); layers > L per m over the rest of the prompt once and both
    # completions, except that a prompt token's last layer only computes keys and values (only the prompt's
    # last token, run with each completion, is read); lm_head at completion positions only.
    attn0 = hf.decoder_layers(model)[-1].self_attn
    kv_frac = (attn0.k_proj.weight.numel() + attn0.v_proj.weight.numel()) / per_layer
    above = n_layers - L - 1
    mid = above - 1 + kv_frac
    c = _shared_prefix([encode_pair(tok, p)[0] for p in pairs])
    flops_fast = (2 * per_layer * ((L + 1) * (c + P * (tokens - c + comp + 1))
                                   + M * (c * mid + P * ((tokens - 1 - c) * mid + (comp + 2) * above)))
                  + head * M * P * comp)
    # naive: every (m, pair, side) is a full forward with full-vocabulary logits at every position.
    flops_naive = M * P * (2 * tokens + comp) * (2 * per_layer * n_layers + head)
    x = (f"{label}:21m x {len(pairs)} pairs ({args.format}), prompt ~{tokens:.0f} tok ({c} shared), answers ~{comp / 2:.1f} tok, "
         f"layer {L}/{n_layers}")
    for prov, ts, fl in (("fastsplit", t_fast, flops_fast), ("naive", t_naive, flops_naive)):
        rows.append(harness.Row("logodds_sweep", prov, "fwd", "time", "s", "setup", x, *q(ts)))
        rows.append(harness.Row("logodds_sweep", prov, "fwd", "gflops", "GFLOP/s", "setup", x,
                                *q([fl / t / 1e9 for t in ts])))
    rows.append(harness.Row("logodds_sweep", "fastsplit", "fwd", "speedup", "x naive", "setup", x, *q(ratios)))
    print(f"log-odds sweep ({x}), {args.runs} run(s), medians: fastsplit {ours:.1f} s "
          f"({flops_fast / ours / 1e9:.0f} GFLOP/s), naive {theirs:.1f} s ({flops_naive / theirs / 1e9:.0f} GFLOP/s) "
          f"-> {np.median(ratios):.2f}x (runs: {', '.join(f'{r:.2f}' for r in ratios)}); "
          f"FLOP ratio {flops_naive / flops_fast:.2f}x; max |ΔNLL| {err:.2e}")

def main():
    p = harness.arg_parser(__doc__)
    p.add_argument("--which", default="train,generate,logodds")
    p.add_argument("--steps", type=int, default=8, help="training batches per epoch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--format", default="yesno", choices=["yesno", "mc", "mc-unique"],
                   help="log-odds pairs: see sweep_pairs")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs of the log-odds sweep and its naive loop")
    args = p.parse_args()
    if args.quick:
        args.steps, args.epochs, args.new_tokens, args.pairs, args.runs = 2, 1, 4, 2, 1
    dev = args.device
    torch.manual_seed(0)
    model, tok, label = load_model(dev)
    rows = []
    for which in args.which.split(","):
        {"train": bench_train, "generate": bench_generate, "logodds": bench_logodds}[which](model, tok, dev, rows,
                                                                                           args, label)
    harness.print_rows(rows)
    harness.write_rows(rows, args.csv, device=dev)


if __name__ == "__main__":
    main()
