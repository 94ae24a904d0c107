"""pytest-benchmark entry to the bench/ providers (bench/test_providers.py); the bench scripts' own imports."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
