"""The pytest-benchmark entry to bench/ runs: every provider case once (``--benchmark-disable``), so a provider
that breaks fails CI instead of the next person's regression check."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "bench"),
                           "--benchmark-disable", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_bench_providers_run_once():
    # torch.compile costs seconds per case on the CPU, and the real-model sweep is a `slow` test's business.
    r = _run("-k", "not compile and not logodds")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tail = r.stdout.strip().splitlines()[-1]
    assert " passed" in tail and "failed" not in tail, tail


def test_bench_collects_every_provider():
    r = _run("--collect-only")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("test_steered_linear_fwd", "test_steered_linear_full", "test_split_loss_full", "test_logodds_sweep"):
        assert name in r.stdout, name
    for provider in ("gemm", "eager", "auto", "torch", "triton", "compile", "naive", "fastsplit", "liger", "cce"):
        assert f"-{provider}]" in r.stdout or f"[{provider}]" in r.stdout, provider
