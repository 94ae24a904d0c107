"""generate_sweep: every (prompt, m) in shared batches equals sequential greedy decoding."""
import pytest
import torch

import fastsplit
from fastsplit.data import chat_prompt_ids
from tests.tiny import randomize, tiny_model, tiny_tokenizer

PROMPTS = ["How is your week?", "Tell me about the future of my career and the economy.", "Hi"]
MS = [-4.0, -1.0, 0.0, 2.5, 6.0]


@pytest.mark.parametrize("arch,form", [("llama", "vector"), ("qwen2", "lora"), ("gemma2", "local_weight")])
def test_sweep_equals_sequential_greedy(arch, form):
    model, tok = tiny_model(arch), tiny_tokenizer()
    s = fastsplit.attach(model, 1, form, rank=2)
    randomize(s, scale=1.0)
    out = fastsplit.generate_sweep(model, tok, s, PROMPTS, MS, max_new_tokens=8, batch_size=6, progress=False)
    assert len(out) == len(PROMPTS) and all(len(r) == len(MS) for r in out)
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([chat_prompt_ids(tok, p)])
        for j, m in enumerate(MS):
            with torch.no_grad(), s.multiplier(m):
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            assert out[i][j] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), (p, m)
    assert len({out[1][j] for j in range(len(MS))}) > 1  # the strengths really differ


def test_bad_arguments():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = fastsplit.attach(model, 1, "vector")
    with pytest.raises(ValueError, match="multipliers needs at least 1 value"):
        fastsplit.generate_sweep(model, tok, s, ["x"], [])
    with pytest.raises(ValueError, match="finite"):
        fastsplit.generate_sweep(model, tok, s, ["x"], [float("inf")])
    with pytest.raises(ValueError, match="prompts is empty"):
        fastsplit.generate_sweep(model, tok, s, [], [1.0])
