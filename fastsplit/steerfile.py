"""The steering file (``steering.safetensors``): its format and its checked readers, for every layer that reads one
(``fastsplit.hf`` attaches it to a transformers model, ``fastsplit.vllm`` to a vLLM engine). Imports nothing from
fastsplit.

A file holds the intervention's tensors (``delta_bias`` [out] unless trained without it, plus ``lora_a`` [r, in] and
``lora_b`` [out, r], or ``delta_weight`` [out, in]) and string metadata: ``format``, ``form``, ``layer``, ``site``,
``rank``, ``model``, ``model_type``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``objective`` and
``delta_bias`` ("1" or "0"; files written before it was recorded hold a Δb).
"""
from __future__ import annotations

import os

FORMAT = "fastsplit.steering/1"
FORMS = ("vector", "lora", "local_weight")
_REQUIRED = ("form", "layer", "site", "rank", "model", "hidden_size", "num_hidden_layers")

__all__ = ["FORMAT", "read_metadata", "read_tensors", "expected_tensors", "has_delta_bias", "check_model"]


def has_delta_bias(meta: dict) -> bool:
    """Whether the file's intervention has a Δb (every file written before ``delta_bias`` was recorded has one)."""
    return meta.get("delta_bias", "1") != "0"


def expected_tensors(form: str, delta_bias: bool = True) -> set[str]:
    """The tensor names a steering file of ``form`` holds."""
    base = {"vector": set(), "lora": {"lora_a", "lora_b"}, "local_weight": {"delta_weight"}}[form]
    return base | ({"delta_bias"} if delta_bias else set())


def read_metadata(path: str) -> dict[str, str]:
    """The metadata of a saved steering file, checked for the fields fastsplit writes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no steering file at {path}")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastsplit steering file (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the metadata fields {missing}")
    if meta["form"] not in FORMS:
        raise ValueError(f"{path} has an unknown form {meta['form']!r} (expected one of {FORMS})")
    return meta


def read_tensors(path: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a steering file, both checked: a missing or corrupt file, a tensor set that does not
    match the form, or NaN/inf values are one clear error."""
    import torch
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    need = expected_tensors(meta["form"], has_delta_bias(meta))
    if set(tensors) != need:
        raise ValueError(f"{path}: a {meta['form']!r} steering file should hold {sorted(need)}, not {sorted(tensors)}")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: steering tensors {bad} hold NaN or inf values")
    return meta, tensors


def check_model(meta: dict, config, path: str, *, model_name: str | None = None) -> None:
    """A steering file's metadata against a model's config (any object with ``hidden_size``,
    ``num_hidden_layers`` and, for an MLP site, ``intermediate_size``; no weights needed): sizes and layer count,
    and the model's name when ``model_name`` is given. A mismatch is one ValueError naming the field."""
    here = {"hidden_size": str(config.hidden_size), "num_hidden_layers": str(config.num_hidden_layers),
            "intermediate_size": str(getattr(config, "intermediate_size", 0))}
    if model_name is not None:
        here["model"] = model_name
    for key, value in here.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"{path} was saved for a model with {key}={meta[key]!r}, but this model has "
                             f"{key}={value!r}" + (" (pass check_model_name=False to skip the name check)"
                                                   if key == "model" else ""))
