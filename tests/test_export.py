"""Exports, each checked by its real loader against fastsplit at the same m: peft's PeftModel.from_pretrained,
transformers' from_pretrained on a merged folder, the merged tensors applied by hand, and the control vector read
back with gguf and applied the way llama.cpp applies one (direction.k added after layer k)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastsplit
from fastsplit import hf
from fastsplit.hf.export import check_export, export_steering
from tests.tiny import randomize, tiny_model, tiny_tokenizer

M = 1.7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", init_std=0.1).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


def _base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _steered(model_dir, form, tmp_path, layer=2, seed=1):
    """A tiny model with a random intervention, saved as a steering file; returns (model, steering, path)."""
    model = _base(model_dir)
    s = fastsplit.attach(model, layer, form, rank=3)
    randomize(s, scale=0.3, seed=seed)
    path = str(tmp_path / f"{form}.safetensors")
    s.save(path)
    return model, s, path


IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 64], [8, 8, 120, 33, 2, 19, 77, 1]])


def _logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def _fastsplit_logits(model, steering, m=M):
    with steering.multiplier(m):
        return _logits(model)


@pytest.mark.parametrize("form", ["lora", "vector", "local_weight"])
def test_peft_adapter_loads_and_matches(form, model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, s, path = _steered(model_dir, form, tmp_path)
    want = _fastsplit_logits(model, s)
    out = str(tmp_path / "adapter")
    written = export_steering(path, out, m=M, format="peft", model=model_dir, check_model_name=False)
    assert sorted(os.path.basename(p) for p in written) == ["adapter_config.json", "adapter_model.safetensors",
                                                           "fastsplit.json"]
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["base_model_name_or_path"] == os.path.abspath(model_dir) and "fastsplit" not in cfg
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(_base(model_dir), out).eval()
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()  # finds its base locally, no hub
    ours = [str(w.message) for w in seen if any(k in str(w.message).lower() for k in ("unexpected", "keyword",
                                                                                    "version", "hub"))]
    assert not ours, ours  # what an extra key in adapter_config.json, or a bare model name, made peft say
    torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(auto), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(_base(model_dir)), want, atol=1e-3)  # the steering really acts


@pytest.mark.parametrize("form", ["lora", "local_weight"])
def test_a_delta_bias_free_intervention_exports_a_plain_adapter_that_merges(form, model_dir, tmp_path, caplog):
    import logging

    peft = pytest.importorskip("peft")
    model = _base(model_dir)
    s = fastsplit.attach(model, 2, form, rank=3, delta_bias=False)
    randomize(s, scale=0.3)
    assert s.module.delta_bias is None and "delta_bias" not in s.state_dict()
    path = str(tmp_path / "plain.safetensors")
    s.save(path)
    again = fastsplit.load_steering(_base(model_dir), path, check_model_name=False)
    assert again.module.delta_bias is None and again.metadata()["delta_bias"] == "0"
    want = _fastsplit_logits(model, s)
    with caplog.at_level(logging.WARNING, logger="fastsplit"):
        export_steering(path, str(tmp_path / "a"), m=M, format="peft", model=model_dir, check_model_name=False)
    assert not caplog.records  # no bias: nothing to warn about
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["lora_bias"] is False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        adapter = peft.PeftModel.from_pretrained(_base(model_dir), str(tmp_path / "a"))
    assert not [w for w in seen if "lora" in str(w.message).lower()], [str(w.message) for w in seen]
    merged = adapter.merge_and_unload().eval()
    torch.testing.assert_close(_logits(merged), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing to train"):
        fastsplit.attach(model, 1, "vector", delta_bias=False)


def test_a_bias_adapter_warns_and_does_not_merge_into_a_bias_free_base(model_dir, tmp_path, caplog):
    """What the README says merges: peft's merge_and_unload of a lora_bias adapter needs a base down_proj with a bias,
    which Llama has not (the adapter itself loads and runs exactly: the test above)."""
    import logging

    peft = pytest.importorskip("peft")
    _, _, path = _steered(model_dir, "lora", tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastsplit"):
        export_steering(path, str(tmp_path / "a"), m=M, format="peft", model=model_dir, check_model_name=False)
    assert len(caplog.records) == 1 and "vLLM does not load adapters with a bias" in caplog.records[0].getMessage()
    with pytest.raises(Exception):
        peft.PeftModel.from_pretrained(_base(model_dir), str(tmp_path / "a")).merge_and_unload()


@pytest.mark.parametrize("form", ["local_weight", "lora", "vector"])
def test_merged_folder_loads_and_matches(form, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, s, path = _steered(model_dir, form, tmp_path)
    want = _fastsplit_logits(model, s)
    out = str(tmp_path / "merged")
    export_steering(path, out, m=M, format="merged", model=model_dir, full=True, check_model_name=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded), want, atol=1e-5, rtol=1e-5)
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    assert hf.decoder_layers(model)[2].mlp.down_proj is s.module  # the user's model is left as it was
    # From Python, on the loaded model: the folder is as self-contained (tokenizer included), and every bias its
    # config declares is in the checkpoint (vLLM leaves a missing one uninitialised)
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    s.export(str(tmp_path / "api"), m=M, format="merged", full=True)
    AutoTokenizer.from_pretrained(str(tmp_path / "api"))
    cfg = json.load(open(tmp_path / "api" / "config.json"))
    names = set(load_file(str(tmp_path / "api" / "model.safetensors")))
    if cfg.get("mlp_bias"):
        for k in range(cfg["num_hidden_layers"]):
            for lin in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{k}.mlp.{lin}.bias" in names


def test_merged_tensors_alone(model_dir, tmp_path):
    from safetensors.torch import load_file

    model, s, path = _steered(model_dir, "local_weight", tmp_path)
    want = _fastsplit_logits(model, s)
    out = str(tmp_path / "merged.safetensors")
    export_steering(path, out, m=M, format="merged", model=model_dir, check_model_name=False)
    t = load_file(out)
    assert set(t) == {"model.layers.2.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.bias"}
    base = _base(model_dir)
    old = hf.decoder_layers(base)[2].mlp.down_proj
    torch.testing.assert_close(t["model.layers.2.mlp.down_proj.weight"],
                               old.weight + M * s.module.delta_weight.detach(), atol=1e-6, rtol=1e-6)
    new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    new.load_state_dict({"weight": t["model.layers.2.mlp.down_proj.weight"],
                         "bias": t["model.layers.2.mlp.down_proj.bias"]})
    hf.decoder_layers(base)[2].mlp.down_proj = new
    torch.testing.assert_close(_logits(base), want, atol=1e-5, rtol=1e-5)


def test_control_vector_reads_back_and_acts_as_llama_cpp_applies_it(model_dir, tmp_path):
    import gguf

    model, s, path = _steered(model_dir, "vector", tmp_path, layer=2)
    want = _fastsplit_logits(model, s)
    out = str(tmp_path / "cv.gguf")
    s.export(out, m=M, format="control-vector")
    reader = gguf.GGUFReader(out)
    fields = {f.name: f for f in reader.fields.values()}
    field_value = lambda name: fields[name].parts[fields[name].data[0]]
    assert bytes(field_value("general.architecture")).decode() == "controlvector"
    assert bytes(field_value("controlvector.model_hint")).decode() == "llama"
    assert int(field_value("controlvector.layer_count")[0]) == 4
    tensors = {t.name: torch.tensor(t.data.copy()) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.3"]
    torch.testing.assert_close(tensors["direction.2"], M * s.module.delta_bias.detach(), atol=1e-6, rtol=1e-6)
    assert not tensors["direction.1"].any() and not tensors["direction.3"].any()
    # llama.cpp adds direction.k to the residual stream after (0-based) layer k: do that on the plain model.
    base = _base(model_dir)
    hooks = [hf.decoder_layers(base)[k].register_forward_hook(
        lambda mod, args, out, v=v: out + v) for k, v in ((int(n.split(".")[1]), t) for n, t in tensors.items())]
    try:
        torch.testing.assert_close(_logits(base), want, atol=1e-5, rtol=1e-5)
    finally:
        for h in hooks:
            h.remove()


CONFIG = {"llama": tiny_model("llama").config, "gemma2": tiny_model("gemma2").config}


@pytest.mark.parametrize("meta,fmt,arch,message", [
    (dict(form="lora", layer="2", site="down_proj"), "control-vector", "llama", "depends on the input"),
    (dict(form="vector", layer="2", site="down_proj"), "control-vector", "gemma2", "a norm follows the MLP"),
    (dict(form="vector", layer="0", site="down_proj"), "control-vector", "llama", "there is no direction.0"),
    (dict(form="vector", layer="2", site="residual"), "peft", "llama", "a residual-site steering has none"),
    (dict(form="vector", layer="2", site="residual"), "merged", "llama", "a residual-site steering has none"),
    (dict(form="vector", layer="2", site="down_proj"), "onnx", "llama", "format must be one of"),
], ids=["lora-cv", "gemma2-cv", "layer0-cv", "residual-peft", "residual-merged", "unknown-format"])
def test_formats_refuse_what_they_cannot_hold(meta, fmt, arch, message):
    with pytest.raises(ValueError, match=message):
        check_export(meta, CONFIG[arch], fmt, m=1.0)
    check_export(dict(form="vector", layer="2", site="residual"), CONFIG["gemma2"], "control-vector", m=1.0)  # fine
    with pytest.raises(ValueError, match="m must be a finite number"):
        check_export(dict(form="vector", layer="2", site="down_proj"), CONFIG["llama"], "peft", m=float("nan"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastsplit", "export", *args], capture_output=True, text=True)


def _fit(tmp_path, steering: str | None, name="fit.json"):
    from fastsplit.hf.export import file_sha256

    prov = {"steering": {"path": steering, "sha256": file_sha256(steering)}} if steering else None
    fit = tmp_path / name
    fit.write_text(json.dumps({"operating_point": {"multiplier": 2.5}, "provenance": prov,
                               "warnings": ["the operating point is at the edge of the swept range"]}))
    return fit


def test_cli_export_at_the_operating_point(model_dir, tmp_path):
    _, s, path = _steered(model_dir, "vector", tmp_path)
    out = tmp_path / "sub" / "cv.gguf"
    r = _cli("--steering", path, "--m", "op", "--fit", str(_fit(tmp_path, path)), "--format", "control-vector",
             "--out", str(out), "--model", model_dir, "--any-model")
    assert r.returncode == 0, r.stderr
    assert "m = 2.5" in r.stdout and "--control-vector" in r.stdout and out.exists()
    assert "warning (from" in r.stdout and "at the edge of the swept range" in r.stdout  # the sweep's own words
    # a fit of another intervention, or one that does not say which, is refused in one line
    _, _, lora = _steered(model_dir, "lora", tmp_path)
    for fit, words in ((_fit(tmp_path, lora, "other.json"), "was swept with another steering file"),
                       (_fit(tmp_path, None, "old.json"), "does not record which steering file")):
        r = _cli("--steering", path, "--m", "op", "--fit", str(fit), "--format", "control-vector", "--out",
                 str(tmp_path / "x.gguf"), "--model", model_dir, "--any-model")
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr  # a usage error
        assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("case", ["missing", "corrupt", "lora-as-cv", "m-word", "op-without-fit", "unwritable",
                                  "full-not-merged"])
def test_bad_export_input_is_one_line_before_any_model_loads(case, model_dir, tmp_path):
    _, _, vector = _steered(model_dir, "vector", tmp_path)
    _, _, lora = _steered(model_dir, "lora", tmp_path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(open(vector, "rb").read()[:-40])
    args = {"missing": ["--steering", str(tmp_path / "nope.safetensors"), "--m", "1", "--format", "peft"],
            "corrupt": ["--steering", str(corrupt), "--m", "1", "--format", "peft"],
            "lora-as-cv": ["--steering", lora, "--m", "1", "--format", "control-vector"],
            "m-word": ["--steering", vector, "--m", "lots", "--format", "peft"],
            "op-without-fit": ["--steering", vector, "--m", "op", "--format", "peft"],
            "unwritable": ["--steering", vector, "--m", "1", "--format", "merged"],
            "full-not-merged": ["--steering", vector, "--m", "1", "--format", "peft", "--full"]}[case]
    out = "/proc/fastsplit-x/out.safetensors" if case == "unwritable" else str(tmp_path / "out")
    r = _cli(*args, "--out", out, "--model", model_dir, "--any-model")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr  # every one a usage error, refused before any work
    assert len(lines) == 1 and lines[0].startswith("fastsplit export: error:"), r.stderr
    assert "Loading weights" not in r.stderr and not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # nothing half-written


ARCH_CONFIGS = {arch: tiny_model(arch).config for arch in ("llama", "qwen2", "gemma2", "mistral", "phi3")}


@pytest.mark.parametrize("arch", sorted(ARCH_CONFIGS))
def test_every_refusal_names_a_route_that_works(arch):
    """Over (architecture, form, site, Δb, layer, format): a refused export names the exports that do hold the
    steering, each of which check_export then accepts (no hint leads in a circle), or, where none does, the site to
    retrain at, where one does."""
    from fastsplit.hf.export import export_routes

    config = ARCH_CONFIGS[arch]
    cases = [("control-vector", False), ("peft", False), ("merged", False), ("merged", True)]
    seen_refusals = 0
    for form in ("vector", "lora", "local_weight"):
        for site in ("down_proj", "residual"):
            for delta_bias in ("1", "0") if form != "vector" else ("1",):
                for layer in ("0", "2"):
                    meta = dict(form=form, layer=layer, site=site, delta_bias=delta_bias)
                    routes = export_routes(meta, config)
                    for fmt, full in cases:
                        name = fmt + (" --full" if full else "")
                        try:
                            check_export(meta, config, fmt, m=1.0, full=full)
                        except ValueError as exc:
                            seen_refusals += 1
                            assert name not in routes and "\n" not in str(exc)
                            if routes:
                                assert f"this steering exports as {', '.join(routes)}" in str(exc)
                                for route in routes:  # every route named holds the steering
                                    check_export(meta, config, route.split()[0], m=1.0, full=route.endswith("--full"))
                            else:
                                other = "residual" if site == "down_proj" else "down_proj"
                                assert f"retrain it with --site {other}" in str(exc)
                                assert export_routes(meta | {"site": other}, config)
                        else:
                            assert name in routes
    assert seen_refusals > 0


def test_a_vector_at_down_proj_under_a_post_mlp_norm_is_not_sent_in_a_circle():
    """The case a user met: Gemma-2, a vector at down_proj (it has a Δb), no MLP bias option. A control vector is
    refused and so is a full merged folder; both name peft and the merged tensors, which work."""
    from fastsplit.hf.export import export_routes

    meta = dict(form="vector", layer="2", site="down_proj")
    config = ARCH_CONFIGS["gemma2"]
    assert not hasattr(config, "mlp_bias")
    assert export_routes(meta, config) == ["peft", "merged"]
    for fmt, full in (("control-vector", False), ("merged", True)):
        with pytest.raises(ValueError, match="this steering exports as peft, merged\\)"):
            check_export(meta, config, fmt, m=1.0, full=full)
