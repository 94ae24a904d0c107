"""Tiny random Llama / Qwen2 / Gemma-2 models and a tiny BPE tokenizer with a chat template, for speed."""
import functools

import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import fastsplit

    texts = [p.prompt + " " + p.positive + " " + p.negative for p in fastsplit.demo_pairs()]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


ARCHS = ["llama", "qwen2", "gemma2"]  # every workflow test runs on these
MORE_ARCHS = ["mistral", "phi3"]  # pinned by tests/test_hf_internals.py


def tiny_model(arch: str, *, layers: int = 4, seed: int = 0, init_std: float = 0.02, config: dict | None = None):
    """A random causal LM of ``arch`` sized for unit tests (hidden 32), in fp32 and eval mode.

    ``init_std`` is the weights' standard deviation: the default 0.02 gives near-uniform attention, so a
    test whose subject is attention (a KV cache, masks, positions) should raise it to make errors show.
    ``config`` overrides config fields (e.g. ``{"sliding_window": 512}``)."""
    import transformers as tf

    vocab = len(tiny_tokenizer())
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, eos_token_id=2, bos_token_id=1, tie_word_embeddings=False,
                  initializer_range=init_std)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, head_dim=8, sliding_window=None)
        cls = tf.MistralForCausalLM
    elif arch == "phi3":
        cfg = tf.Phi3Config(**common)
        cls = tf.Phi3ForCausalLM
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**common, head_dim=8, sliding_window=8, final_logit_softcapping=30.0,
                              attn_logit_softcapping=50.0, query_pre_attn_scalar=8)
        cls = tf.Gemma2ForCausalLM
    else:
        raise ValueError(arch)
    for key, value in (config or {}).items():
        setattr(cfg, key, value)
    cfg._name_or_path = f"tiny-{arch}"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.config.name_or_path = f"tiny-{arch}"
    return model


def randomize(steering, scale=0.5, seed=1):
    """Give a freshly attached (no-op) intervention random non-zero parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in steering.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def renamed_cache_model(arch: str = "llama", **kwargs):
    """A tiny model whose decoder hands the KV cache to its layers as ``kv=``, a spelling fastsplit does not
    know (as a future transformers release might): the stand-in layers must fall back, not crash. Only this
    instance's classes change (subclasses made here), never the transformers classes."""
    from torch import nn

    from fastsplit.hf import compat

    model = tiny_model(arch, **kwargs)
    dec = model.model
    spelling = compat.cache_keyword(dec.layers[0])  # what the real layers take, in this transformers

    class Shim(nn.Module):  # what the decoder calls: renames the cache keyword to kv=
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            if hasattr(inner, "attention_type"):
                self.attention_type = inner.attention_type

        def forward(self, hidden_states, *args, **kw):
            cache = compat.cache_from(kw)
            for name in compat.CACHE_KEYWORDS:
                kw.pop(name, None)
            return self.inner(hidden_states, *args, kv=cache, **kw)

    layer_cls = type(dec.layers[0])

    class KvLayer(layer_cls):  # the real layer, taking the cache as kv=
        def forward(self, hidden_states, *args, kv=None, **kw):
            return super().forward(hidden_states, *args, **{spelling: kv}, **kw)

    class KvDecoder(type(dec)):
        @functools.wraps(type(dec).forward)  # the decoder's own signature: only its layers' spelling is unknown
        def forward(self, *args, **kw):
            layers = self.layers
            self.layers = nn.ModuleList([Shim(layer) for layer in layers])
            try:
                return super().forward(*args, **kw)
            finally:
                self.layers = layers

    for layer in dec.layers:
        layer.__class__ = KvLayer
    dec.__class__ = KvDecoder
    return model


def save_tiny(folder, arch: str = "llama") -> str:
    """A tiny random model of ``arch`` and the tiny tokenizer saved in ``folder`` (a local model folder for the CLI)."""
    tiny_model(arch).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)
