"""Preference–utility analysis: log-odds sweeps, the paper's curve fits, operating point, plots."""
from .compare import compare
from .fit import Fit, OperatingPoint, fit_curves, operating_point, validity_decay
from .report import analyze, answer_groups, heldout_m_r2
from .logodds import Sweep, logodds_naive, logodds_sweep, util_odds
from .manifold import explain_utility, manifold_sweep
from .plot import plot_sweep

__all__ = ["compare", "manifold_sweep", "explain_utility", "Sweep", "logodds_sweep", "logodds_naive", "util_odds", "Fit", "OperatingPoint", "fit_curves",
           "operating_point", "analyze", "answer_groups", "heldout_m_r2", "validity_decay", "plot_sweep"]
