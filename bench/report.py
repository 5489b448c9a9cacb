"""Benchmark reports: markdown tables and PNG plots, per hardware and across hardware.

Input is a list of benchmark records (one dict per row, as the results store
reads them from JSON lines). :func:`write_report` groups them by
``hardware_id``, keeps the newest record for each engine and batch size, and
writes ``report.md`` with the plots beside it, linked relatively.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from enginekit.artifact import atomic_folder
from enginekit.bench.report_plots import plot_latency_vs_batch, plot_matrix, plot_speedup_vs_fidelity, pyplot
from enginekit.bench.report_rows import (
    TABLE_HEADERS,
    dedupe,
    engine_key,
    engine_labels,
    fmt_num,
    hw_description,
    hw_label,
    own_rss,
    p50_ms,
    pipeline_key,
    reference_name,
    render_markdown_table,
    sort_key,
    speedup_vs_baseline,
    table_row,
)
from enginekit.errors import InputError

__all__ = ["render_markdown_table", "write_report"]

REPORT_NAME = "report.md"


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
    plt = pyplot() if plots else None
    out_dir = Path(out_dir)

    by_hw: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        by_hw[str(rec.get("hardware_id", "unknown"))].append(rec)
    hw_info = {hw: max(recs, key=lambda r: str(r.get("timestamp", ""))).get("hardware") or {}
               for hw, recs in by_hw.items()}
    hw_labels = {hw: hw_label(info) for hw, info in hw_info.items()}
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
            kept, dropped = dedupe(by_hw[hw])
            # Pipeline parts get their own tables; the plots and the matrix are about classifiers.
            kept_by_hw[hw] = [r for r in kept if r.get("part") is None]
            md += [f"## {hw_labels[hw]} (`{hw}`)", "", hw_description(hw_info[hw]), ""]
            if dropped:
                md += [(f"{dropped} older record(s) for the same engine and batch size were "
                       "replaced by the newest run."), ""]
            md += _pipeline_sections([r for r in kept if r.get("part") is not None])
            md += _classifier_section(plt, kept_by_hw[hw], hw, hw_labels[hw], tmp, files)

        if sum(1 for recs in kept_by_hw.values() if recs) >= 2:
            md += _across_hardware(plt, {hw: r for hw, r in kept_by_hw.items() if r}, hw_labels, tmp, files)

        (tmp / REPORT_NAME).write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")

    result = {REPORT_NAME: out_dir / REPORT_NAME}
    result.update({name: out_dir / name for name in files})
    return result


def _classifier_section(plt: Any, recs: list[dict[str, Any]], hw: str, label: str, tmp: Path,
                        files: list[str]) -> list[str]:
    """One hardware's classifier tables (one per batch size), their notes and, with ``plt``, two plots
    (written into ``tmp``, their names appended to ``files``)."""
    if not recs:
        return []
    md: list[str] = []
    labels = engine_labels(engine_key(r) for r in recs)
    for batch in sorted({int(r.get("batch", 1)) for r in recs}):
        rows = sorted((r for r in recs if int(r.get("batch", 1)) == batch), key=sort_key)
        threads = sorted({r.get("threads") for r in rows if r.get("threads") is not None})
        note = f" ({', '.join(map(str, threads))} thread(s))" if threads else ""
        md += [f"### Batch {batch}{note}", "",
               render_markdown_table(TABLE_HEADERS, [table_row(r, recs) for r in rows])]
    md += _table_notes(recs)
    if plt is None:
        return md

    lat_name = f"latency-vs-batch-{hw}.png"
    plot_latency_vs_batch(plt, recs, labels, label, tmp / lat_name)
    fid_name = f"speedup-vs-fidelity-{hw}.png"
    metric = plot_speedup_vs_fidelity(plt, recs, recs, labels, label, tmp / fid_name)
    files += [lat_name, fid_name]
    md += [f"![p50 latency vs batch size]({lat_name})", "",
           f"![speed-up vs fidelity]({fid_name})", ""]
    if metric != "logits_cosine":
        md += [("Speed-up is plotted against top-1 agreement: no engine recorded a "
               "logits cosine."), ""]
    return md


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
            groups[(engine_key(rec), rec.get("model"), rec.get("height"), rec.get("width"), rec.get("steps"))].append(rec)
    md: list[str] = []
    for (key, model, height, width, steps), rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
        table = []
        for rec in sorted(rows, key=lambda r: _part_order(str(r["part"]))):
            lat = rec.get("latency_ms") or {}
            base = [o for o in recs if o.get("baseline") and o.get("model") == model
                    and pipeline_key(o) == pipeline_key(rec) and o.get("batch") == rec.get("batch")]
            table.append([rec["part"], rec.get("batch"), fmt_num(lat.get("p50"), 1), fmt_num(lat.get("p90"), 1),
                          rec.get("runs"), fmt_num(p50_ms(base[-1]) if base else None, 1),
                          fmt_num(speedup_vs_baseline(rec, recs), 2, suffix="×"), fmt_num(rec.get("load_ms"), 0),
                          fmt_num(rec.get("first_inference_ms"), 1), fmt_num(rec.get("size_bytes"), 1, 1e6)])
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
    if any(r.get("peak_rss_bytes") for r in recs) and not all(own_rss(r) for r in recs if r.get("peak_rss_bytes")):
        notes.append("Peak RSS is shown only for engines timed in a process of their own (`enginekit bench` "
                     "does that); a shared process's high-water mark is not an engine's.")
    if any(reference_name(r) for r in recs):
        notes.append("Fidelity columns compare each engine with the reference named in *fidelity vs*, on the data "
                     "named in *judged on*.")
    for r in recs:
        c = r.get("conditions") or {}
        drift = c.get("drift")
        if r.get("baseline") and isinstance(drift, (int, float)) and abs(drift - 1) > DRIFT_WARN:
            p = c.get("baseline_p50_ms") or {}
            notes.append(f"**The machine's speed moved during the batch-{r.get('batch')} run**: PyTorch p50 "
                         f"{fmt_num(p.get('before'), 2)} ms before the engines, {fmt_num(p.get('after'), 2)} ms after; "
                         "speed-ups divide by the faster.")
    return [*(f"{n}\n" for n in notes)] if notes else []


def _across_hardware(plt, kept_by_hw, hw_labels, tmp: Path, files: list[str]) -> list[str]:
    """The matrix section: engine (name + method) × hardware, batch-1 p50 and speed-up."""
    cells: dict[tuple[str, str], tuple[float, float | None]] = {}
    for hw, recs in kept_by_hw.items():
        for rec in recs:
            if int(rec.get("batch", 1)) != 1 or p50_ms(rec) is None:
                continue
            e = rec.get("engine") or {}
            name, method = str(e.get("name", "?")), str(e.get("method", "?"))
            row = name if method in name else f"{name} [{method}]"
            key = (row, hw_labels[hw])
            # Several backends of one engine on one box: show the fastest.
            if key not in cells or p50_ms(rec) < cells[key][0]:
                cells[key] = (p50_ms(rec), speedup_vs_baseline(rec, recs))
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
        plot_matrix(plt, rows, columns, cells, tmp / name)
        files.append(name)
    return ["## Across hardware", "",
            ("Batch-1 p50 latency in ms (speed-up vs that hardware's baseline in parentheses); "
            "where an engine ran on several backends of one machine, the fastest is shown."), "",
            render_markdown_table(["engine"] + columns, table),
            *([f"![batch-1 p50 by engine and hardware]({name})"] if plt is not None else []), ""]
