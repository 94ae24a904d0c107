"""Shared test set-up: Triton's interpreter on CPU-only machines, seeding, the gpu marker."""
import pytest
import torch

from tests.helpers import HAS_CUDA  # sets TRITON_INTERPRET=1 without a GPU, before fastsplit loads


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
