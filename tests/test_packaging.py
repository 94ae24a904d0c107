"""The project's own files install everything the main job needs, and say what was tested."""
import os
import re
import sys

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from fastsplit.hf import internals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _requirements(section):
    return {Requirement(r).name.lower(): Requirement(r) for r in section}


def test_runtime_needs_are_dependencies_not_test_extras():
    deps = _requirements(_project()["dependencies"])
    # Loading the default model's GGUF file needs gguf and accelerate (accelerate once came only through peft,
    # a test extra, so a fresh install of the main job failed).
    for name in ("torch", "transformers", "accelerate", "gguf", "safetensors", "tqdm", "scipy", "matplotlib"):
        assert name in deps, name


def test_transformers_lower_bound_is_the_oldest_tested():
    spec = _requirements(_project()["dependencies"])["transformers"].specifier
    lower = [Version(s.version) for s in spec if s.operator == ">="]
    assert lower == [Version(internals.OLDEST_TRANSFORMERS)]
    assert not [s for s in spec if s.operator in ("<", "<=", "==")]  # the policy: a lower bound + the fallback
    assert internals.OLDEST_TRANSFORMERS in internals.TESTED_TRANSFORMERS


def test_ci_runs_the_readme_commands_and_the_oldest_transformers():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_cmd = re.search(r"^    (pip install torch==2\.13\.0 && pip install -e \"\.\[test\]\".*)$", readme, re.M).group(1)
    main_cmd = re.search(r"^    (pip install torch==2\.13\.0 && pip install -e \. .*fastsplit demo)$", readme, re.M).group(1)
    assert test_cmd in ci
    assert main_cmd + " --quick" in ci  # before the test extras are installed
    assert ci.index(main_cmd) < ci.index(test_cmd)
    assert "OLDEST_TRANSFORMERS" in ci
