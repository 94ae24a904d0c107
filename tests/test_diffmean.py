"""Difference-of-means vectors (fastsplit.diffmean, `fastsplit train --method diffmean`): the vector against a
reference written out here (forward hooks on the model, masked means in float64), both sites, both sources; the saved
file works like any vector steering file; every bad input refused in one line."""
import json
import os

import pytest
import torch

import fastsplit
from fastsplit.cli import main
from fastsplit.data import Pair, encode_pair
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer

PAIRS = [Pair("How is the weather?", " Lovely and bright.", " Grim."), Pair("Your week?", " Great!", " Awful, sadly."),
         Pair("The future?", " It looks wonderful to me.", " Dark.")]
TEXTS_POS = ["What a wonderful day it is.", "Everything will work out fine.", "Joy."]
TEXTS_NEG = ["It rained again and the bus was late", "Nothing works."]


def _hooked(model, layer, site, ids):
    """The site's output for one unpadded text [T, H], from a forward hook on the full model."""
    block = model.model.layers[layer]
    target = block if site == "residual" else block.mlp.down_proj
    seen = {}
    handle = target.register_forward_hook(lambda mod, args, out: seen.update(h=out[0] if isinstance(out, tuple)
                                                                            else out))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["h"][0].double()


@pytest.mark.parametrize("site", ["residual", "down_proj"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pairs_vector_equals_the_hooked_means(arch, site):
    model, tok = tiny_model(arch), tiny_tokenizer()
    s = fastsplit.diffmean(model, tok, PAIRS, layer=2, site=site, batch_size=2)  # batches pad: the mask must hold
    try:
        sides = [[], []]
        for pair in PAIRS:
            p, a, b = encode_pair(tok, pair)
            for side, comp in enumerate((a, b)):
                sides[side].append(_hooked(model, 2, site, p + comp)[len(p):].mean(0))
        want = torch.stack(sides[0]).mean(0) - torch.stack(sides[1]).mean(0)
        got = s.module.delta_bias.detach().double()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert s.form == "vector" and s.site == site and s.layer == 2 and s.objective == "diffmean"
        assert float(s.notes["diffmean_norm"]) == pytest.approx(float(want.norm()), rel=1e-4)
    finally:
        s.detach()


def test_texts_vector_and_normalisation(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    s = fastsplit.diffmean(model, tok, layer=-1, positive_texts=TEXTS_POS, negative_texts=TEXTS_NEG, normalize=True,
                           max_tokens=5)
    try:
        mean = lambda texts: torch.stack([_hooked(model, 3, "residual", tok(t)["input_ids"][:5]).mean(0)
                                          for t in texts]).mean(0)
        want = mean(TEXTS_POS) - mean(TEXTS_NEG)
        got = s.module.delta_bias.detach().double()
        torch.testing.assert_close(got, want / want.norm(), atol=1e-5, rtol=1e-4)
        assert s.layer == 3 and float(s.notes["diffmean_norm"]) == pytest.approx(float(want.norm()), rel=1e-4)
        path = str(tmp_path / "dm.safetensors")
        s.save(path)
    finally:
        s.detach()
    meta = fastsplit.hf.read_steering_metadata(path)
    assert meta["objective"] == "diffmean" and meta["diffmean_normalized"] == "1" and meta["form"] == "vector"
    loaded = fastsplit.load_steering(model, path, check_model_name=False)  # an ordinary vector steering file
    try:
        torch.testing.assert_close(loaded.module.delta_bias.detach().double(), want / want.norm(), atol=1e-5,
                                   rtol=1e-4)
    finally:
        loaded.detach()


@pytest.mark.parametrize("kwargs,message", [
    (dict(pairs=[]), "pairs is empty"),
    (dict(positive_texts=TEXTS_POS), "must both hold at least one text"),
    (dict(positive_texts=TEXTS_POS, negative_texts=[]), "must both hold at least one text"),
    (dict(pairs=PAIRS, positive_texts=TEXTS_POS, negative_texts=TEXTS_NEG), "not both"),
    (dict(positive_texts=TEXTS_POS, negative_texts=["fine", ""]), r"negative_texts\[1\] tokenises to nothing"),
    (dict(pairs=PAIRS, site="mlp"), "site must be one of"),
    (dict(pairs=PAIRS, max_tokens=0), "max_tokens must be a positive int"),
    (dict(pairs=PAIRS, layer=9), "layer must be an int in"),
], ids=["no-pairs", "one-side", "empty-side", "both-sources", "empty-text", "site", "max-tokens", "layer"])
def test_bad_input_is_one_line(kwargs, message):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kwargs = {"layer": 1} | kwargs
    with pytest.raises(ValueError, match=message) as e:
        fastsplit.diffmean(model, tok, kwargs.pop("pairs", None), **kwargs)
    assert "\n" not in str(e.value)
    assert not any(type(m).__name__ == "SteeredLinear" for m in model.modules())  # nothing left attached


def test_a_zero_difference_cannot_be_normalised():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="difference of means is zero"):
        fastsplit.diffmean(model, tok, layer=1, positive_texts=["same text"], negative_texts=["same text"],
                           normalize=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


def test_cli_diffmean_then_sweep(model_dir, tmp_path, capsys):
    out = str(tmp_path / "dm")
    assert main(["train", "--method", "diffmean", "--model", model_dir, "--data", "demo", "--layer", "1",
                 "--site", "residual", "--max-pairs", "40", "--out", out, "--quiet"]) == 0
    summary = json.load(open(os.path.join(out, "train.json")))
    assert summary["method"] == "diffmean" and summary["source"] == "pairs" and summary["norm"] > 0
    assert summary["train_pairs"] == 32 and summary["test_pairs"] == 8
    assert "difference of means at layer 1" in capsys.readouterr().out
    assert main(["sweep", "--model", model_dir, "--steering", os.path.join(out, "steering.safetensors"),
                 "--multipliers=" + ",".join(str(v) for v in range(-5, 6)), "--bootstrap", "0", "--out",
                 str(tmp_path / "sweep"), "--quiet"]) == 0  # its own held-out split, as for any trained file
    assert os.path.getsize(tmp_path / "sweep" / "sweep.csv") > 0
    # beside a SPLIT vector swept on the same held-out pairs, in `fastsplit compare`
    assert main(["train", "--model", model_dir, "--data", "demo", "--layer", "1", "--site", "residual",
                 "--max-pairs", "40", "--epochs", "1", "--out", str(tmp_path / "split"), "--quiet"]) == 0
    assert main(["sweep", "--model", model_dir, "--steering", str(tmp_path / "split" / "steering.safetensors"),
                 "--multipliers=" + ",".join(str(v) for v in range(-5, 6)), "--bootstrap", "0", "--out",
                 str(tmp_path / "sweep-split"), "--quiet"]) == 0
    assert main(["compare", str(tmp_path / "sweep"), str(tmp_path / "sweep-split"), "--out", str(tmp_path / "cmp"),
                 "--bootstrap", "20"]) == 0
    labels = [r["label"] for r in json.load(open(tmp_path / "cmp" / "compare.json"))["interventions"]]
    assert labels == ["vector L1 diffmean", "vector L1 split"], labels
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(TEXTS_POS) + "\n")
    neg.write_text("\n\n".join(TEXTS_NEG))
    assert main(["train", "--method", "diffmean", "--model", model_dir, "--layer", "1", "--positive-texts", str(pos),
                 "--negative-texts", str(neg), "--normalize", "--out", str(tmp_path / "dm2"), "--quiet"]) == 0
    meta = fastsplit.hf.read_steering_metadata(str(tmp_path / "dm2" / "steering.safetensors"))
    assert meta["diffmean_source"] == "texts" and meta["diffmean_normalized"] == "1"


@pytest.mark.parametrize("args,message", [
    (["--form", "lora"], "--method diffmean makes a vector"),
    (["--positive-texts", "P"], "--positive-texts and --negative-texts go together"),
    (["--positive-texts", "P", "--negative-texts", "missing.txt"], "--negative-texts: no file at missing.txt"),
    (["--positive-texts", "P", "--negative-texts", "E"], "holds no text"),
], ids=["form", "one-file", "missing-file", "empty-file"])
def test_cli_bad_input_before_the_model_loads(model_dir, tmp_path, capsys, args, message):
    (tmp_path / "p.txt").write_text("a text\n")
    (tmp_path / "e.txt").write_text("\n\n")
    args = [{"P": str(tmp_path / "p.txt"), "E": str(tmp_path / "e.txt")}.get(a, a) for a in args]
    assert main(["train", "--method", "diffmean", "--model", model_dir, "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Loading weights" not in err


def test_cli_diffmean_options_need_the_method(model_dir, tmp_path, capsys):
    assert main(["train", "--model", model_dir, "--normalize", "--out", str(tmp_path / "o")]) == 2
    assert "go with --method diffmean" in capsys.readouterr().err
