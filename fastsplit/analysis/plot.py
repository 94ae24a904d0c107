"""Preference and utility against m: data with error bars, fitted curves, regions, operating point."""
from __future__ import annotations

import numpy as np

from .fit import Fit, OperatingPoint
from .logodds import Sweep

__all__ = ["plot_sweep"]

_REGION_COLOURS = {"linear": "#d8ecd8", "transitional": "#fbe8c8", "convergence": "#f4d0d0"}


def plot_sweep(sweep: Sweep, pref_fit: Fit | None, util_fit: Fit | None, op: OperatingPoint | None,
               path_prefix: str, *, title: str = "") -> list[str]:
    """Write ``path_prefix``.png and .svg (two panels); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = sweep.summary()
    m = s["multiplier"]
    fine = np.linspace(m.min(), m.max(), 400)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "pref", pref_fit, r"preference log-odds  $L_n - L_p$", sweep.pref_odds),
              (axes[1], "util", util_fit, "utility log-odds", sweep.util_odds))
    for ax, key, fit, label, per_pair in panels:
        if key == "pref" and fit is not None and fit.regions:
            for side in fit.regions.values():
                for name, span in (side or {}).items():
                    if span and span[0] is not None and span[1] is not None:
                        ax.axvspan(min(span), max(span), color=_REGION_COLOURS[name], alpha=0.6, lw=0,
                                   label=name if name not in ax.get_legend_handles_labels()[1] else None)
        if per_pair.shape[0] >= 2:  # the spread across pairs: a mean can hide pairs moving apart
            lo, hi = np.quantile(per_pair, [0.1, 0.9], axis=0)
            ax.fill_between(m, lo, hi, color="0.6", alpha=0.25, lw=0, label="pairs, 10–90% quantile")
        ax.errorbar(m, s[f"{key}_mean"], yerr=s[f"{key}_se"], fmt="o", ms=4, color="k", capsize=2,
                    label="mean ± s.e.")
        if fit is not None:
            ax.plot(fine, fit.predict(fine), color="C0", lw=2, label=f"fit ($R^2$ = {fit.r2:.3f})")
        if op is not None:
            y = op.preference if key == "pref" else op.utility
            ax.axvline(op.multiplier, color="C3", ls="--", lw=1)
            ax.plot([op.multiplier], [y], marker="*", ms=14, color="C3",
                    label=f"operating point $m$ = {op.multiplier:.2f}")
        ax.set_xlabel("steering factor $m$")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths = [f"{path_prefix}.png", f"{path_prefix}.svg"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
