"""``fastsplit tune``: measure ``backend="auto"``'s candidates at a model's steerable shapes, once, and cache the routes.

The tuner itself (``fastsplit.ops._tune``) works on its own at the first call of each shape; this module runs it
ahead of time for the shapes a model will meet (its ``down_proj``: K = intermediate size, N = hidden size, at
several row counts, every form and m kind; the SPLIT loss at its vocabulary) and reports each candidate's time beside
the two baselines a user compares with: eager steering code and the bare ``F.linear``.

Example::

    >>> rows = tune_shapes(k=1536, n=576, vocab=49152, hidden=576, dtype=torch.float32, rows=[1, 16, 512])
    >>> print(format_table(rows))
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from . import _env
from .ops import _tune
from .ops.split_loss import launch_rows, split_loss, tuned_rows
from .ops.split_loss import tune_key as loss_key
from .ops.steered_linear import steered_linear
from .ops.steered_linear import tune_key_text as sl_text
from .ops.steered_linear import tune_key as sl_key

__all__ = ["eager_steering", "tune_shapes", "format_table", "FORMS", "MKINDS", "cache_info", "cache_path",
           "device_identity", "software"]

# The tuner's cache and the identities its entries are keyed by, public here (the CLI reads them through this
# module, never ops' internals).
cache_info, cache_path, device_identity, software = _tune.cache_info, _tune.cache_path, _tune.device_identity, \
    _tune.software

FORMS = ("vector", "lora", "local_weight")
MKINDS = ("scalar", "per_row")


def eager_steering(x, W, b, *, delta_weight=None, lora_a=None, lora_b=None, delta_bias=None, m1):
    """How steering is usually written without fastsplit: the steered weight materialised (one copy per strength
    for per-row m), LoRA as separate matmuls, the vector as an added bias. The baseline of ``tune`` and the
    benchmarks."""
    per_row = isinstance(m1, torch.Tensor)
    m = m1.to(x.dtype)[:, None, None] if per_row else m1
    if delta_weight is not None:
        if per_row:  # one W + m·ΔW per sequence
            w_eff = W[None] + m * delta_weight[None]
            y = torch.bmm(x, w_eff.transpose(1, 2)) + b
        else:
            y = F.linear(x, W + m1 * delta_weight, b)
    else:
        y = F.linear(x, W, b)
        if lora_a is not None:
            y = y + m * F.linear(F.linear(x, lora_a), lora_b)
    if delta_bias is not None:
        y = y + m * delta_bias
    return y


@contextlib.contextmanager
def _tuning_on():
    """Tuning on for the block (the CPU included), unless the user turned it off with FASTSPLIT_TUNE=0."""
    if _env._tune_from_environment() is False:
        raise RuntimeError("tuning is off (FASTSPLIT_TUNE=0): unset it to tune")
    old = _env._tune
    _env.set_tuning(True)
    try:
        yield
    finally:
        _env._tune = old


def _inputs(form, mkind, rows, k, n, dtype, device, rank, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)
    # Decode: one token per sequence, [rows, 1, K]; prefill: 8 sequences of rows/8 tokens (per-row m is one per
    # sequence, and eager code's per-sequence weight copies stay 8).
    seqs = rows if rows <= 64 else 8
    x, W, b = g(seqs, -(-rows // seqs), k), g(n, k, scale=k ** -0.5), g(n)
    d = {"delta_bias": g(n)}
    if form == "lora":
        d["lora_a"], d["lora_b"] = g(rank, k, scale=k ** -0.5), g(n, rank)
    elif form == "local_weight":
        d["delta_weight"] = g(n, k, scale=k ** -0.5)
    m = 2.5 if mkind == "scalar" else (torch.randn(seqs, generator=gen) * 2).to(device=device, dtype=torch.float32)
    return x, W, b, d, m


def _record(key: tuple, device) -> dict:
    """The key and what the cache holds for it (times, refusals, cost); a key with one candidate has no entry."""
    entry = _tune.TUNER.entry(key, device)
    if entry is None:
        return {"key": _tune.TUNER.text(key), "choice": _tune.TUNER.names.get(key, "?"), "times_ms": {},
                "refused": {}, "tune_ms": 0.0}
    return {"key": _tune.TUNER.text(key), **entry.to_dict()}


def tune_shapes(*, k: int, n: int, vocab: int | None, hidden: int | None, dtype: torch.dtype,
                rows: Sequence[int] = (1, 16, 512, 4096), forms: Sequence[str] = FORMS, mkinds: Sequence[str] = MKINDS,
                loss_rows: int = 4096, rank: int = 16, device: str | torch.device = "cpu", force: bool = False,
                progress: bool = True, on_result=None) -> list[dict]:
    """Tune steered_linear at [rows, k] -> n for each form × m kind × row count, and the SPLIT loss at
    ``loss_rows`` token rows a side over ``vocab`` × ``hidden`` (skipped when ``vocab`` is None). ``force``
    measures keys that the cache already holds again. Returns one dict per case: the key, every candidate's time
    (ms) or refusal, the choice, the cost of tuning, and the baselines' times (``eager_ms`` and ``linear_ms`` for
    steered_linear, ``gemms_ms`` for the loss: its own two GEMMs)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    cases = [(f, mk, r) for f in forms for mk in mkinds for r in rows]
    out = []
    with _tuning_on():
        for form, mkind, r in tqdm(cases, desc="tuning steered_linear", disable=not progress, leave=False):
            x, W, b, d, m = _inputs(form, mkind, r, k, n, dtype, device, rank, seed=len(out))
            with torch.no_grad():
                key = sl_key(x, W, b, d.get("delta_weight"), d.get("lora_a"), d.get("lora_b"), d["delta_bias"], m)
                _tune.TUNER.texts[key] = sl_text(key)
                if force:
                    _tune.TUNER.forget(key, device)
                steered_linear(x, W, b, **d, m1=m)  # tunes the key (or reads it from the cache)
                rec = _record(key, device)
                budget = _tune.budget_ms(device)
                rec["eager_ms"] = _tune.measure(lambda: eager_steering(x, W, b, **d, m1=m), device, budget)[0]
                rec["linear_ms"] = _tune.measure(lambda: F.linear(x, W, b), device, budget)[0]
                rec["auto_ms"] = _tune.measure(lambda: steered_linear(x, W, b, **d, m1=m), device, budget)[0]
            out.append({"op": "steered_linear", "form": form, "mkind": mkind, "rows": r, **rec})
            if on_result:
                on_result(out)
        if vocab:
            out.append(_tune_loss(vocab, hidden, loss_rows, dtype, device, force))
            if on_result:
                on_result(out)
    return out


def _tune_loss(vocab, hidden, rows, dtype, device, force) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    g = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)
    W = g(vocab, hidden, scale=hidden ** -0.5)
    h_pos, h_neg = g(1, rows, hidden).requires_grad_(), g(1, rows, hidden).requires_grad_()
    lab = lambda: torch.randint(0, vocab, (1, rows), generator=gen).to(device)
    l_pos, l_neg = lab(), lab()
    n = launch_rows(rows, rows)[0]  # the rows of the launch the loss makes: both sides' while they are few
    key = loss_key(torch.cat([h_pos[0], h_neg[0]])[:n].detach(), W, None, None, True)
    if force:
        _tune.TUNER.forget(key, device)
    split_loss(h_pos, h_neg, W, l_pos, l_neg)  # tunes the launch's key (one launch, or two that share it)
    rec = _record(key, device)
    # The floor a fused loss is judged by: its own two GEMMs (logits, then dH) on the rows the tuner timed.
    timed = tuned_rows(n, vocab, h_pos[0])
    hs = torch.cat([h_pos[0], h_neg[0]])[:timed].detach()
    rec["gemms_ms"] = _tune.measure(lambda: (hs @ W.t()) @ W, device, _tune.budget_ms(device))[0]
    rec["rows_timed"] = timed
    return {"op": "split_loss", "form": "", "mkind": "", "rows": rows, **rec}


def format_table(results: list[dict]) -> str:
    """The table ``fastsplit tune`` prints: per case each candidate's time, the choice, and the ratios of the chosen
    route against eager steering code and the bare F.linear (or, for the loss, against its own two GEMMs)."""
    lines = [f"{'op':<15}{'form':<13}{'m':<9}{'rows':>6}  {'choice':<22}{'ratios':<30}candidates (ms; x: refused)"]
    for r in results:
        times = r.get("times_ms", {})
        chosen = times.get(r.get("choice"))
        cands = ", ".join(f"{k} {v:.4g}" for k, v in sorted(times.items(), key=lambda kv: kv[1]))
        if r.get("refused"):
            cands += "; " + ", ".join(f"x {k}: {v[:60]}" for k, v in r["refused"].items())
        if r["op"] == "steered_linear":
            auto = r.get("auto_ms") or chosen
            ratios = f"{auto / r['eager_ms']:.2f}x eager, {auto / r['linear_ms']:.2f}x F.linear" if auto else "n/a"
        else:
            ratios = f"{chosen / r['gemms_ms']:.2f}x its 2 GEMMs" if chosen else "n/a"
        lines.append(f"{r['op']:<15}{r['form']:<13}{r['mkind']:<9}{r['rows']:>6}  {r.get('choice', '?'):<22}"
                     f"{ratios:<30}{cands or '(one candidate)'}")
    return "\n".join(lines)
