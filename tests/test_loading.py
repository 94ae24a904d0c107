"""The default model's cache: built once when several processes (a torchrun job's ranks) load at once, and a damaged
cache refused in one line. The 30-second dequantisation is replaced by a stand-in; tests/test_real_model.py loads the
real thing."""
import os
import threading
import time

import pytest

import fastsplit.hf.loading as loading

from .tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    """FASTSPLIT_CACHE in tmp_path and a dequantisation that takes 0.3 s and counts its calls."""
    monkeypatch.setenv("FASTSPLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_gguf_source", lambda: "unused.gguf")
    calls = []

    def build(gguf, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for every other caller to reach the lock meanwhile
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
    monkeypatch.setattr(loading, "_dequantise", build)
    return calls


def test_concurrent_first_loads_build_the_cache_once(fake_build):
    got, errors = [], []

    def load():
        try:
            got.append(loading.default_model_folder())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=load) for _ in range(3)]  # flock locks per open file: threads exclude too
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cached = loading.cache_dir()
    assert not errors and got == [cached] * 3
    assert len(fake_build) == 1
    assert sorted(os.listdir(cached)) == ["config.json", "fastsplit.json"]
    assert sorted(os.listdir(os.path.dirname(cached))) == sorted([os.path.basename(cached),
                                                                  os.path.basename(cached) + ".lock"])


def test_a_killed_build_leaves_nothing_the_next_build_keeps(fake_build):
    cached = loading.cache_dir()
    os.makedirs(cached + ".tmp-killed")  # a build killed before its clean-up
    os.makedirs(cached)  # an unfinished folder of an older fastsplit: no marker
    open(os.path.join(cached, "model.safetensors"), "w").close()
    assert loading.default_model_folder() == cached
    assert len(fake_build) == 1 and sorted(os.listdir(cached)) == ["config.json", "fastsplit.json"]
    assert not os.path.exists(cached + ".tmp-killed")
    assert loading.default_model_folder() == cached and len(fake_build) == 1  # built: no second build


def test_a_failed_build_leaves_no_cache(fake_build, monkeypatch):
    def broken(gguf, out):
        open(os.path.join(out, "config.json"), "w").close()
        raise OSError("disk full")
    monkeypatch.setattr(loading, "_dequantise", broken)
    with pytest.raises(OSError, match="disk full"):
        loading.default_model_folder()
    cached = loading.cache_dir()
    assert not os.path.exists(cached)
    assert [n for n in os.listdir(os.path.dirname(cached)) if ".tmp-" in n] == []


def test_a_damaged_default_cache_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSPLIT_CACHE", str(tmp_path / "cache"))
    cached = loading.cache_dir()
    tiny_model("llama").save_pretrained(cached)
    tiny_tokenizer().save_pretrained(cached)
    open(os.path.join(cached, "fastsplit.json"), "w").write("{}")
    with open(os.path.join(cached, "model.safetensors"), "r+b") as f:
        f.write(b"\xff" * 64)  # the header's length and its first bytes: what a copy cut short leaves
    with pytest.raises(ValueError) as exc:
        loading.load_default_model()
    msg = str(exc.value)
    assert msg.startswith(f"the default model's cache {cached!r} cannot be read (") and "\n" not in msg
    assert msg.endswith("delete that folder and the next load rebuilds it from the GGUF file")
