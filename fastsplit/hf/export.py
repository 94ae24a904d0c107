"""Deploying a trained intervention at a chosen strength m, in the formats serving engines read.

* ``control-vector``: a GGUF file in llama.cpp's control-vector layout (``--control-vector`` in llama.cpp and
  ollama): ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (llama.cpp's name of the
  architecture), ``controlvector.layer_count``, and one float32 ``direction.<k>`` tensor per layer k = 1 … n−1.
  llama.cpp adds ``direction.k`` to the residual stream after (0-based) layer k and has no direction for layer
  0's output, so the vector m·Δb of a steering at layer L is ``direction.L`` and the others are zeros. It is the
  same intervention only for the vector form, where the update enters the residual stream by addition: the
  residual site, or the MLP's down_proj on architectures without a norm after the MLP (not Gemma-2/3, OLMo-2).
* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained`` loads
  on the base model: a LoRA on layer L's ``mlp.down_proj`` with ``lora_alpha = m·r`` (peft's scaling alpha/r is
  then m) and ``lora_bias`` holding Δb (peft multiplies it by the same scaling: m·Δb). The vector form is
  written exactly as a rank-1 LoRA whose B is zero (only its bias acts); local_weight exactly as a full-rank
  LoRA (r = min(in, out): ΔW = I·ΔW or ΔW·I). peft ≥ 0.14 reads ``lora_bias``.
* ``merged``: the changed tensors of the base model only (``model.layers.L.mlp.down_proj.weight`` = W + m·ΔW,
  and ``.bias`` = b + m·Δb), or with ``full=True`` a complete ``save_pretrained`` folder. A bias on a down_proj
  that has none needs the architecture's ``mlp_bias`` option (Llama, Mistral-style configs) in the full folder.

Every check (file, form, architecture, layer, m) runs before any model loads, and every output is written whole
or not at all (a temporary file or folder, then a rename).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile

import torch

from .. import dist
from .loading import load_config, load_model
from .. import steerfile
from ..steerfile import has_delta_bias
from . import runner

__all__ = ["FORMATS", "export_steering", "export_tensors", "check_export", "export_routes", "read_steering_tensors",
           "operating_point_of", "apply_control_vector", "file_sha256"]

log = logging.getLogger("fastsplit")

FORMATS = ("control-vector", "peft", "merged")
# Architectures whose MLP output passes a norm before the residual add: the down_proj vector is not a fixed
# residual offset there (hf/internals.py lists the post-feed-forward norm as an internal relied on).
_POST_FFN_NORM = ("gemma2", "gemma3", "gemma3_text", "olmo2")
# llama.cpp's architecture names (controlvector.model_hint), where they differ from Hugging Face's model_type.
_LLAMA_CPP_ARCH = {"mistral": "llama"}


def read_steering_tensors(path: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a steering file, both checked: a missing or corrupt file is one clear error."""
    return steerfile.read_tensors(path)


def operating_point_of(fit_path: str, steering: str | None = None) -> tuple[float, list[str]]:
    """(m_op, the sweep's warnings) from a ``fit.json`` that ``fastsplit sweep`` or ``demo`` wrote. With ``steering``
    (a steering file), the fit must record that it was swept with that very file (its SHA-256): an operating point
    of another intervention is refused, never applied silently."""
    if not os.path.isfile(fit_path):
        raise FileNotFoundError(f"no fit file at {fit_path}")
    try:
        with open(fit_path) as f:
            fit = json.load(f)
        m = fit["operating_point"]["multiplier"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{fit_path} is not a fit.json with an operating point ({type(exc).__name__})") from None
    if not isinstance(m, (int, float)) or not math.isfinite(m):
        raise ValueError(f"{fit_path}: the operating point {m!r} is not a finite number")
    if steering is not None:
        swept = ((fit.get("provenance") or {}).get("steering") or {}).get("sha256")
        if swept is None:
            raise ValueError(f"{fit_path} does not record which steering file it was swept with (written before "
                             "fastsplit recorded it): sweep this steering again, or give --m as a number")
        if swept != file_sha256(steering):
            raise ValueError(f"{fit_path} was swept with another steering file "
                             f"({fit['provenance']['steering'].get('path')}), not {steering}: its operating point "
                             "belongs to that intervention")
    return float(m), [str(w) for w in fit.get("warnings", [])]


def file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_export(meta: dict, config, fmt: str, *, m: float, full: bool = False) -> None:
    """Whether ``fmt`` can hold this intervention exactly; a one-line reason when it cannot, which names the routes
    that do work for this steering on this model (:func:`export_routes`), or says to retrain when none does."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise ValueError(f"m must be a finite number, got {m!r}")
    why = _refusal(meta, config, fmt, full)
    if why:
        raise ValueError(f"{why} ({_routes_hint(meta, config)})")


def _refusal(meta: dict, config, fmt: str, full: bool) -> str | None:
    """Why ``fmt`` (``full``: a whole merged model folder) cannot hold this steering on this model, or None."""
    form, layer, site = meta["form"], int(meta["layer"]), meta["site"]
    if fmt == "control-vector":
        if form != "vector":
            return f"a control vector is one fixed vector per layer; a {form} update depends on the input"
        if site == "down_proj" and config.model_type in _POST_FFN_NORM:
            return (f"on {config.model_type} a norm follows the MLP, so a vector at down_proj is not a fixed offset of "
                    "the residual stream")
        if layer == 0:
            return ("llama.cpp control vectors start after layer 1 (there is no direction.0): a steering at layer 0 "
                    "cannot be written as one")
        return None
    if site != "down_proj":
        return f"{'peft adapts' if fmt == 'peft' else 'merged weights change'} a module; a residual-site steering has none"
    if fmt == "merged" and full and has_delta_bias(meta) and not hasattr(config, "mlp_bias"):
        return (f"{config.model_type}'s MLP has no bias option, so a steering bias cannot be merged into a full model "
                "folder")
    return None


def export_routes(meta: dict, config) -> list[str]:
    """The exports that hold this steering exactly on this model: among "control-vector", "peft", "merged" (the
    changed tensors) and "merged --full" (a model folder)."""
    cases = [("control-vector", False), ("peft", False), ("merged", False), ("merged", True)]
    return [fmt + (" --full" if full else "") for fmt, full in cases if _refusal(meta, config, fmt, full) is None]


def _routes_hint(meta: dict, config) -> str:
    routes = export_routes(meta, config)
    if routes:
        return "this steering exports as " + ", ".join(routes)
    other = "residual" if meta["site"] == "down_proj" else "down_proj"
    return f"no format holds this steering on {config.model_type}: retrain it with --site {other}"


def export_steering(steering: str, out: str, *, m: float, format: str, model="default", full: bool = False,
                    check_model_name: bool = True) -> list[str]:
    """Write the steering file ``steering`` at strength ``m`` as ``format`` to ``out``; returns the written paths.

    ``model`` is "default", a local model folder, or a loaded model (needed by ``merged`` only; the config is
    enough for the others, so they load no weights). ``full`` (merged): a complete ``save_pretrained`` folder
    instead of the changed tensors.

    Example::

        >>> export_steering("run/steering.safetensors", "optimism.gguf", m=3.2, format="control-vector")
        >>> export_steering("run/steering.safetensors", "adapter", m=3.2, format="peft")
    """
    meta, tensors = read_steering_tensors(steering)
    config = model.config if isinstance(model, torch.nn.Module) else load_config(model)
    steerfile.check_model(meta, config, steering, model_name=runner.config_name(config) if check_model_name else None)
    return export_tensors(meta, tensors, out, m=m, format=format, model=model, config=config, full=full)


def export_tensors(meta: dict, tensors: dict, out: str, *, m: float, format: str, model, config,
                   full: bool = False) -> list[str]:
    """:func:`export_steering` on an intervention's metadata and tensors (``Steering.export`` passes its own)."""
    check_export(meta, config, format, m=m, full=full)
    tensors = {k: v.detach().float().cpu() for k, v in tensors.items()}
    if format == "control-vector":
        return [_control_vector(out, meta, tensors, float(m), config)]
    if format == "peft":
        return _peft(out, meta, tensors, float(m), _base_folder(model, config))
    if isinstance(model, torch.nn.Module):
        loaded = model
    else:
        from .compat import quiet_loading

        with quiet_loading():  # the export's own line is the output; loading bars are noise here
            loaded = load_model(model)[0]
    return _merged(out, meta, tensors, float(m), loaded, full=full, tokenizer_source=_base_folder(model, config))


def _base_folder(model, config) -> str | None:
    """The local folder the base model loads from (peft's base_model_name_or_path, where the tokenizer is copied
    from): the default model's cache folder, a model folder, or a loaded model's own folder; None if unknown."""
    from .loading import DEFAULT_MODEL_NAME, cache_dir

    if isinstance(model, str):
        return cache_dir() if model == "default" else os.path.abspath(model)
    for name in (getattr(config, "_name_or_path", None), getattr(config, "name_or_path", None)):
        if name == DEFAULT_MODEL_NAME:
            return cache_dir()
        if name and os.path.isdir(name):
            return os.path.abspath(name)
    return None


def _control_vector(out, meta, tensors, m, config) -> str:
    import gguf
    import numpy as np

    layer, n = int(meta["layer"]), int(config.num_hidden_layers)
    v = (m * tensors["delta_bias"].double()).float().numpy()  # the vector form always has its Δb

    def write(tmp):
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", _LLAMA_CPP_ARCH.get(config.model_type, config.model_type))
        writer.add_uint32("controlvector.layer_count", n)
        for k in range(1, n):
            writer.add_tensor(f"direction.{k}", v if k == layer else np.zeros_like(v))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    _atomic_file(out, write)
    return out


def apply_control_vector(llm, path: str, scale: float = 1.0) -> None:
    """Apply a control vector file (this module's ``control-vector`` export) to a ``llama_cpp.Llama`` from Python:
    llama-cpp-python's ``Llama`` takes no control vector itself, so this hands the directions to llama.cpp's C API
    (``llama_set_adapter_cvec``; ``llama_apply_adapter_cvec`` in older releases), as ``--control-vector`` does.
    ``scale`` multiplies the file's vector (the file holds m·Δb already). Tested: tests/test_llama_cpp.py.

    Example::

        >>> llm = llama_cpp.Llama(model_path=fastsplit.hf.default_gguf(), n_ctx=512)
        >>> apply_control_vector(llm, "optimism.gguf")
    """
    import ctypes

    import gguf
    import llama_cpp
    import numpy as np

    n_embd = llm.n_embd()
    tensors = {int(t.name.split(".")[1]): np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(path).tensors
               if t.name.startswith("direction.")}
    if not tensors:
        raise ValueError(f"{path} holds no direction.<layer> tensors: not a control vector")
    n = max(tensors)
    data = np.zeros(n * n_embd, dtype=np.float32)  # llama.cpp's layout: direction.k at row k - 1
    for k, v in tensors.items():
        if v.size != n_embd:
            raise ValueError(f"{path}: direction.{k} has {v.size} values, the model's hidden size is {n_embd}")
        data[(k - 1) * n_embd:k * n_embd] = scale * v
    set_cvec = getattr(llama_cpp, "llama_set_adapter_cvec", None) or getattr(llama_cpp, "llama_apply_adapter_cvec")
    ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if set_cvec(llm.ctx, ptr, data.size, n_embd, 1, n) != 0:
        raise RuntimeError(f"llama.cpp refused the control vector {path}")
    llm._fastsplit_control_vector = data  # the buffer stays alive as long as the model


def _down_proj_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj"


def _delta_bias(meta, tensors, out_features: int) -> torch.Tensor:
    """Δb, or zeros for an intervention trained without one."""
    db = tensors.get("delta_bias")
    return db if db is not None else torch.zeros(out_features)


def _lora_factors(meta, tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B·A = the update's ΔW, exactly, for every form."""
    db = tensors.get("delta_bias")
    if meta["form"] == "lora":
        return tensors["lora_a"], tensors["lora_b"]
    if meta["form"] == "local_weight":
        dw = tensors["delta_weight"]
        out_f, in_f = dw.shape
        if out_f <= in_f:
            return dw, torch.eye(out_f, dtype=dw.dtype)
        return torch.eye(in_f, dtype=dw.dtype), dw
    in_f = int(meta.get("intermediate_size") or 0)
    return torch.zeros(1, in_f, dtype=db.dtype), torch.zeros(db.shape[0], 1, dtype=db.dtype)


def _peft(out, meta, tensors, m, base_folder: str | None) -> list[str]:
    from safetensors.torch import save_file

    layer = int(meta["layer"])
    a, b = _lora_factors(meta, tensors)
    r = a.shape[0]
    prefix = f"base_model.model.{_down_proj_name(layer)}"
    weights = {f"{prefix}.lora_A.weight": a.contiguous(), f"{prefix}.lora_B.weight": b.contiguous()}
    db = tensors.get("delta_bias")
    bias = db is not None and bool(db.abs().max() > 0)  # a plain adapter wherever Δb is absent or zero
    if bias:
        weights[f"{prefix}.lora_B.bias"] = db.contiguous()
        log.warning("fastsplit: this %s's peft adapter carries Δb as lora_bias: peft loads it, vLLM does not load "
                    "adapters with a bias (serve it with --format merged --full or fastsplit's vLLM plugin; train "
                    "LoRA or local_weight with --no-delta-bias for a plain adapter)", meta["form"])
    # Only the keys peft's LoraConfig takes (an unknown key makes peft warn); fastsplit's own record is fastsplit.json.
    adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_folder or meta.get("model"),
               "r": int(r), "lora_alpha": m * r, "target_modules": ["down_proj"], "layers_to_transform": [layer],
               "lora_dropout": 0.0, "bias": "none", "lora_bias": bias, "fan_in_fan_out": False,
               "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
               "inference_mode": True}
    record = {"form": meta["form"], "m": m, "layer": layer, "model": meta.get("model"), "lora_bias": bias,
              "objective": meta.get("objective")}

    def write(folder):
        save_file(weights, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(adapter, f, indent=2)
        with open(os.path.join(folder, "fastsplit.json"), "w") as f:
            json.dump(record, f, indent=2)
    return _atomic_folder(out, write)


def _merged(out, meta, tensors, m, model, *, full, tokenizer_source) -> list[str]:
    from safetensors.torch import save_file

    from .runner import decoder_layers

    layer = int(meta["layer"])
    base = decoder_layers(model)[layer].mlp.down_proj  # nn.Linear, or an attached SteeredLinear sharing its W, b
    a, b = _lora_factors(meta, tensors)
    w = base.weight.detach().double().cpu()
    w_new = (w + m * (b.double() @ a.double())).to(base.weight.dtype)
    bias = base.bias.detach().double().cpu() if base.bias is not None else torch.zeros(w.shape[0], dtype=torch.double)
    b_new = (bias + m * _delta_bias(meta, tensors, w.shape[0]).double()).to(base.weight.dtype)
    name = _down_proj_name(layer)
    if not full:
        def write(tmp):
            save_file({f"{name}.weight": w_new.contiguous(), f"{name}.bias": b_new.contiguous()}, tmp,
                      metadata={"fastsplit_merged": json.dumps({"form": meta["form"], "m": m, "layer": layer})})
        _atomic_file(out, write)
        return [out]
    needs_bias = base.bias is None and bool(b_new.abs().max() > 0)
    if needs_bias and not hasattr(model.config, "mlp_bias"):  # check_export refused a file with a Δb already
        raise ValueError(f"{model.config.model_type}'s MLP has no bias option, so a steering bias cannot be merged "
                         f"into a full model folder ({_routes_hint(meta, model.config)})")
    return _atomic_folder(out, lambda folder: _save_full(folder, model, layer, w_new, b_new, needs_bias,
                                                         tokenizer_source))


def _save_full(folder, model, layer, w_new, b_new, needs_bias, tokenizer_source) -> None:
    """The base model with layer L's down_proj merged, saved with save_pretrained from a state dict of the model's own
    tensors (no copy of the model; the model is left as it was)."""
    import copy

    from .runner import decoder_layers

    names = {id(mod): name for name, mod in model.named_modules()}
    down = names[id(decoder_layers(model)[layer].mlp.down_proj)]  # a Linear, or an attached SteeredLinear
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(down + ".")}  # not Δ tensors
    state[f"{down}.weight"] = w_new
    config = copy.deepcopy(model.config)
    if needs_bias:  # mlp_bias gives every MLP linear a bias: zeros but the merged one
        config.mlp_bias = True
        for dec in decoder_layers(model):
            for lin in (getattr(dec.mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")):
                if isinstance(lin, torch.nn.Linear) and lin.bias is None:
                    state[f"{names[id(lin)]}.bias"] = torch.zeros(lin.out_features, dtype=lin.weight.dtype)
    if needs_bias or getattr(decoder_layers(model)[layer].mlp.down_proj, "bias", None) is not None:
        state[f"{down}.bias"] = b_new
    model.save_pretrained(folder, state_dict=state)
    config.save_pretrained(folder)  # after the weights: the merged config (mlp_bias) is the one that stays
    if tokenizer_source is not None:  # a full folder is self-contained: vllm serve and AutoTokenizer read it
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    else:
        log.warning("fastsplit: the model's own folder is unknown, so the merged folder has no tokenizer: copy its "
                    "tokenizer files beside the weights")


def _atomic_file(out: str, write) -> None:
    """``write(tmp)`` then renamed onto ``out``, its folder made if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    dist.atomic_write(out, write)


def _atomic_folder(out: str, write) -> list[str]:
    """``write(folder)`` into a temporary folder beside ``out``, then swapped in whole; returns the files written."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        write(tmp)
        names = sorted(os.listdir(tmp))
        old = None
        if os.path.exists(out):
            if not os.path.isdir(out):
                raise ValueError(f"{out} is a file; a {os.path.basename(out)!r} export is a folder")
            old = tempfile.mkdtemp(prefix=".old-export-", dir=parent)
            os.rmdir(old)
            os.replace(out, old)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export gets a new folder's usual modes
        for name in names:
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(out, n) for n in names]
