"""Bench records: one JSON object per (engine, batch size), what describes the engine, and speed-ups.

The record's fields are described in :mod:`enginekit.bench.harness`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from enginekit.bench.timing import spread
from enginekit.hardware import fingerprint, fingerprint_id
from enginekit.manifest import Manifest

__all__ = ["FIDELITY_KEYS", "PIPELINE_KEYS", "RECORD_SCHEMA", "add_speedups", "engine_info", "make_record"]

RECORD_SCHEMA = 1


#: Fidelity numbers copied from the manifest into each record (when present).
FIDELITY_KEYS = ("top1_agreement", "logits_cosine", "logits_max_abs", "accuracy")


#: What tells apart the records of one pipeline run (absent, None, on classifier records).
PIPELINE_KEYS = ("part", "height", "width", "steps")


def engine_info(path: str | Path, manifest: Manifest, backend: str, device: str) -> dict[str, Any]:
    """The ``engine`` object of a record."""
    precisions = sorted({c.precision for c in manifest.components.values()})
    return {
        "artifact": str(path),
        "name": Path(path).name,
        "kind": manifest.kind,
        "backend": backend,
        "device": device,
        "method": (manifest.quantization or {}).get("method") or "float",
        "precision": precisions[0] if len(precisions) == 1 else ",".join(precisions),
        "manifest_sha256": manifest.digest(),
        # What the engine computes in where the backend records it (OpenVINO: f32, bf16, ...).
        "inference_precision": manifest.target.get("inference_precision_hint"),
    }


def make_record(
    *,
    engine: Mapping[str, Any],
    result: Mapping[str, Any],
    threads: int,
    hardware: Mapping[str, Any] | None = None,
    load_ms: float | None = None,
    first_inference_ms: float | None = None,
    peak_rss_bytes: int | None = None,
    size_bytes: int | None = None,
    fidelity: Mapping[str, Any] | None = None,
    baseline: bool = False,
    speedup: float | None = None,
    timestamp: str | None = None,
    model: str | None = None,
    conditions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One result record from a :func:`bench_runner` ``result`` and what is known about the engine.

    ``hardware`` defaults to this machine's :func:`fingerprint`.
    """
    hw = dict(hardware) if hardware is not None else fingerprint()
    return {
        "schema": RECORD_SCHEMA,
        "timestamp": timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hw,
        "hardware_id": fingerprint_id(hw),
        "engine": dict(engine),
        "batch": int(result["batch"]),
        "threads": int(threads),
        "latency_ms": dict(result["latency_ms"]),
        "runs": int(result["runs"]),
        "throughput_ips": float(result["throughput_ips"]),
        "load_ms": load_ms,
        "first_inference_ms": first_inference_ms,
        "peak_rss_bytes": peak_rss_bytes,
        "size_bytes": size_bytes,
        "fidelity": dict(fidelity or {}),
        "baseline": bool(baseline),
        "speedup": speedup,
        "model": model,
        "conditions": {"mode": "latency", "p99_over_p50": spread(result["latency_ms"]), **(conditions or {})},
    }


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Set ``speedup`` = baseline p50 / record p50 in place (for throughput-mode records:
    record frames/s / baseline frames/s), where a baseline record
    (``baseline`` true) of the same batch, ``hardware_id``, ``model`` and Ray node (when
    the records came from ``--ray``) exists (the last one wins). Pipeline records
    (:mod:`enginekit.bench.pipeline`) also match on ``part``, ``height``, ``width`` and ``steps``."""

    def key(rec: dict[str, Any]) -> tuple[Any, ...]:
        return (rec.get("hardware_id"), int(rec["batch"]), rec.get("model"), (rec.get("node") or {}).get("node_id"),
                *(rec.get(k) for k in PIPELINE_KEYS))

    base: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in records:
        if rec.get("baseline"):
            base[key(rec)] = rec
    for rec in records:
        ref = base.get(key(rec))
        if ref is None:
            continue
        if (rec.get("conditions") or {}).get("mode") == "throughput":
            # Frames per second with several requests in flight, over PyTorch's one at a time.
            ips, ref_ips = float(rec.get("throughput_ips") or 0), float(ref.get("throughput_ips") or 0)
            if ips > 0 and ref_ips > 0 and math.isfinite(ips):
                rec["speedup"] = ips / ref_ips
            continue
        p50, ref_p50 = float(rec["latency_ms"]["p50"]), float(ref["latency_ms"]["p50"])
        if p50 > 0 and math.isfinite(p50):
            rec["speedup"] = ref_p50 / p50
