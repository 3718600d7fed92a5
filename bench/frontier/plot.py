"""The frontier figure: top-1 against parameters, MACs and batch-1 latency (one panel per CPU that timed the rows)."""
from __future__ import annotations

import math
from typing import Any

from bench.frontier.rows import KINDS
from bench.frontier.verdicts import plain_curve, with_timing

def plot(summary: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from adjustText import adjust_text
    from matplotlib.ticker import FuncFormatter

    style = {"plain": ("black", "o"), "replace": ("tab:blue", "s"), "kdna": ("tab:green", "D"),
             "relaxed": ("tab:cyan", "P"), "condconv": ("tab:orange", "^"), "dyconv": ("tab:red", "v"),
             "odconv": ("tab:purple", "X")}
    done = [r for r in summary["rows"] if "top1_mean" in r]
    panels = [(done, "params", "parameters (thousands)", 1e-3), (done, "macs", "MACs per 28x28 image (millions)", 1e-6)]
    # one latency panel per CPU that timed the rows, newest first: the ratios differ between CPUs
    timings = summary.get("timings") or [{"cpu": "CPU", "date_utc": "not timed yet", "rows": {}}]
    panels += [(with_timing(done, t), "latency_b1_ms",
                f"batch-1 latency, ms (compiled, {t['cpu']}, {t['date_utc'][:10]})", 1.0) for t in timings]
    ncols = 3 if len(panels) <= 3 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols + (1 if ncols == 2 else 0), 5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel_rows, key, xlabel, scale) in zip(axes.flat, panels):
        have = [r for r in panel_rows if key in r]
        curve = plain_curve(have, key)
        labels, avoid_x, avoid_y = [], [], []
        if len(curve) > 1:
            ax.plot([x * scale for x, _ in curve], [y for _, y in curve], color="black", lw=1, alpha=0.6,
                    label="plain ResNet-18 widths")
        for kind in style:
            color, marker = style[kind]
            mine = [r for r in have if r["kind"] == kind]
            for i, r in enumerate(mine):
                x = r[key] * scale
                ax.errorbar(x, r["top1_mean"],
                            yerr=[[r["top1_mean"] - r["top1_min"]], [r["top1_max"] - r["top1_mean"]]],
                            color=color, marker=marker, capsize=3, linestyle="none",
                            label=KINDS[kind] if i == 0 else None)
                # a label must not hide a seed range: its ends repel the labels too
                avoid_x += [x, x]
                avoid_y += [r["top1_min"], r["top1_max"]]
                labels.append(ax.text(x, r["top1_mean"], f"{r['row']} ({len(r['seeds'])})", fontsize=7))
        if not have:
            ax.text(0.5, 0.5, "no timings yet: run --speed" if done else "no finished runs yet",
                    ha="center", transform=ax.transAxes)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 100, not 10^2
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
        ax.set_xlabel(xlabel + " (log scale)")
        ax.set_ylabel("test top-1 % (mean; bars: min-max over seeds)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")  # the cheap, weak peers sit bottom right
        if labels:
            # last, once the limits are final: rows of about equal cost would otherwise print over each other
            adjust_text(labels, x=avoid_x, y=avoid_y, ax=ax, arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5})
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
