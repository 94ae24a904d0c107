"""Preference and utility against m: data with error bars, fitted curves, regions, the utility limit, the operating
point, and what the fits leave undetermined."""
from __future__ import annotations

import numpy as np

from .fit import Fit, OperatingPoint
from .logodds import Sweep

__all__ = ["plot_sweep"]

# Regions are drawn as a strip along the bottom of the preference panel, so they never mix with the data's band.
_REGION_COLOURS = {"linear": "#7fbf7f", "transitional": "#f0b050", "convergence": "#d9534f", "reversal": "#8e7cc3"}
_STRIP = 0.06  # height of the region strip, as a fraction of the axes


def plot_sweep(sweep: Sweep, pref_fit: Fit | None, util_fit: Fit | None, op: OperatingPoint | None,
               path_prefix: str, *, title: str = "", heldout_r2: dict | None = None,
               max_util_drop: float | None = None, identifiability: dict | None = None,
               manifold: dict | None = None) -> list[str]:
    """Write ``path_prefix``.png and .svg (two panels: preference, utility; a third with the sweep's manifold columns:
    the utility drop against the off-manifold distance); returns the paths.

    ``heldout_r2`` ({"preference": R², "utility": R²}, leave-one-m-out) goes into the legend beside the in-sample
    R²; ``max_util_drop`` draws the utility limit that defines the operating point (measured utility at m = 0
    minus the drop); ``identifiability`` (``analyze``'s) notes the parameters the data do not determine.

    Example::

        >>> report = analyze(sweep)
        >>> plot_sweep(sweep, report["preference"], report["utility"], report["operating_point"], "out/plot",
        ...            heldout_r2=report["heldout_m"], max_util_drop=1.0)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = sweep.summary()
    m = s["multiplier"]
    fine = np.linspace(m.min(), m.max(), 400)
    extra = sweep.extra or {}
    with_manifold = "off_last" in extra and "off_steered" in extra
    fig, axes = plt.subplots(1, 3 if with_manifold else 2, figsize=(18 if with_manifold else 12, 5.2))
    panels = ((axes[0], "pref", "preference", pref_fit, r"preference log-odds $L_n - L_p$ (nats)", sweep.pref_odds),
              (axes[1], "util", "utility", util_fit, "utility log-odds (nats)", sweep.util_odds))
    for ax, key, kind, fit, label, per_pair in panels:
        if per_pair.shape[0] >= 2:  # the spread across pairs: a mean can hide pairs moving apart
            lo, hi = np.quantile(per_pair, [0.1, 0.9], axis=0)
            ax.fill_between(m, lo, hi, color="#9ecae1", alpha=0.35, lw=0, label="pairs, 10–90% quantile")
        ax.errorbar(m, s[f"{key}_mean"], yerr=s[f"{key}_se"], fmt="o", ms=4, color="k", capsize=2,
                    label="mean ± s.e.", zorder=3)
        if fit is not None:
            held = (heldout_r2 or {}).get(kind)
            r2 = f"held-out-m $R^2$ = {held:.3f}, in-sample {fit.r2:.3f}" if held is not None else \
                f"in-sample $R^2$ = {fit.r2:.3f}"
            ax.plot(fine, fit.predict(fine), color="C0", lw=2, label=f"fit ({r2})", zorder=2)
        if key == "pref" and fit is not None and fit.regions:
            for side in fit.regions.values():
                for name, span in (side or {}).items():
                    if span and span[0] is not None and span[1] is not None and span[0] != span[1]:
                        ax.axvspan(min(span), max(span), ymin=0, ymax=_STRIP, color=_REGION_COLOURS[name],
                                   lw=0, label=f"region: {name}" if f"region: {name}" not in
                                   ax.get_legend_handles_labels()[1] else None)
        if key == "util" and op is not None and max_util_drop is not None:
            limit = op.utility_at_zero - max_util_drop
            ax.axhline(limit, color="C3", ls=":", lw=1.2,
                       label=f"utility limit: {max_util_drop:g} nat below m = 0 ({limit:+.2f})")
        if op is not None:
            y = op.preference if key == "pref" else op.measured_utility
            ax.axvline(op.multiplier, color="C3", ls="--", lw=1)
            ax.plot([op.multiplier], [y], marker="*", ms=14, color="C3", zorder=4,
                    label=f"operating point $m$ = {op.multiplier:.2f}" + ("" if key == "pref" else " (measured)"))
        notes = []
        unknown = ((identifiability or {}).get(kind) or {}).get("not_identified") or {}
        if unknown:
            notes.append("not identified: " + ", ".join(unknown))
            simpler = (identifiability or {}).get(kind, {}).get("simpler")
            if simpler:
                notes.append(f"'{simpler['member']}' fits as well")
        if key == "util" and fit is not None:
            notes.append("kink at m = 0: the paper's decay has one branch per sign of m")
        if notes:
            ax.text(0.02, 0.97, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="top", color="0.3")
        ax.set_title(kind.capitalize(), fontsize=11)
        ax.set_xlabel("steering factor $m$")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if with_manifold:
        _manifold_panel(axes[2], sweep, manifold)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path_prefix)


def save_figure(fig, path_prefix: str) -> list[str]:
    """``path_prefix``.png (120 dpi) and .svg of ``fig``, which is then closed; returns the paths."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    paths = [f"{path_prefix}.png", f"{path_prefix}.svg"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def _manifold_panel(ax, sweep: Sweep, manifold: dict | None) -> None:
    """Mean utility drop against the mean off-manifold distance, per m, at both sites (the paper's explanation:
    utility falls as representations leave the generation manifold)."""
    ms = sweep.multipliers
    order = np.argsort(ms)
    u0 = np.interp(0.0, ms[order], sweep.util_odds.mean(0)[order])
    drop = u0 - sweep.util_odds.mean(0)
    for site, colour in (("steered", "C1"), ("last", "C2")):
        x = sweep.extra[f"off_{site}"].mean(0)
        block = (manifold or {}).get(site) or {}
        r2 = block.get("off_manifold", {}).get("r2_monotone")
        rho = block.get("off_manifold", {}).get("spearman")
        label = f"{site} layer" + (f" (per pair: monotone $R^2$ {r2:.2f}, ρ {rho:.2f})" if r2 is not None else "")
        ax.plot(x[ms >= 0], drop[ms >= 0], "o-", color=colour, ms=4, label=f"{label}, m ≥ 0")
        ax.plot(x[ms <= 0], drop[ms <= 0], "s--", color=colour, ms=4, mfc="none", label=f"{site} layer, m ≤ 0")
    absm = ((manifold or {}).get("last") or {}).get("abs_m", {})
    if absm.get("r2_monotone") is not None:
        ax.text(0.02, 0.97, f"|m| alone: monotone $R^2$ {absm['r2_monotone']:.2f}, ρ {absm['spearman']:.2f}",
                transform=ax.transAxes, fontsize=7, va="top", color="0.3")
    ax.set_title("Leaving the manifold", fontsize=11)
    ax.set_xlabel("off-manifold distance (units of the unsteered spread off the 95% subspace)")
    ax.set_ylabel("utility drop from m = 0 (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
