"""Preference and utility log-odds over steering strength (arXiv 2602.02343, §3).

From the summed NLLs L_p, L_n of the positive and negative completions under teacher forcing:
  PrefOdds = L_n − L_p,   UtilOdds = log((e^−L_p + e^−L_n) / (1 − e^−L_p − e^−L_n)).

``logodds_sweep`` runs on any engine (:mod:`fastsplit.engines`); on the transformers engine it is the fast path
(:mod:`fastsplit.engines.transformers`). ``logodds_naive`` is the plain loop (oracle, baseline).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .. import dist, engines, hf
from ..data import Pair, encode_pair
from ..ops._checks import check_strengths

__all__ = ["Sweep", "logodds_sweep", "logodds_sweep_vllm", "logodds_naive", "util_odds"]

_UTIL_EPS = 1e-6  # the utility denominator is floored at this probability mass


def util_odds(nll_pos, nll_neg):
    """UtilOdds from summed NLLs, computed stably; returns (values, clamped).

    log(e^−Lp + e^−Ln) is a logaddexp; the denominator log(1 − e^a) is log1mexp. Where the two
    "probabilities" reach a total of 1 (possible with length-normalised NLLs) the denominator would
    be ≤ 0: there the value is clamped to the floor ``_UTIL_EPS`` and flagged, never NaN.
    """
    a = np.logaddexp(-np.asarray(nll_pos, dtype=np.float64), -np.asarray(nll_neg, dtype=np.float64))
    cap = math.log1p(-_UTIL_EPS)
    clamped = a > cap
    a = np.minimum(a, cap)
    log1mexp = np.where(a > -math.log(2.0), np.log(-np.expm1(a)), np.log1p(-np.exp(a)))
    return a - log1mexp, clamped


@dataclass
class Sweep:
    """Log-odds of N pairs at M strengths. Arrays: ``multipliers`` [M]; ``nll_pos``, ``nll_neg``,
    ``pref_odds``, ``util_odds``, ``util_clamped`` [N, M]. ``groups`` [N]: each pair's answer group, the first
    token of its positive completion as scored (or None)."""

    multipliers: np.ndarray
    nll_pos: np.ndarray
    nll_neg: np.ndarray
    pref_odds: np.ndarray
    util_odds: np.ndarray
    util_clamped: np.ndarray
    length_norm: bool = False
    groups: list[str] | None = None
    extra: dict | None = None  # further per-(pair, m) columns [N, M], e.g. the manifold measures (sweep --manifold)

    @classmethod
    def from_nll(cls, multipliers, nll_pos, nll_neg, length_norm=False, groups=None) -> "Sweep":
        nll_pos, nll_neg = np.asarray(nll_pos, np.float64), np.asarray(nll_neg, np.float64)
        util, clamped = util_odds(nll_pos, nll_neg)
        if groups is not None and len(groups) != nll_pos.shape[0]:
            raise ValueError(f"groups has {len(groups)} labels for {nll_pos.shape[0]} pairs")
        return cls(np.asarray(multipliers, np.float64), nll_pos, nll_neg, nll_neg - nll_pos, util, clamped,
                   length_norm, None if groups is None else list(groups))

    def summary(self) -> dict[str, np.ndarray]:
        """Per-m mean and standard error of the preference and utility log-odds (arrays [M])."""
        n = self.pref_odds.shape[0]
        se = lambda x: x.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(x.shape[1])
        return {"multiplier": self.multipliers, "pref_mean": self.pref_odds.mean(0), "pref_se": se(self.pref_odds),
                "util_mean": self.util_odds.mean(0), "util_se": se(self.util_odds),
                "util_clamped": self.util_clamped.sum(0)}

    @classmethod
    def from_csv(cls, path: str) -> "Sweep":
        """Read a ``sweep.csv`` written by :meth:`to_csv` back (pairs × multipliers; every cell must be there).
        Extra columns (``--manifold``'s) go to :attr:`extra` as [N, M] arrays."""
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        need = {"pair", "multiplier", "nll_pos", "nll_neg"}
        if not rows or not need <= set(rows[0]):
            raise ValueError(f"{path} is not a sweep.csv (needs the columns {sorted(need)})")
        pairs = sorted({int(r["pair"]) for r in rows})
        ms = sorted({float(r["multiplier"]) for r in rows})
        if pairs != list(range(len(pairs))) or len(rows) != len(pairs) * len(ms):
            raise ValueError(f"{path} does not hold every (pair, multiplier) cell once: {len(rows)} rows for "
                             f"{len(pairs)} pairs x {len(ms)} multipliers")
        col = {m: j for j, m in enumerate(ms)}
        base = {"pair", "group", "multiplier", "nll_pos", "nll_neg", "pref_odds", "util_odds", "util_clamped"}
        extra_names = [k for k in rows[0] if k not in base]
        nll = np.zeros((len(pairs), len(ms), 2))
        extra = {k: np.zeros((len(pairs), len(ms))) for k in extra_names}
        groups = [""] * len(pairs)
        for r in rows:
            i, j = int(r["pair"]), col[float(r["multiplier"])]
            nll[i, j] = float(r["nll_pos"]), float(r["nll_neg"])
            groups[i] = r.get("group", "")
            for k in extra_names:
                extra[k][i, j] = float(r[k])
        sweep = cls.from_nll(ms, nll[..., 0], nll[..., 1], groups=groups if any(groups) else None)
        sweep.extra = extra
        return sweep

    def to_csv(self, path: str) -> None:
        """Long format, one row per (pair, multiplier). Columns: ``pair`` (index in the swept list), ``group`` (the
        positive completion's first token as scored), ``multiplier`` (m), ``nll_pos`` / ``nll_neg`` (summed NLL in
        nats of the positive / negative completion; token means with ``length_norm``), ``pref_odds``
        (L_n − L_p), ``util_odds`` (the utility log-odds), ``util_clamped`` (1 where its denominator was floored).
        ``multiplier``, ``nll_pos`` and ``nll_neg`` are written exactly (shortest round-trip form), so
        :meth:`from_csv` gives back the very sweep and a re-analysis the figures of its ``fit.json``: the bootstrap's
        refits of a weakly identified curve move by 1e-3 under input changes of 1e-7; the derived columns have 8
        digits."""
        extra = self.extra or {}
        exact = lambda v: repr(float(v))  # float(): numpy 2's repr of a scalar names its type
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["pair", "group", "multiplier", "nll_pos", "nll_neg", "pref_odds", "util_odds", "util_clamped",
                        *extra])
            for i in range(self.nll_pos.shape[0]):
                for j, m in enumerate(self.multipliers):
                    w.writerow([i, self.groups[i] if self.groups else "", exact(m), exact(self.nll_pos[i, j]),
                                exact(self.nll_neg[i, j]), f"{self.pref_odds[i, j]:.8g}", f"{self.util_odds[i, j]:.8g}",
                                int(self.util_clamped[i, j]), *(f"{v[i, j]:.8g}" for v in extra.values())])


def _check(pairs, multipliers):
    if not pairs:
        raise ValueError("pairs is empty")
    return check_strengths("multipliers", multipliers)


def logodds_sweep(engine, *args, length_norm: bool = False, batch_size: int | None = None, chat: bool = True,
                  progress: bool = True, group=None, checkpoint_dir: str | None = None, resume: bool = False) -> Sweep:
    """Teacher-forced NLLs of every pair's two completions at every multiplier; returns a :class:`Sweep`.

    Called as ``logodds_sweep(engine, pairs, multipliers)`` with any engine (:mod:`fastsplit.engines`: transformers
    or vLLM), or as ``logodds_sweep(model, tokenizer, steering, pairs, multipliers)`` on a transformers model, which
    runs :class:`fastsplit.engines.TransformersEngine`'s fast path (the layers below the intervention once per pair,
    the prompt once per m for both completions, the prompts' shared prefix once per m for the whole sweep).

    ``batch_size``: pairs per batch on the transformers engine (each becomes M rows; default about 48 rows on the
    CPU, where cache-sized GEMMs run fastest, and about 512 on a GPU); rows per submitted block on vLLM when
    checkpointing. With ``length_norm=True`` the NLLs are token means. Tokenisation is
    :func:`fastsplit.encode_pair`'s, the same for every engine.

    Inside an initialised process group (``torchrun``; or ``group=``) the transformers engine's ranks take batches
    of pairs from a shared counter and every rank returns the whole sweep, in the input order.

    ``checkpoint_dir``: each finished batch of pairs is written there as a block (:class:`fastsplit.dist.Blocks`,
    with the engine's steering digest, the pairs' digest and the multipliers); with ``resume=True`` the pairs found
    there are not swept again (a block of another steering, data set, grid or engine is refused), without it old
    blocks are removed first. The result equals an uninterrupted sweep's, on either engine.

    Example::

        >>> sweep = logodds_sweep(model, tok, steering, test_pairs, np.linspace(-8, 8, 21))
        >>> sweep.summary()["pref_mean"]
    """
    engine, (pairs, multipliers) = engines.resolve(engine, args, 2, "logodds_sweep", group=group)
    ms = _check(pairs, multipliers)
    pairs = list(pairs)
    group = getattr(engine, "group", None)
    dist.check_world(len(pairs), "pairs", group)
    tokenizer = engine.tokenizer
    enc = [encode_pair(tokenizer, p, chat=chat) for p in pairs]  # every rank: a bad pair stops each before any work
    groups = _groups(tokenizer, enc)
    done, blocks = {}, None
    if checkpoint_dir:
        from ..data import pairs_digest

        header = {"steering": engine.digest(), "pairs": pairs_digest(pairs), "multipliers": ms,
                  "length_norm": bool(length_norm), "chat": bool(chat)}
        if engine.name != "transformers":  # blocks of the transformers engine keep the header they always had
            header["engine"] = engine.name
        blocks = dist.Blocks(checkpoint_dir, header, "log-odds sweep", group)
        done = blocks.load() if resume else blocks.clear()
    todo = [i for i in range(len(pairs)) if i not in done]
    rows = [(enc[i][0], comp) for i in todo for comp in (enc[i][1], enc[i][2])]  # pair k's rows are 2k, 2k + 1
    got: dict[int, list] = {}

    def write(idx, nll):  # finished rows (positions in ``rows``): a pair's block once both its rows are in
        finished = {}
        for r, row in zip(idx, np.asarray(nll)):
            got.setdefault(r // 2, [None, None])[r % 2] = row
            if all(x is not None for x in got[r // 2]):
                finished[todo[r // 2]] = np.stack(got.pop(r // 2), axis=1).tolist()  # [M, 2]
        if blocks is not None and finished:
            blocks.write(finished)

    new = {}
    if todo:
        nll = engine.score(rows, ms, length_norm=length_norm, batch_size=batch_size, progress=progress,
                           on_rows=write if blocks is not None else None)
        new = {i: np.stack([nll[2 * k], nll[2 * k + 1]], axis=1).tolist() for k, i in enumerate(todo)}
    table = np.asarray([done[i] if i in done else new[i] for i in range(len(pairs))], np.float64)
    return Sweep.from_nll(ms, table[..., 0], table[..., 1], length_norm, groups)


def _groups(tokenizer, enc) -> list[str]:
    """Each pair's answer group: its positive completion's first token, as scored."""
    return [tokenizer.decode(pos[:1]) for _, pos, _ in enc]


@torch.no_grad()
def logodds_naive(model, tokenizer, steering: hf.Steering, pairs: Sequence[Pair], multipliers: Sequence[float], *,
                  length_norm: bool = False, chat: bool = True, progress: bool = True) -> Sweep:
    """The plain loop: one full forward per (m, pair, completion), full-vocabulary logits. Oracle and baseline."""
    from tqdm.auto import tqdm

    ms = _check(pairs, multipliers)
    device = next(model.parameters()).device
    nll = np.zeros((len(pairs), len(ms), 2))
    enc = [encode_pair(tokenizer, p, chat=chat) for p in pairs]
    for j, m in enumerate(tqdm(ms, desc="naive log-odds", disable=not progress, leave=False)):
        with steering.multiplier(m):
            for i, (p, c, n) in enumerate(enc):
                for k, comp in enumerate((c, n)):
                    ids = torch.tensor([p + comp], device=device)
                    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
                    tok = -logp.gather(1, torch.tensor(comp, device=device)[:, None]).squeeze(1)
                    nll[i, j, k] = float(tok.mean() if length_norm else tok.sum())
    return Sweep.from_nll(ms, nll[..., 0], nll[..., 1], length_norm, _groups(tokenizer, enc))


def logodds_sweep_vllm(engine, tokenizer, pairs: Sequence[Pair], multipliers: Sequence[float], *,
                       steering: str | None = None, length_norm: bool = False, chat: bool = True,
                       progress: bool = True) -> Sweep:
    """Deprecated: ``logodds_sweep(fastsplit.engines.VLLMEngine(engine, tokenizer, steering), pairs, multipliers)``."""
    engines.deprecated("logodds_sweep_vllm", "logodds_sweep(fastsplit.engines.VLLMEngine(engine, tokenizer, steering), "
                       "pairs, multipliers)")
    return logodds_sweep(engines.VLLMEngine(engine, tokenizer, steering), pairs, multipliers, length_norm=length_norm,
                         chat=chat, progress=progress)
