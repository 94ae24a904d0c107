"""Shared test set-up: Triton's interpreter on CPU-only machines, seeding, the gpu marker, threads per xdist worker."""
import os

import pytest
import torch

from tests.helpers import HAS_CUDA  # sets TRITON_INTERPRET=1 without a GPU, before fastsplit loads


def pytest_configure(config):
    if hasattr(config.option, "benchmark_disable") and (
            config.getoption("dist", "no") != "no" or "PYTEST_XDIST_WORKER" in os.environ):
        # tests/ has no benchmarks (bench/ runs in its own pytest, tests/test_bench.py): disable them before
        # pytest-benchmark warns, once per worker, that xdist does
        config.option.benchmark_disable = True
    # Under pytest-xdist (README's test command: `-n auto`) each worker is one of N processes on the same cores.
    # torch's intra-op pool defaults to every core, and N pools of spinning OpenMP threads on the same cores run
    # slower than one: each worker takes its share of the cores.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
