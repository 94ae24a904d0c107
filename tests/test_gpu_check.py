"""bench/gpu_check.sh fits its slot by construction, and bench/gpu_summary.py names every failing test and checks
every goal from the logs, time-outs included (run on the CPU with made-up logs)."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_summary  # noqa: E402

SCRIPT = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()


def _limits(*flags):
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--limits", *flags],
                         capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(out[::2], map(int, out[1::2])))


def test_the_step_limits_fit_five_minutes_and_quick_three():
    full, quick = _limits(), _limits("--quick")
    assert set(full) == {"build", "info", "tests", "memcheck", "summary", "bench_linear", "bench_split", "bench_host",
                         "tune", "targets"}
    assert set(quick) == {"build", "info", "tests", "memcheck", "summary"}
    assert sum(full.values()) <= 300, full
    assert sum(quick.values()) <= 180, quick
    for name in full:  # every step runs under its limit, by name
        assert re.search(rf'step {name} "\$L_', SCRIPT), name
    assert "timeout -s INT" in SCRIPT and "--junitxml" in SCRIPT and "-rfE" in SCRIPT


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.gpu.test_cuda_matrix" name="test_steered_matrix[bf16-lora-per_row-triton-decode]" time="0.1">
  <failure message="AssertionError">boom</failure></testcase>
<testcase classname="tests.ops.test_split_loss" name="test_gemma_vocabulary_on_the_gpu" time="0.1">
  <error message="OutOfMemoryError">oom</error></testcase>
<testcase classname="tests.gpu.test_cuda_matrix" name="test_split_matrix[f32-torch-batch-None]" time="0.1"/>
<testcase classname="tests.test_nn" name="test_torch_compile_matches_eager_triton" time="0.0">
  <skipped message="x"/></testcase>
</testsuite></testsuites>"""


def _case(kind, ms, graph=None, bw=None, form="vector", mkind="per_row"):
    return {"form": form, "mkind": mkind, "shape": f"{kind}:x", "kind": kind, "ms": ms, "graph_ms": graph or {},
            "relerr": {}, **({"bw_share": bw} if bw else {})}


def test_summary_names_failures_and_checks_goals(tmp_path, capsys):
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "memcheck.log").write_text("[  1.0s] a\n[  2.0s] sanitize_cases: 9 cases ran, every output finite\n"
                                           "========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "steps.txt").write_text("build     ok        rc=0     50s (total   50s)  x\n"
                                        "tests     TIMED OUT rc=124  120s (total  170s)  y\n")
    lin = {"device": "H200", "copy_bandwidth_TBps": 4.2, "cases": [
        _case("prefill", {"gemm": 1.0, "eager": 1.5, "auto": 1.08, "torch": 1.08, "triton": "FAILED X"}),
        _case("decode", {"gemm": 0.06, "eager": 0.09, "auto": 0.07, "torch": 0.07, "triton": 0.05},
              graph={"gemm": 0.05, "auto": 0.06, "torch": 0.06, "triton": 0.04},
              bw={"auto": 0.55, "torch": 0.55, "triton": 0.82})]}
    (tmp_path / "steered_linear.json").write_text(json.dumps(lin))
    split = {"device": "H200", "skipped": ["liger"], "cases": [{"shape": "qwen", "V": 152064, "providers": {
        "naive": {"ms": 30.0, "tflops": 585, "extra_mib": 4696, "loss": 1},
        "fastsplit": {"ms": 33.0, "tflops": 540, "extra_mib": 200, "loss": 1},
        "cce": {"ms": 58.0, "tflops": 300, "extra_mib": 2, "loss": 1}}}]}
    (tmp_path / "split_loss.json").write_text(json.dumps(split))
    assert gpu_summary.main(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "FAILED tests/gpu/test_cuda_matrix.py::test_steered_matrix[bf16-lora-per_row-triton-decode]" in out
    assert "FAILED tests/ops/test_split_loss.py::test_gemma_vocabulary_on_the_gpu" in out
    assert "tests TIMED OUT 120s" in out
    s = json.load(open(tmp_path / "summary.json"))
    assert s["tests"]["passed"] == 1 and s["tests"]["failed"] == 1 and s["tests"]["errors"] == 1
    assert s["memcheck"]["verdict"] == "clean" and s["memcheck"]["cases"] == 9
    pre, dec = s["steered_linear"]["cases"]
    assert pre["goal"] == {"x_gemm_max": 1.10, "met": True} and pre["failed"] == {"triton": "FAILED X"}
    assert dec["goal"]["met"] is True  # triton at 82% of the copy bandwidth
    assert s["split_loss"]["cases"][0]["goal"]["met"] is True  # 1.10x full logits, 200 MiB, 1.76x CCE
    assert s["green_backends"] == ["torch"]  # a failing test keeps Triton off the routes
    assert s["routes_supported"]["steered_linear|vector|per_row|decode"] == "torch"


def test_summary_of_a_run_that_died_early(tmp_path, capsys):
    (tmp_path / "memcheck.log").write_text("[  1.0s] _steered_linear_fwd_kernel: torch.float32 done\n")
    assert gpu_summary.main(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "no JUnit XML" in out and "memcheck: did not finish" in out and "last progress" in out


def test_help_and_bad_options():
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --nope" in r.stderr
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dry-run" in r.stdout
