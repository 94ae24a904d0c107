"""The CLI end to end on a tiny saved model: train, generate, sweep, demo; clear one-line errors."""
import json
import os
import subprocess
import sys

import pytest

from fastsplit.cli import main
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


def test_train_generate_sweep(model_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--model", model_dir, "--data", "demo", "--layer", "1", "--epochs", "1",
                 "--batch-size", "16", "--out", out, "--quiet"]) == 0
    summary = json.load(open(os.path.join(out, "train.json")))
    assert summary["train_pairs"] == 240 and summary["test_pairs"] == 60 and len(summary["history"]) == 1
    held = os.path.join(out, "test_pairs.jsonl")
    assert summary["test_pairs_file"] == held and len(open(held).readlines()) == 60
    assert os.path.exists(os.path.join(out, "checkpoints", "checkpoint-epoch1.pt"))
    steer = os.path.join(out, "steering.safetensors")
    gen = str(tmp_path / "gen.jsonl")
    assert main(["generate", "--model", model_dir, "--steering", steer, "--prompt", "Hello", "--prompt", "Bye",
                 "--multipliers=-2,0,2", "--max-new-tokens", "4", "--out", gen, "--quiet"]) == 0
    rows = [json.loads(line) for line in open(gen)]
    assert [(r["prompt"], r["multiplier"]) for r in rows][:3] == [("Hello", -2.0), ("Hello", 0.0), ("Hello", 2.0)]
    assert len(rows) == 6
    sweep_out = str(tmp_path / "sweep")
    assert main(["sweep", "--model", model_dir, "--steering", steer, "--data", held, "--max-pairs", "6",
                 "--multipliers=" + ",".join(str(v) for v in range(-5, 6)), "--bootstrap", "5", "--out", sweep_out,
                 "--quiet"]) == 0
    fit = json.load(open(os.path.join(sweep_out, "fit.json")))
    assert {"preference", "utility", "operating_point", "scores", "bootstrap", "groups", "warnings"} <= set(fit)
    assert "split_half" not in fit and fit["scores"]["preference_r2_heldout_m"] is not None
    assert "tiny-llama" in fit["title"] and "layer 1" in fit["title"] and "test_pairs.jsonl" in fit["title"]
    for name in ("sweep.csv", "plot.png", "plot.svg"):
        assert os.path.getsize(os.path.join(sweep_out, name)) > 0


def test_seed_fixes_the_lora_initialisation(model_dir, tmp_path):
    """``--seed`` covers LoRA's randomly drawn A too: two runs with the global RNG in different states agree."""
    import torch
    from safetensors.torch import load_file

    runs = []
    for i in range(2):
        torch.manual_seed(100 + i)  # a different global RNG state before each run
        out = str(tmp_path / f"lora{i}")
        assert main(["train", "--model", model_dir, "--layer", "1", "--form", "lora", "--rank", "2", "--epochs", "1",
                     "--test-size", "0.9", "--out", out, "--quiet"]) == 0
        runs.append(load_file(os.path.join(out, "steering.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=0, atol=0, msg=k)


def test_demo_on_a_tiny_model(model_dir, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--model", model_dir, "--layer", "1", "--epochs", "1", "--test-size", "10",
                 "--max-new-tokens", "4", "--bootstrap", "3", "--out", out, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "preference fit R²" in text and "held-out m" in text and "operating point" in text
    for name in ("steering.safetensors", "sweep.csv", "fit.json", "plot.png", "plot.svg", "generations.json"):
        assert os.path.exists(os.path.join(out, name)), name


def test_errors_exit_nonzero_with_one_line(model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastsplit", "generate", "--model", model_dir, "--steering",
                        str(tmp_path / "missing.safetensors"), "--prompt", "x"], capture_output=True, text=True)
    assert r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("fastsplit generate")]
    assert err == [f"fastsplit generate: error: no steering file at {tmp_path / 'missing.safetensors'}"]
    r = subprocess.run([sys.executable, "-m", "fastsplit", "train", "--model", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 1 and "neither 'default' nor a local model folder" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fastsplit", "generate", "--multipliers", "a,b"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "comma-separated numbers" in r.stderr


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "fastsplit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("train", "generate", "sweep", "demo", "info"):
        assert cmd in r.stdout


def test_balance_answers_thins_the_training_split_only(model_dir, tmp_path):
    data = tmp_path / "yesno.jsonl"
    with open(data, "w") as f:
        for i in range(40):  # 30 " No" positives, 10 " Yes"
            yes = i % 4 == 0
            f.write(json.dumps({"question": f"Statement {i}?", "answer_matching_behavior": " Yes" if yes else " No",
                                "answer_not_matching_behavior": " No" if yes else " Yes"}) + "\n")
    out = str(tmp_path / "bal")
    assert main(["train", "--model", model_dir, "--data", str(data), "--layer", "1", "--epochs", "1",
                 "--test-size", "8", "--balance-answers", "--out", out, "--quiet"]) == 0
    summary = json.load(open(os.path.join(out, "train.json")))
    held = [json.loads(line) for line in open(os.path.join(out, "test_pairs.jsonl"))]
    assert summary["test_pairs"] == len(held) == 8  # the held-out split is not thinned
    yes_train = 10 - sum(h["answer_matching_behavior"] == " Yes" for h in held)
    assert summary["train_pairs"] == 2 * yes_train  # as many " No" as " Yes" pairs


def test_negative_layer_is_resolved_and_saved(model_dir, tmp_path, capsys):
    out = str(tmp_path / "neg")
    assert main(["train", "--model", model_dir, "--layer", "-1", "--epochs", "1", "--test-size", "0",
                 "--batch-size", "32", "--out", out, "--quiet"]) == 0
    assert "at layer 3:" in capsys.readouterr().out  # the tiny model has 4 layers
    summary = json.load(open(os.path.join(out, "train.json")))
    assert summary["layer"] == 3 and summary["test_pairs"] == 0 and summary["test_pairs_file"] is None
    assert not os.path.exists(os.path.join(out, "test_pairs.jsonl"))
    from fastsplit.hf import read_steering_metadata

    assert read_steering_metadata(os.path.join(out, "steering.safetensors"))["layer"] == "3"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastsplit", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,message", [
    (["train", "--layer", "999"], "layer must be an int in [-4, 4)"),
    (["train", "--data", "nope.jsonl"], "no pairs file at nope.jsonl"),
    (["sweep", "--steering", "nope.safetensors"], "no steering file at nope.safetensors"),
    (["sweep", "--steering", "S", "--multipliers=-4,0,4"], "--multipliers needs at least 9 distinct values"),
], ids=["layer", "data", "steering", "few-multipliers"])
def test_input_errors_come_before_the_model_loads(model_dir, tmp_path, args, message):
    """One line, exit 1, and no 'Loading weights' bar: the model was never loaded."""
    args = [a if a != "S" else str(tmp_path / "x") for a in args]
    r = _cli(*args, "--model", model_dir, "--out", str(tmp_path / "o"))
    assert r.returncode == 1, r.stderr
    assert message in r.stderr and "Loading weights" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("fastsplit ")]) == 1


@pytest.mark.parametrize("args", [["train", "--epochs", "0", "--out", "o"], ["train", "--test-size", "1.5", "--out", "o"],
                                  ["sweep", "--steering", "s", "--out", "o", "--max-util-drop", "-1"],
                                  ["generate", "--steering", "s", "--max-new-tokens", "0"]],
                         ids=["epochs", "test-size", "util-drop", "max-new-tokens"])
def test_out_of_range_options_are_usage_errors(args):
    r = _cli(*args)
    assert r.returncode == 2 and "error: argument" in r.stderr


def test_every_option_has_help_and_a_shown_default():
    for cmd in ("train", "generate", "sweep", "demo"):
        out = _cli(cmd, "--help").stdout
        assert "(default: " in out
        flat = " ".join(out.split())
        for opt in ("--model", "--quiet"):
            assert opt in flat
    assert "(default: 2.0)" in " ".join(_cli("train", "--help").stdout.split())  # θ shared with the demo
