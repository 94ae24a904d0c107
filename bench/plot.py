"""Plot bench/results.csv: one PNG per (op, mode, metric), p50 bars with p20–p80 whiskers by provider.

Run: python bench/plot.py [--csv bench/results.csv] [--out bench/out]
"""
from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict


def main():
    p = argparse.ArgumentParser(description=__doc__)
    here = os.path.dirname(__file__)
    p.add_argument("--csv", default=os.path.join(here, "results.csv"))
    p.add_argument("--out", default=os.path.join(here, "out"))
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{args.csv} holds no rows")
    latest = {}  # keep the newest measurement of each (device, op, provider, mode, metric, x)
    for r in rows:
        latest[(r["device"], r["op"], r["provider"], r["mode"], r["metric"], r["x_value"])] = r
    groups = defaultdict(list)
    for r in latest.values():
        groups[(r["device"], r["op"], r["mode"], r["metric"])].append(r)
    os.makedirs(args.out, exist_ok=True)
    for (device, op, mode, metric), rs in sorted(groups.items()):
        xs = sorted({r["x_value"] for r in rs})
        provs = sorted({r["provider"] for r in rs})
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(xs) * len(provs) / 3), 4))
        width = 0.8 / len(provs)
        for i, prov in enumerate(provs):
            by_x = {r["x_value"]: r for r in rs if r["provider"] == prov}
            pos = [j + i * width for j, x in enumerate(xs) if x in by_x]
            p50 = [float(by_x[x]["p50"]) for x in xs if x in by_x]
            lo = [p - float(by_x[x]["p20"]) for p, x in zip(p50, [x for x in xs if x in by_x])]
            hi = [float(by_x[x]["p80"]) - p for p, x in zip(p50, [x for x in xs if x in by_x])]
            ax.bar(pos, p50, width, yerr=[lo, hi], label=prov, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], xs, rotation=20, fontsize=7)
        unit = rs[0]["unit"]
        ax.set_ylabel(f"{metric} ({unit})")
        ax.set_title(f"{op} {mode} on {device}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = "".join(c if c.isalnum() else "_" for c in f"{device}_{op}_{mode}_{metric}")
        fig.savefig(os.path.join(args.out, name + ".png"), dpi=110)
        plt.close(fig)
    print(f"wrote {len(groups)} plots to {args.out}")


if __name__ == "__main__":
    main()
