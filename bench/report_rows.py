"""What a benchmark report shows of its records: hardware labels, engine keys and
labels, the newest record per engine and batch, and the formatted cells of a table row."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from enginekit.errors import InputError

NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile")
MISSING = "-"

TABLE_HEADERS = (
    "engine", "backend", "device", "method", "p50 ms", "p90 ms", "p99 ms",
    "img/s", "load ms", "first inf. ms", "peak RSS MB", "size MB",
    "top-1 agree", "cosine", "fidelity vs", "judged on", "speed-up",
)
#: The words a record's ``fidelity.reference`` is shown as.
REFERENCES = {"pytorch": "PyTorch", "pytorch eager fp32": "PyTorch", "float parent": "float parent"}


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


def fmt_num(value: Any, digits: int, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or isinstance(value, bool):
        return MISSING
    try:
        x = float(value) / scale
    except (TypeError, ValueError):
        return MISSING
    if not math.isfinite(x):
        return MISSING
    return f"{x:.{digits}f}{suffix}"


def short_cpu(model: str) -> str:
    text = re.sub(r"\((R|TM|tm|r)\)", "", model or "")
    text = re.sub(r"@.*$", "", text)
    text = re.sub(r"\b(CPU|Processor|\d+-Core)\b", "", text)
    text = re.sub(r"\bIntel\s+|\bAMD\s+", "", text)
    return " ".join(text.split()) or "unknown CPU"


def short_gpu(name: str) -> str:
    text = re.sub(r"^NVIDIA\s+", "", name or "")
    return " ".join(text.split())


def hw_label(hw: dict[str, Any]) -> str:
    """A short label for plot titles and matrix columns."""
    gpus = [short_gpu(g.get("name", "")) for g in hw.get("gpus") or [] if g.get("name")]
    label = short_cpu(hw.get("cpu_model", ""))
    if gpus:
        label += " + " + gpus[0] + (f" ×{len(gpus)}" if len(gpus) > 1 else "")
    return label


def hw_description(hw: dict[str, Any]) -> str:
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

def engine_key(rec: dict[str, Any]) -> tuple[str, str, str, str]:
    e = rec.get("engine") or {}
    return (str(e.get("name", "?")), str(e.get("backend", "?")),
            str(e.get("device", "?")), str(e.get("method", "?")))


def engine_labels(keys: Iterable[tuple[str, str, str, str]]) -> dict[tuple, str]:
    """``name [method]``, with backend/device added only where that is ambiguous."""
    keys = sorted(set(keys))
    short = {k: f"{k[0]} [{k[3]}]" if k[3] not in k[0] else k[0] for k in keys}
    counts: dict[str, int] = defaultdict(int)
    for label in short.values():
        counts[label] += 1
    return {k: (short[k] if counts[short[k]] == 1 else f"{short[k]} {k[1]}/{k[2]}") for k in keys}


def dedupe(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Keep the newest record per (engine, batch); return the kept and the dropped count."""
    newest: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        key = (engine_key(rec), int(rec.get("batch", 1)), *pipeline_key(rec))
        old = newest.get(key)
        # ISO-8601 UTC timestamps compare correctly as strings.
        if old is None or str(rec.get("timestamp", "")) >= str(old.get("timestamp", "")):
            newest[key] = rec
    return list(newest.values()), len(records) - len(newest)


def pipeline_key(rec: dict[str, Any]) -> tuple[Any, ...]:
    """(part, height, width, steps) of a pipeline record; Nones for a classifier's."""
    return tuple(rec.get(k) for k in ("part", "height", "width", "steps"))


def p50_ms(rec: dict[str, Any]) -> float | None:
    value = (rec.get("latency_ms") or {}).get("p50")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def speedup_vs_baseline(rec: dict[str, Any], group: list[dict[str, Any]]) -> float | None:
    """The record's own speed-up; else 1.0 for a baseline; else p50 ratio to the batch's baseline."""
    if isinstance(rec.get("speedup"), (int, float)):
        return float(rec["speedup"])
    if rec.get("baseline"):
        return 1.0
    p50 = p50_ms(rec)
    for other in group:
        if (other.get("baseline") and other.get("batch") == rec.get("batch") and other.get("model") == rec.get("model")
                and pipeline_key(other) == pipeline_key(rec)):
            base = p50_ms(other)
            if base and p50:
                return base / p50
    return None


def fidelity_value(rec: dict[str, Any], name: str) -> float | None:
    value = (rec.get("fidelity") or {}).get(name)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def reference_name(rec: dict[str, Any]) -> str | None:
    """What the record's fidelity numbers compare against: "float parent", "PyTorch", another name, or None."""
    if rec.get("baseline"):
        return None
    ref = (rec.get("fidelity") or {}).get("reference")
    if not ref:
        return None
    return REFERENCES.get(str(ref).lower(), str(ref))


def fidelity_budget(rec: dict[str, Any], metric: str) -> float | None:
    """The record's own fidelity budget for ``metric`` (``logits_cosine`` or ``top1_agreement``), if recorded."""
    budget = (rec.get("fidelity") or {}).get("budget")
    key = {"logits_cosine": "min_cosine", "top1_agreement": "min_agreement"}[metric]
    value = budget.get(key) if isinstance(budget, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


DATA_NAMES = (("photos", "photo crops"), ("patterns", "patterns"), ("synthetic", "seeded noise"),
               ("seeded normal noise", "seeded noise"), ("builtin:digits", "built-in digits"),
               ("folder:", "image folder"), ("npy:", ".npy"))


def judged_on(rec: dict[str, Any]) -> str | None:
    """The data the record's fidelity was measured on, in short ("photo crops + patterns", "seeded noise")."""
    fid = rec.get("fidelity") or {}
    data = fid.get("data") or fid.get("inputs")
    if not data or rec.get("baseline"):
        return None

    def short(part: str) -> str:
        return next((name for key, name in DATA_NAMES if part.startswith(key)), part)

    return " + ".join(short(p.strip()) for p in str(data).split(" + "))


def own_rss(rec: dict[str, Any]) -> Any:
    """Peak RSS only where it is the engine's own (timed in a process of its own)."""
    return rec.get("peak_rss_bytes") if (rec.get("conditions") or {}).get("own_process") else None


def table_row(rec: dict[str, Any], group: list[dict[str, Any]]) -> list[str]:
    e = rec.get("engine") or {}
    lat = rec.get("latency_ms") or {}
    name = str(e.get("name", "?")) + (" (baseline)" if rec.get("baseline") else "")
    return [
        name, e.get("backend"), e.get("device"), e.get("method"),
        fmt_num(lat.get("p50"), 2), fmt_num(lat.get("p90"), 2), fmt_num(lat.get("p99"), 2),
        fmt_num(rec.get("throughput_ips"), 1), fmt_num(rec.get("load_ms"), 1),
        fmt_num(rec.get("first_inference_ms"), 1),
        fmt_num(own_rss(rec), 1, 1e6), fmt_num(rec.get("size_bytes"), 1, 1e6),
        fmt_num(fidelity_value(rec, "top1_agreement"), 4), fmt_num(fidelity_value(rec, "logits_cosine"), 6),
        reference_name(rec), judged_on(rec),
        fmt_num(speedup_vs_baseline(rec, group), 2, suffix="×"),
    ]


def sort_key(rec: dict[str, Any]) -> tuple[float, str]:
    p50 = p50_ms(rec)
    return (p50 if p50 is not None else math.inf, engine_key(rec)[0])
