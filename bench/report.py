"""Benchmark reports: markdown tables and PNG plots, per hardware and across hardware.

Input is a list of benchmark records (one dict per row, as the results store
reads them from JSON lines). :func:`write_report` groups them by
``hardware_id``, keeps the newest record for each engine and batch size, and
writes ``report.md`` with the plots beside it, linked relatively.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from enginekit.artifact import atomic_folder
from enginekit.errors import EngineKitError, InputError

__all__ = ["render_markdown_table", "write_report"]

REPORT_NAME = "report.md"
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile")
DPI = 120
MISSING = "-"

TABLE_HEADERS = (
    "engine", "backend", "device", "method", "p50 ms", "p90 ms", "p99 ms",
    "img/s", "load ms", "first inf. ms", "peak RSS MB", "size MB",
    "top-1 agree", "cosine", "fidelity vs", "judged on", "speed-up",
)
#: The words a record's ``fidelity.reference`` is shown as.
REFERENCES = {"pytorch": "PyTorch", "pytorch eager fp32": "PyTorch", "float parent": "float parent"}


# ---------------------------------------------------------------- formatting

def render_markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Render a GitHub-flavoured markdown table; ``None`` cells print as ``-``.

    Pipes inside cells are escaped so a name cannot split a column.
    """
    def cell(value: Any) -> str:
        text = MISSING if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    head = [cell(h) for h in headers]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [cell(v) for v in row]
        if len(cells) != len(head):
            raise InputError(f"table row has {len(cells)} cells, headers have {len(head)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value: Any, digits: int, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or isinstance(value, bool):
        return MISSING
    try:
        x = float(value) / scale
    except (TypeError, ValueError):
        return MISSING
    if not math.isfinite(x):
        return MISSING
    return f"{x:.{digits}f}{suffix}"


def _short_cpu(model: str) -> str:
    text = re.sub(r"\((R|TM|tm|r)\)", "", model or "")
    text = re.sub(r"@.*$", "", text)
    text = re.sub(r"\b(CPU|Processor|\d+-Core)\b", "", text)
    text = re.sub(r"\bIntel\s+|\bAMD\s+", "", text)
    return " ".join(text.split()) or "unknown CPU"


def _short_gpu(name: str) -> str:
    text = re.sub(r"^NVIDIA\s+", "", name or "")
    return " ".join(text.split())


def _hw_label(hw: dict[str, Any]) -> str:
    """A short label for plot titles and matrix columns."""
    gpus = [_short_gpu(g.get("name", "")) for g in hw.get("gpus") or [] if g.get("name")]
    label = _short_cpu(hw.get("cpu_model", ""))
    if gpus:
        label += " + " + gpus[0] + (f" ×{len(gpus)}" if len(gpus) > 1 else "")
    return label


def _hw_description(hw: dict[str, Any]) -> str:
    """One line: CPU model, cores, notable ISA flags, memory, GPUs, OS."""
    parts = [hw.get("cpu_model") or "unknown CPU"]
    phys, logi = hw.get("physical_cores"), hw.get("logical_cores")
    if phys or logi:
        parts.append(f"{phys or '?'} cores / {logi or '?'} threads")
    flags = set(hw.get("flags") or [])
    notable = [f for f in NOTABLE_FLAGS if f in flags]
    parts.append("ISA: " + (", ".join(notable) if notable else "none of " + "/".join(NOTABLE_FLAGS)))
    if hw.get("memory_bytes"):
        parts.append(f"{hw['memory_bytes'] / 2**30:.0f} GiB RAM")
    for gpu in hw.get("gpus") or []:
        extra = ", ".join(
            f"{k} {gpu[k]}" for k in ("compute_capability", "driver") if gpu.get(k)
        )
        parts.append(f"GPU {gpu.get('name', '?')}" + (f" ({extra})" if extra else ""))
    if hw.get("os"):
        parts.append(str(hw["os"]))
    return " · ".join(parts)


# ---------------------------------------------------------------- grouping

def _engine_key(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    e = rec.get("engine") or {}
    return (str(e.get("name", "?")), str(e.get("backend", "?")),
            str(e.get("device", "?")), str(e.get("method", "?")))


def _engine_labels(keys: Iterable[tuple[str, str, str, str]]) -> dict[tuple, str]:
    """``name [method]``, with backend/device added only where that is ambiguous."""
    keys = sorted(set(keys))
    short = {k: f"{k[0]} [{k[3]}]" if k[3] not in k[0] else k[0] for k in keys}
    counts: dict[str, int] = defaultdict(int)
    for label in short.values():
        counts[label] += 1
    return {k: (short[k] if counts[short[k]] == 1 else f"{short[k]} {k[1]}/{k[2]}") for k in keys}


def _dedupe(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Keep the newest record per (engine, batch); return the kept and the dropped count."""
    newest: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        key = (_engine_key(rec), int(rec.get("batch", 1)), *_pipeline_key(rec))
        old = newest.get(key)
        # ISO-8601 UTC timestamps compare correctly as strings.
        if old is None or str(rec.get("timestamp", "")) >= str(old.get("timestamp", "")):
            newest[key] = rec
    return list(newest.values()), len(records) - len(newest)


def _pipeline_key(rec: dict[str, Any]) -> tuple[Any, ...]:
    """(part, height, width, steps) of a pipeline record; Nones for a classifier's."""
    return tuple(rec.get(k) for k in ("part", "height", "width", "steps"))


def _p50(rec: dict[str, Any]) -> float | None:
    value = (rec.get("latency_ms") or {}).get("p50")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _speedup(rec: dict[str, Any], group: list[dict[str, Any]]) -> float | None:
    """The record's own speed-up; else 1.0 for a baseline; else p50 ratio to the batch's baseline."""
    if isinstance(rec.get("speedup"), (int, float)):
        return float(rec["speedup"])
    if rec.get("baseline"):
        return 1.0
    p50 = _p50(rec)
    for other in group:
        if (other.get("baseline") and other.get("batch") == rec.get("batch") and other.get("model") == rec.get("model")
                and _pipeline_key(other) == _pipeline_key(rec)):
            base = _p50(other)
            if base and p50:
                return base / p50
    return None


def _fid(rec: dict[str, Any], name: str) -> float | None:
    value = (rec.get("fidelity") or {}).get(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _reference(rec: dict[str, Any]) -> str | None:
    """What the record's fidelity numbers compare against: "float parent", "PyTorch", another name, or None."""
    if rec.get("baseline"):
        return None
    ref = (rec.get("fidelity") or {}).get("reference")
    if not ref:
        return None
    return REFERENCES.get(str(ref).lower(), str(ref))


def _budget(rec: dict[str, Any], metric: str) -> float | None:
    """The record's own fidelity budget for ``metric`` (``logits_cosine`` or ``top1_agreement``), if recorded."""
    budget = (rec.get("fidelity") or {}).get("budget")
    key = {"logits_cosine": "min_cosine", "top1_agreement": "min_agreement"}[metric]
    value = budget.get(key) if isinstance(budget, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


_DATA_NAMES = (("photos", "photo crops"), ("patterns", "patterns"), ("synthetic", "seeded noise"),
               ("seeded normal noise", "seeded noise"), ("builtin:digits", "built-in digits"),
               ("folder:", "image folder"), ("npy:", ".npy"))


def _judged_on(rec: dict[str, Any]) -> str | None:
    """The data the record's fidelity was measured on, in short ("photo crops + patterns", "seeded noise")."""
    fid = rec.get("fidelity") or {}
    data = fid.get("data") or fid.get("inputs")
    if not data or rec.get("baseline"):
        return None

    def short(part: str) -> str:
        return next((name for key, name in _DATA_NAMES if part.startswith(key)), part)

    return " + ".join(short(p.strip()) for p in str(data).split(" + "))


def _own_rss(rec: dict[str, Any]) -> Any:
    """Peak RSS only where it is the engine's own (timed in a process of its own)."""
    return rec.get("peak_rss_bytes") if (rec.get("conditions") or {}).get("own_process") else None


def _table_row(rec: dict[str, Any], group: list[dict[str, Any]]) -> list[str]:
    e = rec.get("engine") or {}
    lat = rec.get("latency_ms") or {}
    name = str(e.get("name", "?")) + (" (baseline)" if rec.get("baseline") else "")
    return [
        name, e.get("backend"), e.get("device"), e.get("method"),
        _num(lat.get("p50"), 2), _num(lat.get("p90"), 2), _num(lat.get("p99"), 2),
        _num(rec.get("throughput_ips"), 1), _num(rec.get("load_ms"), 1),
        _num(rec.get("first_inference_ms"), 1),
        _num(_own_rss(rec), 1, 1e6), _num(rec.get("size_bytes"), 1, 1e6),
        _num(_fid(rec, "top1_agreement"), 4), _num(_fid(rec, "logits_cosine"), 6),
        _reference(rec), _judged_on(rec),
        _num(_speedup(rec, group), 2, suffix="×"),
    ]


def _sort_key(rec: dict[str, Any]) -> tuple[float, str]:
    p50 = _p50(rec)
    return (p50 if p50 is not None else math.inf, _engine_key(rec)[0])


# ---------------------------------------------------------------- plots

def _pyplot():
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


def _plot_latency_vs_batch(plt, recs, labels, hw_label: str, path: Path) -> None:
    series: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for rec in recs:
        if _p50(rec) is not None:
            series[_engine_key(rec)].append((int(rec["batch"]), _p50(rec)))
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


def _plot_speedup_vs_fidelity(plt, recs, group, labels, hw_label: str, path: Path) -> str:
    """Plot batch-1 speed-up against fidelity; return the x metric used."""
    from matplotlib.ticker import MaxNLocator

    batches = sorted({int(r["batch"]) for r in recs})
    batch = 1 if 1 in batches else batches[0]
    at_batch = [r for r in recs if int(r["batch"]) == batch]
    others = [r for r in at_batch if not r.get("baseline")]
    metric = ("logits_cosine" if any(_fid(r, "logits_cosine") is not None for r in others)
              else "top1_agreement")
    refs = {_reference(r) for r in others if _fid(r, metric) is not None}
    refs.discard(None)
    what = "logits cosine" if metric == "logits_cosine" else "top-1 agreement"
    # Each engine's numbers are against its own reference: PyTorch (export, optimize) or
    # its float parent (quantize). One reference names the axis; several get a marker each.
    xlabel = f"{what} vs {refs.pop()}" if len(refs) == 1 else f"{what} vs each engine's reference (marker)"
    markers = {"PyTorch": "^", "float parent": "o"}
    points = [(labels[_engine_key(r)], _fid(r, metric), _speedup(r, group), _reference(r), _budget(r, metric))
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


def _plot_matrix(plt, rows, columns, cells, path: Path) -> None:
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


# ---------------------------------------------------------------- report

def write_report(records: list[dict[str, Any]], out_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    """Write ``report.md`` and its PNG plots into ``out_dir``; return ``{file name: path}``.

    ``plots=False`` writes the tables alone and never imports matplotlib (an edge box
    without it can still report).

    The folder is replaced atomically (an existing ``out_dir`` is overwritten).
    One section per ``hardware_id`` with a table per pipeline engine and size (its
    component, step and image rows; :mod:`enginekit.bench.pipeline`), and for classifiers
    a table per batch size and two plots;
    an "Across hardware" matrix when two or more hardware ids are present.
    """
    if not records:
        raise InputError("no benchmark records to report; run a benchmark first")
    plt = _pyplot() if plots else None
    out_dir = Path(out_dir)

    by_hw: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        by_hw[str(rec.get("hardware_id", "unknown"))].append(rec)
    hw_info = {hw: max(recs, key=lambda r: str(r.get("timestamp", ""))).get("hardware") or {}
               for hw, recs in by_hw.items()}
    hw_labels = {hw: _hw_label(info) for hw, info in hw_info.items()}
    if len(set(hw_labels.values())) < len(hw_labels):
        hw_labels = {hw: f"{label} ({hw[:6]})" for hw, label in hw_labels.items()}

    files: list[str] = []
    md: list[str] = ["# Benchmark report", ""]
    timestamps = sorted(str(r.get("timestamp", "")) for r in records)
    md.append(f"{len(records)} records from {len(by_hw)} hardware configuration(s), "
              f"{timestamps[0]} to {timestamps[-1]}.")
    md.append("")

    kept_by_hw: dict[str, list[dict[str, Any]]] = {}
    with atomic_folder(out_dir, overwrite=True, marker=REPORT_NAME) as tmp:
        for hw in sorted(by_hw, key=lambda h: hw_labels[h]):
            kept, dropped = _dedupe(by_hw[hw])
            # Pipeline parts get their own tables; the plots and the matrix are about classifiers.
            recs = [r for r in kept if r.get("part") is None]
            pipes = [r for r in kept if r.get("part") is not None]
            kept_by_hw[hw] = recs
            labels = _engine_labels(_engine_key(r) for r in recs)
            md += [f"## {hw_labels[hw]} (`{hw}`)", "", _hw_description(hw_info[hw]), ""]
            if dropped:
                md += [(f"{dropped} older record(s) for the same engine and batch size were "
                       "replaced by the newest run."), ""]
            md += _pipeline_sections(pipes)
            if not recs:
                continue
            for batch in sorted({int(r.get("batch", 1)) for r in recs}):
                rows = sorted((r for r in recs if int(r.get("batch", 1)) == batch), key=_sort_key)
                threads = sorted({r.get("threads") for r in rows if r.get("threads") is not None})
                note = f" ({', '.join(map(str, threads))} thread(s))" if threads else ""
                md += [f"### Batch {batch}{note}", "",
                       render_markdown_table(TABLE_HEADERS, [_table_row(r, recs) for r in rows])]
            md += _table_notes(recs)
            if plt is None:
                continue

            lat_name = f"latency-vs-batch-{hw}.png"
            _plot_latency_vs_batch(plt, recs, labels, hw_labels[hw], tmp / lat_name)
            fid_name = f"speedup-vs-fidelity-{hw}.png"
            metric = _plot_speedup_vs_fidelity(plt, recs, recs, labels, hw_labels[hw],
                                               tmp / fid_name)
            files += [lat_name, fid_name]
            md += [f"![p50 latency vs batch size]({lat_name})", "",
                   f"![speed-up vs fidelity]({fid_name})", ""]
            if metric != "logits_cosine":
                md += [("Speed-up is plotted against top-1 agreement: no engine recorded a "
                       "logits cosine."), ""]

        if sum(1 for recs in kept_by_hw.values() if recs) >= 2:
            md += _across_hardware(plt, {hw: r for hw, r in kept_by_hw.items() if r}, hw_labels, tmp, files)

        (tmp / REPORT_NAME).write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")

    result = {REPORT_NAME: out_dir / REPORT_NAME}
    result.update({name: out_dir / name for name in files})
    return result


PIPELINE_HEADERS = ("part", "rows", "p50 ms", "p90 ms", "runs", "PyTorch p50 ms", "speed-up", "load ms",
                    "first inf. ms", "size MB")


def _part_order(part: str) -> tuple[int, str]:
    rank = {"component:text_encoder": 0, "component:text_encoder_2": 1, "component:text_encoder_3": 2, "component:unet": 2, "component:transformer": 2,
            "component:vae_decoder": 3, "component:vae_encoder": 4, "step": 5, "image": 6}
    return (rank.get(part, 4), part)


def _pipeline_sections(recs: list[dict[str, Any]]) -> list[str]:
    """A table per benched pipeline engine and size: its component, step and image rows
    beside the PyTorch baseline of the same part."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for rec in recs:
        if not rec.get("baseline"):
            groups[(_engine_key(rec), rec.get("model"), rec.get("height"), rec.get("width"), rec.get("steps"))].append(rec)
    md: list[str] = []
    for (key, model, height, width, steps), rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        table = []
        for rec in sorted(rows, key=lambda r: _part_order(str(r["part"]))):
            lat = rec.get("latency_ms") or {}
            base = [o for o in recs if o.get("baseline") and o.get("model") == model
                    and _pipeline_key(o) == _pipeline_key(rec) and o.get("batch") == rec.get("batch")]
            table.append([rec["part"], rec.get("batch"), _num(lat.get("p50"), 1), _num(lat.get("p90"), 1),
                          rec.get("runs"), _num(_p50(base[-1]) if base else None, 1),
                          _num(_speedup(rec, recs), 2, suffix="×"), _num(rec.get("load_ms"), 0),
                          _num(rec.get("first_inference_ms"), 1), _num(rec.get("size_bytes"), 1, 1e6)])
        threads = sorted({r.get("threads") for r in rows if r.get("threads") is not None})
        md += [f"### {key[0]} ({key[1]}/{key[2]}, {key[3]}): {width}×{height}, {steps} steps"
               + (f", {', '.join(map(str, threads))} thread(s)" if threads else ""), "",
               render_markdown_table(PIPELINE_HEADERS, table)]
        peak = max((r.get("peak_rss_bytes") or 0 for r in rows), default=0)
        image = next((r for r in rows if r["part"] == "image"), None)
        fid = (image or {}).get("fidelity") or {}
        notes = [f"model `{model}`"] + ([f"peak RSS {peak / 1e6:.0f} MB"] if peak else [])
        if "image_max_abs" in fid:
            notes.append(f"image vs PyTorch (same latents, pixels in [0, 1]): max abs {fid['image_max_abs']:.2g}, "
                         f"mean abs {fid['image_mean_abs']:.2g}")
        md += ["; ".join(notes) + ".", ""]
    return md


def _table_notes(recs: list[dict[str, Any]]) -> list[str]:
    """What the classifier tables' columns rest on: peak memory, references, drift of the baseline."""
    from enginekit.bench.harness import DRIFT_WARN

    notes = []
    if any(r.get("peak_rss_bytes") for r in recs) and not all(_own_rss(r) for r in recs if r.get("peak_rss_bytes")):
        notes.append("Peak RSS is shown only for engines timed in a process of their own (`enginekit bench` "
                     "does that); a shared process's high-water mark is not an engine's.")
    if any(_reference(r) for r in recs):
        notes.append("Fidelity columns compare each engine with the reference named in *fidelity vs*, on the data "
                     "named in *judged on*.")
    for r in recs:
        c = r.get("conditions") or {}
        drift = c.get("drift")
        if r.get("baseline") and isinstance(drift, (int, float)) and abs(drift - 1) > DRIFT_WARN:
            p = c.get("baseline_p50_ms") or {}
            notes.append(f"**The machine's speed moved during the batch-{r.get('batch')} run**: PyTorch p50 "
                         f"{_num(p.get('before'), 2)} ms before the engines, {_num(p.get('after'), 2)} ms after; "
                         "speed-ups divide by the faster.")
    return [*(f"{n}\n" for n in notes)] if notes else []


def _across_hardware(plt, kept_by_hw, hw_labels, tmp: Path, files: list[str]) -> list[str]:
    """The matrix section: engine (name + method) × hardware, batch-1 p50 and speed-up."""
    cells: dict[tuple[str, str], tuple[float, float | None]] = {}
    for hw, recs in kept_by_hw.items():
        for rec in recs:
            if int(rec.get("batch", 1)) != 1 or _p50(rec) is None:
                continue
            e = rec.get("engine") or {}
            name, method = str(e.get("name", "?")), str(e.get("method", "?"))
            row = name if method in name else f"{name} [{method}]"
            key = (row, hw_labels[hw])
            # Several backends of one engine on one box: show the fastest.
            if key not in cells or _p50(rec) < cells[key][0]:
                cells[key] = (_p50(rec), _speedup(rec, recs))
    columns = [hw_labels[hw] for hw in sorted(kept_by_hw, key=lambda h: hw_labels[h])]
    rows = sorted({r for r, _ in cells},
                  key=lambda r: min(v[0] for (rr, _), v in cells.items() if rr == r))
    table = []
    for row in rows:
        line = [row]
        for col in columns:
            if (row, col) not in cells:
                line.append(None)
                continue
            p50, speedup = cells[(row, col)]
            line.append(f"{p50:.2f}" + (f" ({speedup:.2f}×)" if speedup is not None else ""))
        table.append(line)
    name = "matrix-batch1.png"
    if plt is not None:
        _plot_matrix(plt, rows, columns, cells, tmp / name)
        files.append(name)
    return ["## Across hardware", "",
            ("Batch-1 p50 latency in ms (speed-up vs that hardware's baseline in parentheses); "
            "where an engine ran on several backends of one machine, the fastest is shown."), "",
            render_markdown_table(["engine"] + columns, table),
            *([f"![batch-1 p50 by engine and hardware]({name})"] if plt is not None else []), ""]
