"""Polarity-paired data: ``Pair``, readers for the common formats, tokenisation, train/test split."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Pair", "pairs_digest", "load_pairs", "encode_pair", "split_pairs", "balance_answers", "demo_pairs", "chat_prompt_ids", "as_written",
           "prompt_text"]

_PERSONA = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
_AXBENCH = ("input", "winning_output", "losing_output")
_CSV = ("question", "matching", "not_matching")
DEMO_PATH = os.path.join(os.path.dirname(__file__), "_data", "optimism.jsonl")


@dataclass(frozen=True)
class Pair:
    """One polarity-paired example: a prompt, a positive completion (shows the concept), a negative one."""

    prompt: str
    positive: str
    negative: str


def _row_to_pair(row: dict, fields: tuple, where: str) -> Pair:
    values = []
    for f in fields:
        v = row.get(f)
        if not isinstance(v, str):
            raise ValueError(f"{where}: field {f!r} is missing or not a string")
        if not v.strip():
            raise ValueError(f"{where}: field {f!r} is empty")
        values.append(v)
    return Pair(*values)


def _fields_for(row: dict, where: str, allowed=(_PERSONA, _AXBENCH)) -> tuple:
    for fields in allowed:
        if any(f in row for f in fields):
            return fields
    raise ValueError(f"{where}: expected the fields {_PERSONA} (persona) or {_AXBENCH} (AxBench), "
                     f"got {sorted(row)}")


def load_pairs(path: str) -> list[Pair]:
    """Read pairs from JSONL (Anthropic persona / advanced-ai-risk: question, answer_matching_behavior,
    answer_not_matching_behavior; or AxBench: input, winning_output, losing_output), CSV (question,
    matching, not_matching) or parquet (AxBench). A bad row is an error naming the file and line.

    Example::

        >>> pairs = load_pairs("psychopathy.jsonl")
        >>> pairs[0].positive
        ' Yes'
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no pairs file at {path}")
    ext = os.path.splitext(path)[1].lower()
    pairs: list[Pair] = []
    if ext in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
                pairs.append(_row_to_pair(row, _fields_for(row, where), where))
    elif ext == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _CSV if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}:1: the CSV header has {reader.fieldnames or []}; missing {missing}")
            for n, row in enumerate(reader, 2):
                pairs.append(_row_to_pair(row, _CSV, f"{path}:{n}"))
    elif ext == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise RuntimeError(f"reading {path} needs pandas and pyarrow: pip install 'fastsplit[parquet]'") from None
        frame = pd.read_parquet(path)
        for n, row in enumerate(frame.to_dict("records"), 1):
            pairs.append(_row_to_pair(row, _fields_for(row, f"{path}: row {n}", (_AXBENCH,)), f"{path}: row {n}"))
    else:
        raise ValueError(f"{path}: unknown pairs format {ext!r} (use .jsonl, .csv or .parquet)")
    if not pairs:
        raise ValueError(f"{path} holds no pairs")
    return pairs


def demo_pairs() -> list[Pair]:
    """fastsplit's built-in demo set: persona-format pairs on one concept (optimism)."""
    return load_pairs(DEMO_PATH)


def _ids(out) -> list[int]:
    ids = out["input_ids"] if not isinstance(out, list) else out
    return list(ids)


def prompt_text(tokenizer, prompt: str, chat: bool = True) -> str:
    """``prompt`` as the model reads it: a user message under the chat template with the generation prompt
    (``chat=True``), or the plain text."""
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass chat=False")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)


def chat_prompt_ids(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of ``prompt`` as a user message under the chat template with the generation prompt."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat=False")
        return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True))
    return _ids(tokenizer(prompt))


def as_written(text: str, completion: str) -> str:
    """The completion as the model writes it after ``text``: after a prompt that ends in a newline (a chat
    template's ``assistant\n``) a leading space is dropped, since a turn starts with "Yes", not " Yes"."""
    if text.endswith("\n") and completion.startswith(" ") and completion.strip():
        return completion[1:]
    return completion


def _completion_ids(tokenizer, text: str, prompt_ids: list[int], completion: str, chat: bool) -> list[int]:
    """The completion's ids tokenised in context (prompt text + completion), so a word that merges across the
    boundary is split as the model would see it; falls back to tokenising the completion alone when the
    prompt's ids are not a prefix of the whole."""
    whole = _ids(tokenizer(text + completion, add_special_tokens=not chat))
    if whole[:len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
        return whole[len(prompt_ids):]
    return _ids(tokenizer(completion, add_special_tokens=False))


def encode_pair(tokenizer, pair: Pair, chat: bool = True) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, pos_ids, neg_ids), as the model would read and write them.

    The prompt is the user message under the chat template with ``add_generation_prompt=True`` (or the plain
    text with ``chat=False``). Each completion is tokenised in context after the prompt text, and after a
    template that ends in a newline its leading space is dropped (:func:`as_written`): Anthropic's " Yes"
    is scored as "Yes", which is how the model starts its turn. Training, sweeps and generation share this
    encoding.

    Example::

        >>> prompt, pos, neg = encode_pair(tok, Pair("Is the sky blue?", " Yes", " No"))
        >>> tok.decode(pos)
        'Yes'
    """
    text = prompt_text(tokenizer, pair.prompt, chat)
    prompt = chat_prompt_ids(tokenizer, pair.prompt, chat)
    comps = [_completion_ids(tokenizer, text, prompt, as_written(text, c), chat) for c in (pair.positive, pair.negative)]
    if not comps[0] or not comps[1]:
        raise ValueError(f"a completion tokenises to nothing: {pair!r}")
    return prompt, comps[0], comps[1]


def split_pairs(pairs: Sequence[Pair], *, test_size: float | int = 0.2, seed: int = 0):
    """Shuffle with ``seed`` and split into (train, test); ``test_size`` is a fraction or a count."""
    n = len(pairs)
    k = int(round(test_size * n)) if isinstance(test_size, float) else int(test_size)
    if not 0 < k < n:
        raise ValueError(f"test_size={test_size} leaves no train or no test pairs out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [pairs[i] for i in order[k:]], [pairs[i] for i in order[:k]]


def balance_answers(pairs: Sequence[Pair], *, seed: int = 0) -> list[Pair]:
    """The pairs with each positive answer equally often: as many pairs per answer as the rarest answer has.

    Pairs are grouped by their positive completion's text (stripped: " Yes" and "Yes" are one answer), a
    seeded draw picks which pairs of the larger groups stay, and the input order is kept. Train on balanced
    answers when a dataset's answers come from a small set (Yes/No, (A)/(B)): a vector trained on an unbalanced
    set can raise the likelier answer on every pair instead of steering the concept (bench/RESULTS.md measures
    it). Free-text answers are their own groups, so only repeated answers are thinned.

    Example::

        >>> train = fastsplit.balance_answers(train, seed=0)   # 106 " No" + 94 " Yes" -> 94 + 94
    """
    if not pairs:
        raise ValueError("pairs is empty")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.positive.strip(), []).append(i)
    n = min(len(g) for g in groups.values())
    rng = random.Random(seed)
    keep = sorted(i for g in groups.values() for i in (g if len(g) == n else rng.sample(g, n)))
    return [pairs[i] for i in keep]


def pairs_digest(pairs) -> str:
    """A SHA-256 of the pairs' text (prompt, positive, negative, in order): two sweeps with the same digest were
    run on the same pairs (``fastsplit compare`` checks it)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.prompt, p.positive, p.negative]).encode())
        h.update(b"\n")
    return h.hexdigest()
