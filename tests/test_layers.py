"""The one-way stack kernels → ops → hf → engines → workflows → cli, as import-linter's contracts in pyproject.toml,
and no import circles at all (lazy imports inside functions included)."""
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
    assert "2 kept, 0 broken" in out.stdout


def _copy(tmp_path):
    """A copy of the package and its pyproject.toml under ``tmp_path``, to plant an import in."""
    shutil.copytree(os.path.join(ROOT, "fastsplit"), tmp_path / "fastsplit",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")


def test_a_planted_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package whose kernels import a workflow is refused."""
    _copy(tmp_path)
    with open(tmp_path / "fastsplit" / "kernels" / "_common.py", "a") as f:
        f.write("\nfrom ..train import train  # planted\n")
    out = _lint(str(tmp_path))
    assert out.returncode != 0 and "fastsplit.kernels._common -> fastsplit.train" in out.stdout, out.stdout
    here = sys.modules.get("fastsplit")
    assert here is None or str(tmp_path) not in str(here.__file__)  # the planted copy was never imported here


_CIRCLES = """
import json, sys
import grimp

graph = grimp.build_graph("fastsplit", cache_dir=None)
index, low, stack, on, found = {}, {}, [], set(), []


def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.find_modules_directly_imported_by(v):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            found.append(sorted(comp))


for m in sorted(graph.modules):
    if m not in index:
        visit(m)
print(json.dumps(found))
"""


def _circles(root: str) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module) of the package ``fastsplit`` under
    ``root``, every import statement counted, those inside functions too (grimp reads them all). In a process of its
    own, so the package read is the one under ``root``, never one this process imported."""
    import json

    out = subprocess.run([sys.executable, "-c", _CIRCLES], cwd=root, env={**os.environ, "PYTHONPATH": root},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_no_import_circles():
    assert _circles(ROOT) == []


def test_a_planted_lazy_circle_is_found(tmp_path):
    """The circle check can fail: a lazy import back up, inside a function, makes one."""
    _copy(tmp_path)
    with open(tmp_path / "fastsplit" / "steerfile.py", "a") as f:
        f.write("\n\ndef _planted():\n    from .hf import export  # planted\n")
    with open(tmp_path / "fastsplit" / "hf" / "export.py", "a") as f:
        f.write("\n\ndef _planted():\n    from .. import steerfile  # already imported at the top\n")
    circles = _circles(str(tmp_path))
    assert any({"fastsplit.steerfile", "fastsplit.hf.export"} <= set(c) for c in circles), circles


def test_the_cli_reaching_into_ops_breaks_the_contract(tmp_path):
    _copy(tmp_path)
    with open(tmp_path / "fastsplit" / "cli" / "tune.py", "a") as f:
        f.write("\n\ndef _planted():\n    from fastsplit.ops import _tune  # planted\n")
    out = _lint(str(tmp_path))
    assert out.returncode != 0 and "fastsplit.cli.tune -> fastsplit.ops._tune" in out.stdout, out.stdout
