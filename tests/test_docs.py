"""The documentation: a short README that links to the docs pages, and a docs site that builds strictly, its API
reference generated from the docstrings (so a renamed function breaks the build)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(root, out):
    if shutil.which("mkdocs") is None:
        pytest.fail("mkdocs is a test dependency (pip install -e '.[test]'): the mkdocs command is missing")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "-f", os.path.join(root, "docs", "mkdocs.yml"),
                           "--strict", "-q", "-d", str(out)], cwd=root, capture_output=True, text=True, timeout=600)


def test_the_docs_build_strictly(tmp_path):
    out = _build(ROOT, tmp_path / "site")
    assert out.returncode == 0, out.stdout + out.stderr
    api = open(tmp_path / "site" / "api" / "index.html").read()
    for name in ("TransformersEngine", "VLLMEngine", "logodds_sweep", "request_steering", "steered_linear"):
        assert name in api, name


def test_a_renamed_function_breaks_the_build(tmp_path):
    for part in ("docs", "fastsplit"):
        shutil.copytree(os.path.join(ROOT, part), tmp_path / part, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    src = tmp_path / "fastsplit" / "vllm" / "protocol.py"
    src.write_text(src.read_text().replace("def request_steering(", "def request_steering_renamed("))
    api = tmp_path / "docs" / "pages" / "api.md"
    api.write_text(api.read_text() + "\n::: fastsplit.vllm.protocol.request_steering\n")
    out = _build(str(tmp_path), tmp_path / "site")
    assert out.returncode != 0 and "request_steering" in out.stdout + out.stderr


def test_the_readme_is_short_and_its_links_resolve():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert any(link.startswith("docs/pages/") for link in links)
    for link in links:
        if "://" not in link:
            assert os.path.exists(os.path.join(ROOT, link)), link


def test_every_page_is_in_the_nav():
    conf = open(os.path.join(ROOT, "docs", "mkdocs.yml")).read()
    for page in os.listdir(os.path.join(ROOT, "docs", "pages")):
        assert f": {page}" in conf, page
