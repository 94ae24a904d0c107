"""fastsplit: fused kernels for steering language models (arXiv 2602.02343).

The public API is pinned by ``tests/test_api.py``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import dist, native as _native
from ._env import set_debug, set_tuning
from .analysis import Fit, Sweep, analyze, compare, fit_curves, logodds_sweep, operating_point, plot_sweep
from .diffmean import diffmean
from .data import Pair, balance_answers, demo_pairs, encode_pair, load_pairs, split_pairs
from .generate import generate_sweep
from .hf import Steering, attach, export_steering, load_default_model, load_model, load_steering
from .hf import compat as _hf_compat
from .nn import SplitLoss, SteeredLinear
from .ops._backend import TRITON_VERSION as _TRITON_VERSION
from .ops.split_loss import split_loss, split_loss_ref
from .ops.steered_linear import steered_linear, steered_linear_ref
from .train import train


def build_info() -> dict:
    """What this install can run: the compiled extension's CPU build and its CUDA kernels (compiled in or
    not), whether a CUDA device is present, Triton, torch, and the installed transformers with whether it is
    among the versions fastsplit was tested on (``fastsplit.hf.internals.TESTED_TRANSFORMERS``)."""
    import torch

    return {
        "version": __version__,
        "native_cpu": _native._C is not None,
        "cuda_kernels_compiled": _native.cuda_built(),
        "cuda_archs": _native.cuda_archs(),
        "cuda_device_present": torch.cuda.is_available(),
        "triton": _TRITON_VERSION,
        "torch": torch.__version__,
        "transformers": _hf_compat.transformers_version(),
        "transformers_tested": _hf_compat.is_tested(),
    }


__all__ = ["__version__", "build_info", "set_debug", "set_tuning", "steered_linear", "steered_linear_ref", "SteeredLinear",
           "split_loss", "split_loss_ref", "SplitLoss",
           "attach", "Steering", "load_steering", "Pair", "load_pairs", "encode_pair", "split_pairs", "balance_answers", "demo_pairs",
           "train", "diffmean", "generate_sweep", "load_default_model", "load_model", "export_steering",
           "logodds_sweep", "Sweep", "fit_curves", "Fit", "operating_point", "analyze", "plot_sweep", "compare"]
