"""The one-way stack kernels → ops → hf → workflows → cli, as import-linter's contract in pyproject.toml."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint(cwd):
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is a test dependency (pip install -e '.[test]'): lint-imports is missing")
    env = {**os.environ, "PYTHONPATH": cwd}
    return subprocess.run([exe, "--config", os.path.join(cwd, "pyproject.toml")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_layers_contract_is_kept():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_a_planted_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package whose kernels import a workflow is refused."""
    shutil.copytree(os.path.join(ROOT, "fastsplit"), tmp_path / "fastsplit",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
    with open(tmp_path / "fastsplit" / "kernels" / "_common.py", "a") as f:
        f.write("\nfrom ..train import train  # planted\n")
    out = _lint(str(tmp_path))
    assert out.returncode != 0 and "fastsplit.kernels._common -> fastsplit.train" in out.stdout, out.stdout
    assert sys.modules.get("fastsplit") is not None  # the planted copy was never imported here
