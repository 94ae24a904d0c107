"""The CLI end to end on a tiny saved model: train, generate, sweep, demo; clear one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastsplit.cli import main
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


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
    assert main(["demo", "--model", model_dir, "--layer", "1", "--quick", "--out", out, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "preference fit R²" in text and "held-out m" in text and "operating point" in text
    for name in ("steering.safetensors", "test_pairs.jsonl", "sweep.csv", "fit.json", "plot.png", "plot.svg",
                 "generations.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert len(open(os.path.join(out, "test_pairs.jsonl")).readlines()) == 8  # the held-out split, re-sweepable
    gens = json.load(open(os.path.join(out, "generations.json")))
    assert [g["multiplier"] for g in gens[0]["generations"]][0] == 0.0 and set(gens[0]) == {"prompt", "generations"}
    command = next(line for line in text.splitlines() if line.startswith("re-sweep the held-out pairs: "))
    argv = command.split(": ", 1)[1].split()[1:] + ["--bootstrap", "0", "--quiet"]
    assert argv[0] == "sweep" and f"--model" in argv and os.path.join(out, "test_pairs.jsonl") in argv
    assert main(argv) == 0  # the printed command re-sweeps exactly the held-out split
    resweep = json.load(open(os.path.join(out, "resweep", "fit.json")))
    assert resweep["pairs"] == 8 and resweep["multipliers"] == json.load(open(os.path.join(out, "fit.json")))["multipliers"]
    # --resume: the checkpoint of the finished epoch is found; training does not run again.
    before = os.path.getmtime(os.path.join(out, "checkpoints", "checkpoint-epoch1.pt"))
    assert main(["demo", "--model", model_dir, "--layer", "1", "--quick", "--out", out, "--quiet", "--resume"]) == 0
    assert os.path.getmtime(os.path.join(out, "checkpoints", "checkpoint-epoch1.pt")) == before


def test_errors_exit_nonzero_with_one_line(model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastsplit", "generate", "--model", model_dir, "--steering",
                        str(tmp_path / "missing.safetensors"), "--prompt", "x"], capture_output=True, text=True)
    assert r.returncode == 2  # a usage error: refused before any work
    err = [line for line in r.stderr.splitlines() if line.startswith("fastsplit generate")]
    assert err == [f"fastsplit generate: error: no steering file at {tmp_path / 'missing.safetensors'}"]
    r = subprocess.run([sys.executable, "-m", "fastsplit", "train", "--model", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "neither 'default' nor a local model folder" in r.stderr
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
    (["sweep", "--steering", "S", "--multipliers=-4,0,4"], "--multipliers needs at least 10 distinct values"),
], ids=["layer", "data", "steering", "few-multipliers"])
def test_input_errors_come_before_the_model_loads(model_dir, tmp_path, args, message):
    """One line, exit 2 (a usage error), and no 'Loading weights' bar: the model was never loaded."""
    args = [a if a != "S" else str(tmp_path / "x") for a in args]
    r = _cli(*args, "--model", model_dir, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
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


@pytest.fixture(scope="module")
def steering_file(model_dir, tmp_path_factory):
    """A steering file of the tiny model, beside a held-out split as train writes it."""
    return _steering_file(model_dir, tmp_path_factory.mktemp("run"))


def _steering_file(model_dir, folder):
    import fastsplit
    from tests.tiny import randomize, tiny_model

    model = tiny_model("llama")
    model.config.name_or_path = model_dir
    s = fastsplit.attach(model, 1, "vector")
    randomize(s, scale=2.0)
    s.save(str(folder / "steering.safetensors"))
    from fastsplit.cli._common import write_pairs

    write_pairs(fastsplit.demo_pairs()[:5], str(folder / "test_pairs.jsonl"))
    return str(folder / "steering.safetensors")


@pytest.fixture(scope="module")
def unloadable_model_dir(model_dir, tmp_path_factory):
    """The tiny model's config and tokenizer with garbage for weights: a command that loads the model fails on them.

    So a check that fails with its own message on this folder provably ran before the model loaded, on any host
    speed (a wall-clock bound would measure the host, not the order).
    """
    import shutil

    d = tmp_path_factory.mktemp("unloadable")
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(model_dir, name), d / name)
    (d / "model.safetensors").write_bytes(b"\xff" * 4096)
    return str(d)


@pytest.fixture(scope="module")
def unloadable_steering_file(unloadable_model_dir, tmp_path_factory):
    """A steering file saved under the unloadable model's name, so the name check passes it."""
    return _steering_file(unloadable_model_dir, tmp_path_factory.mktemp("run-unloadable"))


def test_unreadable_weights_fail_in_one_line(unloadable_model_dir, tmp_path):
    """Loading the unloadable model fails, naming the folder (and so the tests that use it can fail too)."""
    r = _cli("train", "--model", unloadable_model_dir, "--layer", "1", "--out", str(tmp_path / "o"))
    line = _one_line_failure(r, code=1)  # a runtime failure: the work (loading) had begun
    assert line.startswith(f"fastsplit train: error: model {unloadable_model_dir!r}: its weights cannot be read ("), line


def _one_line_failure(r, code=2):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, r.stderr
    assert len(lines) == 1, r.stderr  # the one line, no usage text, no traceback
    assert "Loading weights" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["train", "demo", "sweep", "generate"])
def test_unwritable_output_fails_first_in_one_line(command, unloadable_model_dir, unloadable_steering_file,
                                                  tmp_path):
    """An output that cannot be written is found before the model loads (its weights are garbage), leaving nothing."""
    steering_file = unloadable_steering_file
    bad = "/proc/fastsplit-test/out" if command != "generate" else "/proc/fastsplit-test/g.jsonl"
    extra = {"train": ["--layer", "1"], "demo": ["--layer", "1"], "sweep": ["--steering", steering_file],
             "generate": ["--steering", steering_file, "--prompt", "hi"]}[command]
    r = _cli(command, "--model", unloadable_model_dir, *extra, "--out", bad)
    line = _one_line_failure(r)  # a usage error (exit 2): the output named cannot be written
    assert line.startswith(f"fastsplit {command}: error: --out {bad} cannot be written"), line
    assert not os.path.exists("/proc/fastsplit-test")


def test_output_check_leaves_no_folder_behind(model_dir, tmp_path):
    out = tmp_path / "new" / "deeper" / "run"
    r = _cli("train", "--model", model_dir, "--data", str(tmp_path / "missing.jsonl"), "--out", str(out))
    _one_line_failure(r)
    assert not (tmp_path / "new").exists()
    from fastsplit.cli._common import writable_dir

    writable_dir(str(out))  # a writable path passes, and the check itself leaves nothing
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        writable_dir(str(tmp_path / "file"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a CPU-only torch build")
@pytest.mark.parametrize("command", ["train", "sweep", "generate", "demo"])
def test_missing_cuda_device_fails_first_in_one_line(command, unloadable_model_dir, unloadable_steering_file,
                                                    tmp_path):
    """A missing device is found before the model loads (its weights are garbage), in one line, leaving nothing."""
    model_dir, steering_file = unloadable_model_dir, unloadable_steering_file
    extra = {"train": ["--layer", "1", "--out", str(tmp_path / "o")], "demo": ["--layer", "1", "--out", str(tmp_path / "o")],
             "sweep": ["--steering", steering_file, "--out", str(tmp_path / "o")],
             "generate": ["--steering", steering_file, "--prompt", "hi"]}[command]
    line = _one_line_failure(_cli(command, "--model", model_dir, *extra, "--device", "cuda"))
    assert "--device cuda: no CUDA device is available" in line, line
    assert not (tmp_path / "o").exists()
    assert "not a device" in _one_line_failure(_cli(command, "--model", model_dir, *extra, "--device", "tpu:x"))


@pytest.mark.parametrize("args", [["train", "--epochs", "0", "--out", "o"], ["sweep", "--multipliers", "a", "--steering",
                                                                            "s", "--out", "o"],
                                  ["generate", "--steering", "s", "--nope"], ["demo", "--test-size", "x"]],
                         ids=["train", "sweep", "generate", "demo"])
def test_usage_errors_are_one_line(args):
    line = _one_line_failure(_cli(*args), code=2)
    assert line.startswith(f"fastsplit {args[0]}: error:")


def test_a_missing_required_argument_shows_the_usage():
    r = _cli("train")
    assert r.returncode == 2 and r.stderr.startswith("usage: fastsplit train")
    assert "the following arguments are required: --out" in r.stderr


def test_help_shows_defaults_as_typed():
    flat = {cmd: " ".join(_cli(cmd, "--help").stdout.split()) for cmd in ("train", "generate", "sweep", "demo")}
    assert "(default: add,sub;" in flat["train"] and "['add', 'sub']" not in flat["train"]
    assert "(default: -4,-2,0,2,4)" in flat["generate"]
    assert "(default: stdout) (default: None)" not in flat["generate"] and "(default: None)" not in flat["sweep"]
    assert "--steering STEERING [STEERING ...] one or more" in flat["sweep"]  # required: no default shown
    for text in flat.values():
        assert "(default: None)" not in text and "(default: False)" not in text


def test_sweep_without_data_takes_the_runs_held_out_split(model_dir, steering_file, tmp_path, capsys):
    out = str(tmp_path / "sw")
    assert main(["sweep", "--model", model_dir, "--steering", steering_file, "--bootstrap", "0", "--out", out,
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    held = os.path.join(os.path.dirname(steering_file), "test_pairs.jsonl")
    assert f"sweeping the held-out pairs of {steering_file}'s run: {held}" in text
    fit = json.load(open(os.path.join(out, "fit.json")))
    assert fit["pairs"] == 5 and "5 held-out pairs of test_pairs.jsonl" in fit["title"]
    assert {"identifiability", "max_util_drop"} <= set(fit)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(open(steering_file, "rb").read())
    assert main(["sweep", "--model", model_dir, "--steering", str(lone), "--bootstrap", "0", "--max-pairs", "4",
                 "--out", str(tmp_path / "sw2"), "--quiet"]) == 0
    assert "sweeping the built-in demo pairs (no test_pairs.jsonl beside" in capsys.readouterr().out


def test_generate_makes_the_output_folder(model_dir, steering_file, tmp_path):
    out = tmp_path / "nodir" / "g.jsonl"
    assert main(["generate", "--model", model_dir, "--steering", steering_file, "--prompt", "hi",
                 "--multipliers=0,1", "--max-new-tokens", "2", "--out", str(out), "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_tune_writes_the_table_and_the_cache(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTSPLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTSPLIT_TUNE", raising=False)
    out = str(tmp_path / "tune.json")
    assert main(["tune", "--model", model_dir, "--rows", "2,40", "--forms", "local_weight,lora", "--loss-rows", "48",
                 "--json", out, "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "x eager" in table and "x F.linear" in table and "its 2 GEMMs" in table
    res = json.load(open(out))["results"]
    assert [(r["op"], r["form"], r["mkind"], r["rows"]) for r in res][:2] == [
        ("steered_linear", "local_weight", "scalar", 2), ("steered_linear", "local_weight", "scalar", 40)]
    folded = res[0]
    assert set(folded["times_ms"]) == {"torch:fold", "torch:two_gemm"} and folded["choice"] in folded["times_ms"]
    assert folded["eager_ms"] > 0 and folded["linear_ms"] > 0
    assert res[-1]["op"] == "split_loss" and res[-1]["choice"].startswith(("torch:", "native:"))
    info = subprocess.run([sys.executable, "-m", "fastsplit", "info"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "FASTSPLIT_CACHE": str(tmp_path / "cache"),
                               # the CPU's cache is per thread count (an xdist worker runs on its share of cores)
                               "OMP_NUM_THREADS": str(torch.get_num_threads())})
    cache = json.loads(info.stdout)["tuning_cache"]
    assert cache["exists"] and any(k.startswith("steered_linear|local_weight|scalar") for k in cache["entries"])
    monkeypatch.setenv("FASTSPLIT_TUNE", "0")
    assert main(["tune", "--model", model_dir, "--rows", "2", "--no-loss", "--quiet"]) == 1
    assert "tuning is off (FASTSPLIT_TUNE=0)" in capsys.readouterr().err


@pytest.mark.parametrize("args,says", [
    (["train", "--layer", "99", "--out", "O"], "layer must be an int"),
    (["train", "--method", "diffmean", "--form", "lora", "--out", "O"], "--method diffmean makes a vector"),
    (["sweep", "--steering", "S", "--multipliers=-2,-1,0,1,2", "--out", "O"], "at least 10 distinct values"),
    (["sweep", "--steering", "MISSING", "--out", "O"], "no steering file"),
    (["generate", "--steering", "S", "--prompts", "MISSING"], "no prompts file"),
    (["compare", "MISSING", "MISSING", "--out", "O"], "is not a sweep folder"),
    (["export", "--steering", "S", "--m", "2", "--format", "control-vector", "--full", "--out", "O"], "--full"),
    (["export", "--steering", "S", "--m", "op", "--format", "peft", "--out", "O"], "--m op"),
    (["tune", "--json", "/proc/fastsplit-test/t.json"], "cannot be written"),
    (["demo", "--layer", "1", "--test-size", "0", "--out", "O"], "--test-size must be above 0"),
    (["info", "--nope"], "unrecognized arguments"),
], ids=["train-layer", "train-method", "sweep-multipliers", "sweep-steering", "generate-prompts", "compare-folders",
        "export-full", "export-op", "tune-json", "demo-test-size", "info-argument"])
def test_every_commands_usage_errors_exit_2(model_dir, steering_file, tmp_path, args, says):
    """Every command's refusals of its inputs exit 2 with one line (0 ok, 1 a runtime failure, 2 a usage error)."""
    subs = {"O": str(tmp_path / "o"), "S": steering_file, "MISSING": str(tmp_path / "missing")}
    args = [subs.get(a, a) for a in args]
    model = [] if args[0] in ("compare", "info") else ["--model", model_dir]
    line = _one_line_failure(_cli(*args, *model))
    assert line.startswith(f"fastsplit {args[0]}: error:") and says in line, line


def test_export_reads_the_model_from_the_steering_file(model_dir, steering_file, tmp_path, capsys):
    """Without --model, export uses the model the steering file records (here the tiny model's folder), not the
    default model; a recorded model that is no folder here is refused in one line naming it."""
    import fastsplit

    out = str(tmp_path / "adapter")
    assert main(["export", "--steering", steering_file, "--m", "2", "--format", "peft", "--out", out, "--quiet"]) == 0
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    model = tiny_model("llama")
    model.config.name_or_path = str(tmp_path / "gone")
    s = fastsplit.attach(model, 1, "vector")
    s.save(str(tmp_path / "s.safetensors"))
    capsys.readouterr()
    assert main(["export", "--steering", str(tmp_path / "s.safetensors"), "--m", "2", "--format", "peft", "--out",
                 str(tmp_path / "a2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"was trained on the model {str(tmp_path / 'gone')!r}, which is not a folder here: give its folder" in err
