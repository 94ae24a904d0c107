"""Every transformers internal that fastsplit relies on, in one place, with the versions it was tested on.

fastsplit steers models through handles and context managers; it never patches a transformers class.
What it does lean on is listed here, so a transformers upgrade is checked in one place:
``tests/test_hf_internals.py`` pins every entry on each supported architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

# The dependency is a lower bound (pyproject: transformers>=OLDEST_TRANSFORMERS): CI runs the whole suite on the
# newest release and the hf-dependent tests on the oldest; a release that moves an internal listed below makes
# fastsplit fall back to the full layer (correct, slower) with one warning, never a crash (hf/compat.py).
OLDEST_TRANSFORMERS = "5.0.0"
TESTED_TRANSFORMERS = ("5.0.0", "5.17.0", "5.23.0", "5.24.0", "5.25.0")
ARCHITECTURES = ("llama", "qwen2", "gemma2", "mistral", "phi3")


@dataclass(frozen=True)
class Internal:
    what: str  # the internal relied on
    used_by: str  # where, in fastsplit.hf
    why: str


INTERNALS = (
    Internal("model.model.layers: an nn.ModuleList the decoder iterates in order, each layer taking "
             "hidden_states first (positional or keyword)", "runner.decoder, from_layer, capture_layer_input",
             "skip the frozen layers below L by swapping in pass-through modules and feeding a cached input"),
    Internal("decoder layer .attention_type (Gemma-2: sliding or full)", "runner._PassThrough, kv._KeysValuesOnly",
             "stand-in layers keep the attribute the decoder reads to pick each layer's mask"),
    Internal("decoder layer .mlp.down_proj is an nn.Linear", "steer.model.Steering",
             "the paper's site: the MLP output projection becomes a SteeredLinear (restored on detach)"),
    Internal("decoder layer .post_feedforward_layernorm present only where a norm follows the MLP (Gemma-2)",
             "kv.affine_in_m", "the stream after layer L is r0 + m·d only when the update enters it by addition"),
    Internal("self_attn.{k_proj, v_proj, head_dim, layer_idx}, layer.input_layernorm, no self_attn.k_norm, and "
             "apply_rotary_pos_emb(q, k, cos, sin) in the attention's modeling module; position_embeddings and "
             "the KV cache passed to the layer as keywords", "kv.keys_values_only",
             "the prompt's last layer writes keys and values only (falls back to the full layer otherwise)"),
    Internal("the KV cache keyword of the decoder and its layers: 'cache' from 5.24, 'past_key_values' before "
             "(read from the forward signature)", "compat.cache_keyword, compat.cache_kwargs, compat.cache_from",
             "run the decoder on a cache of our own; a stand-in layer given the cache under another name runs "
             "the full layer after one warning"),
    Internal("DynamicCache(config=...), .layers slots with .is_sliding, .is_initialized, .keys and .values "
             "[rows, kv_heads, tokens, head_dim] and their own batch_repeat_interleave, update(k, v, idx), "
             "copy.deepcopy of a cache", "kv.alias_skipped, kv.repeat_rows, kv.layer_states, kv.cache_of, "
             "workflows' sweeps", "one prompt cache shared by both completions and every m; one shared-prefix "
             "cache for every pair, its m rows run by the ranks in blocks and gathered"),
    Internal("config._attn_implementation in ('sdpa', 'eager') accepts a 4-D additive mask; config.sliding_window "
             "and config.layer_types", "packing.packable", "one packed row per pair with a mask of our own"),
    Internal("AttentionInterface.register and masking_utils.AttentionMaskInterface.register (with sdpa_mask), "
             "model.set_attn_implementation(name), integrations.sdpa_attention.sdpa_attention_forward(module, query, "
             "key, value, attention_mask, dropout=, scaling=, is_causal=, **kwargs) returning ([B, Tq, H, D], None), "
             "and self_attn.num_key_value_groups", "attention.gqa_attention",
             "a sweep's masked grouped-query attention on the CPU without repeat_kv's copies (falls back to sdpa "
             "as transformers runs it)"),
    Internal("config.final_logit_softcapping (Gemma-2)", "runner.logit_softcap", "the SPLIT loss caps logits as the model does"),
    Internal("state-dict names model.layers.<L>.mlp.down_proj.{weight,bias}, peft's base_model.model.<name>.lora_A/"
             "lora_B keys with lora_bias, and config.mlp_bias (Llama-style MLP biases)", "export",
             "merged tensors and peft adapters that the real loaders read (tests/test_export.py loads each)"),
)


def describe() -> str:
    """The list above as text (for docs and bug reports)."""
    lines = [f"transformers tested: {', '.join(TESTED_TRANSFORMERS)}; architectures: {', '.join(ARCHITECTURES)}"]
    lines += [f"- {i.what}  [{i.used_by}]: {i.why}" for i in INTERNALS]
    return "\n".join(lines)
