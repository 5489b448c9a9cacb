"""The PNG plots of a benchmark report (matplotlib, imported only when plots are asked for):
latency against batch size, speed-up against fidelity, and the across-hardware matrix."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from enginekit.bench.report_rows import (
    engine_key,
    fidelity_budget,
    fidelity_value,
    p50_ms,
    reference_name,
    speedup_vs_baseline,
)
from enginekit.errors import EngineKitError

DPI = 120


def pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise EngineKitError(
            "benchmark plots need matplotlib; install it with `pip install enginekit[bench]`, "
            "or write the tables alone with --no-plots"
        ) from exc
    # Set here, not at import: importing this module must not change global state.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.tick_params(labelsize=9)
    ax.grid(True, which="major", alpha=0.3)


def _log_y(ax) -> None:
    """Log y axis with plain-number ticks at 1-2-5 steps, readable without decoding 10^x."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _legend(ax, n: int) -> None:
    if n > 6:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=9, loc="best")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def plot_latency_vs_batch(plt, recs, labels, hw_label: str, path: Path) -> None:
    series: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for rec in recs:
        if p50_ms(rec) is not None:
            series[engine_key(rec)].append((int(rec["batch"]), p50_ms(rec)))
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        values = [v for pts in series.values() for _, v in pts]
        markers = "osD^v<>ph*X"
        for i, key in enumerate(sorted(series, key=lambda k: labels[k])):
            pts = sorted(series[key])
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker=markers[i % len(markers)],
                    linewidth=1.6, markersize=6, label=labels[key])
        if values and min(values) > 0 and max(values) / min(values) > 10:
            _log_y(ax)
        batches = sorted({b for pts in series.values() for b, _ in pts})
        if len(batches) > 1 and batches[-1] / max(batches[0], 1) > 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.minorticks_off()
        _style(ax, f"p50 latency vs batch size — {hw_label}", "batch size", "p50 latency (ms)")
        if series:
            _legend(ax, len(series))
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_speedup_vs_fidelity(plt, recs, group, labels, hw_label: str, path: Path) -> str:
    """Plot batch-1 speed-up against fidelity; return the x metric used."""
    from matplotlib.ticker import MaxNLocator

    batches = sorted({int(r["batch"]) for r in recs})
    batch = 1 if 1 in batches else batches[0]
    at_batch = [r for r in recs if int(r["batch"]) == batch]
    others = [r for r in at_batch if not r.get("baseline")]
    metric = ("logits_cosine" if any(fidelity_value(r, "logits_cosine") is not None for r in others)
              else "top1_agreement")
    refs = {reference_name(r) for r in others if fidelity_value(r, metric) is not None}
    refs.discard(None)
    what = "logits cosine" if metric == "logits_cosine" else "top-1 agreement"
    # Each engine's numbers are against its own reference: PyTorch (export, optimize) or
    # its float parent (quantize). One reference names the axis; several get a marker each.
    xlabel = f"{what} vs {refs.pop()}" if len(refs) == 1 else f"{what} vs each engine's reference (marker)"
    markers = {"PyTorch": "^", "float parent": "o"}
    points = [(labels[engine_key(r)], fidelity_value(r, metric), speedup_vs_baseline(r, group), reference_name(r),
               fidelity_budget(r, metric))
              for r in others]
    points = [p for p in points if p[1] is not None and p[2] is not None]

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        ax.scatter([1.0], [1.0], marker="*", s=220, color="black", zorder=3, label="baseline")
        ax.annotate("baseline", (1.0, 1.0), xytext=(-10, -14), textcoords="offset points",
                    fontsize=9, ha="right")
        points.sort(key=lambda p: (p[1], p[2]))
        # Few short names fit beside their points; otherwise number the points and
        # key the numbers in a legend, so long or crowded labels never overlap.
        direct = len(points) <= 4 and all(len(n) <= 28 for n, *_ in points)
        mixed = len({p[3] for p in points}) > 1
        for i, (name, x, y, ref, _) in enumerate(points, start=1):
            tag = f" (vs {ref or 'unrecorded'})" if mixed else ""
            ax.scatter([x], [y], s=60, zorder=3, color=f"C{(i - 1) % 10}", marker=markers.get(ref, "s"),
                       label=None if direct and not mixed else f"{i}: {name}{tag}")
            text, dy = (name, 8 if i % 2 else -14) if direct else (str(i), 6)
            ax.annotate(text, (x, y), xytext=(-6, dy), textcoords="offset points",
                        fontsize=9, ha="right")
        xs = [1.0] + [x for _, x, *_ in points]
        # Each engine's own budget, one dashed line per distinct value, named after its engines.
        budgets: dict[float, list[str]] = defaultdict(list)
        for name, _, _, _, budget in points:
            if budget is not None:
                budgets[budget].append(name)
        for j, (budget, names) in enumerate(sorted(budgets.items())):
            xs.append(budget)
            ax.axvline(budget, linestyle="--", color="tab:red", linewidth=1.2, alpha=0.8)
            whose = "budget" if len(budgets) == 1 else "budget of " + ", ".join(names)
            ax.annotate(f"{whose} ({budget:g})", (budget, 1.0 - 0.3 * (j % 3)),
                        xycoords=("data", "axes fraction"), xytext=(-4, -6),
                        textcoords="offset points", rotation=90, ha="right", va="top",
                        fontsize=8, color="tab:red")
        lo, hi = min(xs), max(xs)
        pad = max((hi - lo) * 0.15, 1e-4)
        # Labels hang to the left of their points; leave room for them there.
        ax.set_xlim(lo - (2.5 if direct else 1.0) * pad, hi + pad)
        ax.ticklabel_format(axis="x", useOffset=False)
        ys = [1.0] + [y for _, _, y, *_ in points]
        ax.set_ylim(0, max(ys) * 1.2)
        _style(ax, f"speed-up vs fidelity at batch {batch} — {hw_label}", xlabel,
               "speed-up vs baseline (×)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        if not direct or mixed:  # direct labels need no key; the baseline star is labelled too
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        _save(fig, path)
    finally:
        plt.close(fig)
    return metric


def plot_matrix(plt, rows, columns, cells, path: Path) -> None:
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows) * max(1, len(columns)) / 2 + 3), 5))
    try:
        width = 0.8 / max(1, len(columns))
        x = np.arange(len(rows))
        values = []
        for j, col in enumerate(columns):
            ys = [cells.get((r, col), (None, None))[0] for r in rows]
            ok = [i for i, v in enumerate(ys) if v is not None]
            values += [ys[i] for i in ok]
            ax.bar(x[ok] + (j - (len(columns) - 1) / 2) * width, [ys[i] for i in ok],
                   width=width, label=col)
        if values and min(values) > 0 and max(values) / min(values) > 10:
            _log_y(ax)
        ax.set_xticks(x)
        ax.set_xticklabels(rows, rotation=30, ha="right", fontsize=9)
        _style(ax, "batch-1 p50 latency by engine and hardware", "engine", "p50 latency (ms)")
        ax.grid(False, axis="x")
        _legend(ax, len(columns))
        _save(fig, path)
    finally:
        plt.close(fig)
