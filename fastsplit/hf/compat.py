"""What differs between transformers releases, in one place: how the KV cache is passed, the installed version
against the tested ones, one-time fallback warnings, and transformers' own logging switch.

transformers 5.24 renamed the cache keyword of decoders and decoder layers from ``past_key_values`` to
``cache`` (the old name is still accepted by the decoder with a deprecation until 5.40). fastsplit reads the
spelling from the signature of the module it calls, and its stand-in layers accept either; a layer that gets
the cache under a spelling fastsplit does not know runs as the full layer (correct, slower) after a warning.
"""
from __future__ import annotations

import contextlib

import functools
import inspect
import logging
import warnings

from torch import nn

__all__ = ["CACHE_KEYWORDS", "cache_keyword", "cache_kwargs", "cache_from", "transformers_version", "is_tested",
           "warn_fallback", "quiet_transformers"]

log = logging.getLogger("fastsplit")

# Newest first: transformers >= 5.24 ("cache"), 5.0-5.23 ("past_key_values").
CACHE_KEYWORDS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _keyword_of(forward) -> str | None:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    return next((kw for kw in CACHE_KEYWORDS if kw in params), None)


def cache_keyword(module: nn.Module) -> str | None:
    """The keyword ``module.forward`` takes its KV cache under (``"cache"`` or ``"past_key_values"``), or
    None when its signature names neither."""
    return _keyword_of(type(module).forward)


def cache_kwargs(decoder: nn.Module, cache) -> dict:
    """Keyword arguments that hand ``cache`` (a transformers cache, or None for no cache) to ``decoder`` in the
    spelling of the installed transformers, with ``use_cache`` to match.

    Example::

        >>> out = decoder(input_ids=ids, **cache_kwargs(decoder, cache))
    """
    kw = cache_keyword(decoder)
    if kw is None:
        warn_fallback("the decoder's cache keyword (neither 'cache' nor 'past_key_values' in its forward)",
                      "the cache is passed as 'past_key_values'")
        kw = "past_key_values"
    return {kw: cache, "use_cache": cache is not None}


def cache_from(kwargs: dict):
    """The KV cache a decoder layer received, under any spelling fastsplit knows, or None."""
    for kw in CACHE_KEYWORDS:
        if kwargs.get(kw) is not None:
            return kwargs[kw]
    return None


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def is_tested(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) is among ``internals.TESTED_TRANSFORMERS``."""
    from .internals import TESTED_TRANSFORMERS

    return (version or transformers_version()) in TESTED_TRANSFORMERS


_warned: set[str] = set()


def warn_fallback(internal: str, fallback: str) -> None:
    """Warn once per process per ``internal`` that it was not found and what runs instead."""
    if internal in _warned:
        return
    _warned.add(internal)
    warnings.warn(f"fastsplit: transformers {transformers_version()} does not provide {internal}; {fallback} "
                  "(correct, slower). Please report this with your transformers version.", RuntimeWarning,
                  stacklevel=3)


def quiet_transformers() -> None:
    """Silence transformers' and the hub's loading bars and info messages (the CLI's ``--quiet``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def quiet_loading():
    """Within the block, transformers loads without its progress bars and info messages; as they were after."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
