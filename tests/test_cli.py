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
    assert os.path.exists(os.path.join(out, "checkpoints", "checkpoint-epoch1.pt"))
    steer = os.path.join(out, "steering.safetensors")
    gen = str(tmp_path / "gen.jsonl")
    assert main(["generate", "--model", model_dir, "--steering", steer, "--prompt", "Hello", "--prompt", "Bye",
                 "--multipliers=-2,0,2", "--max-new-tokens", "4", "--out", gen, "--quiet"]) == 0
    rows = [json.loads(line) for line in open(gen)]
    assert [(r["prompt"], r["multiplier"]) for r in rows][:3] == [("Hello", -2.0), ("Hello", 0.0), ("Hello", 2.0)]
    assert len(rows) == 6
    sweep_out = str(tmp_path / "sweep")
    assert main(["sweep", "--model", model_dir, "--steering", steer, "--data", "demo", "--max-pairs", "6",
                 "--multipliers=" + ",".join(str(v) for v in range(-5, 6)), "--out", sweep_out, "--quiet"]) == 0
    fit = json.load(open(os.path.join(sweep_out, "fit.json")))
    assert {"preference", "utility", "operating_point", "split_half"} <= set(fit)
    for name in ("sweep.csv", "plot.png", "plot.svg"):
        assert os.path.getsize(os.path.join(sweep_out, name)) > 0


def test_demo_on_a_tiny_model(model_dir, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--model", model_dir, "--layer", "1", "--epochs", "1", "--test-pairs", "10",
                 "--max-new-tokens", "4", "--out", out, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "preference fit R²" in text and "operating point" in text
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
