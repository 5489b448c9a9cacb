"""Benchmark report: markdown tables and PNG plots from synthetic records."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from enginekit.bench.report import render_markdown_table, write_report
from PIL import Image

HW_A = {
    "cpu_model": "Intel(R) Xeon(R) Platinum 8480+ @ 2.0GHz", "logical_cores": 16,
    "physical_cores": 8, "flags": ["sse4_2", "avx2", "avx512f", "avx512_vnni", "amx_tile"],
    "memory_bytes": 64 * 2**30, "gpus": [], "os": "Linux", "versions": {"numpy": "2.0"},
}
HW_B = {
    "cpu_model": "AMD EPYC 7R13 Processor", "logical_cores": 4, "physical_cores": 2,
    "flags": ["avx2"], "memory_bytes": 16 * 2**30,
    "gpus": [{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "550"}],
    "os": "Linux", "versions": {},
}
ENGINES = {
    "torch-eager": ("pytorch", "torch", "cpu", "float", True),
    "vit-ort": ("onnxruntime", "onnxruntime", "cpu", "float", False),
    "vit-ov-int8": ("openvino", "openvino", "cpu", "int8-static", False),
}


def _record(hw_id, hw, engine, batch, p50, *, ts="2026-11-22T05:00:00Z", speedup=None,
            cosine=None, top1=None):
    kind, backend, device, method, baseline = ENGINES[engine]
    return {
        "schema": 1, "timestamp": ts, "hardware": hw, "hardware_id": hw_id,
        "engine": {"artifact": f"/a/{engine}", "name": engine, "kind": kind, "backend": backend,
                   "device": device, "method": method, "precision": "fp32",
                   "manifest_sha256": None},
        "batch": batch, "threads": 4,
        "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "mean": p50,
                       "min": p50 * 0.9, "max": p50 * 1.5, "count": 50},
        "runs": 50, "throughput_ips": 1000.0 * batch / p50, "load_ms": 120.0,
        "first_inference_ms": p50 * 3, "peak_rss_bytes": 300_000_000, "size_bytes": 22_000_000,
        "fidelity": {} if baseline else {"top1_agreement": top1, "logits_cosine": cosine},
        "baseline": baseline, "speedup": 1.0 if baseline else speedup,
    }


def _records():
    recs = []
    for hw_id, hw, scale in (("aaaaaaaaaaaa", HW_A, 1.0), ("bbbbbbbbbbbb", HW_B, 2.0)):
        for batch, bscale in ((1, 1.0), (8, 6.0)):
            base = 40.0 * scale * bscale
            recs.append(_record(hw_id, hw, "torch-eager", batch, base))
            recs.append(_record(hw_id, hw, "vit-ort", batch, base / 2, speedup=2.0,
                                cosine=0.99995, top1=1.0))
            recs.append(_record(hw_id, hw, "vit-ov-int8", batch, base / 4, speedup=4.0,
                                cosine=0.9985, top1=0.98))
    # Pin one exact value, and add an older duplicate that must not be shown.
    recs[1]["latency_ms"]["p50"] = 12.34
    recs.append(_record("aaaaaaaaaaaa", HW_A, "vit-ort", 1, 98.76, ts="2026-11-01T00:00:00Z",
                        speedup=0.4, cosine=0.99995, top1=1.0))
    return recs


def _linked_pngs(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)


def _check_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 300 and im.height > 200
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.var() > 10.0, f"{path.name} looks like a single flat colour"


def test_render_markdown_table():
    text = render_markdown_table(["a", "b"], [[1, None], ["x|y", 2.5]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | - |", "| x\\|y | 2.5 |"]


def test_render_markdown_table_rejects_ragged_rows():
    from enginekit.errors import InputError

    with pytest.raises(InputError):
        render_markdown_table(["a", "b"], [[1]])


def test_report_two_hardware(tmp_path):
    out = tmp_path / "report"
    files = write_report(_records(), out)
    report = out / "report.md"
    assert files["report.md"] == report and report.is_file()
    md = report.read_text()

    for name in ENGINES:
        assert name in md
    assert "12.34" in md
    assert "98.76" not in md and "0.40×" not in md
    assert "older record" in md
    assert "avx512_vnni" in md and "amx_tile" in md and "H100 80GB HBM3" in md
    assert "## Across hardware" in md
    across = md.split("## Across hardware", 1)[1]
    assert "Xeon Platinum 8480+" in across and "EPYC 7R13 + H100 80GB HBM3" in across
    # Fidelity sits in the same row as speed.
    row = next(line for line in md.splitlines() if line.startswith("| vit-ov-int8 "))
    assert "0.998500" in row and "4.00×" in row and "0.9800" in row

    pngs = _linked_pngs(md)
    assert {"matrix-batch1.png", "latency-vs-batch-aaaaaaaaaaaa.png",
            "speedup-vs-fidelity-bbbbbbbbbbbb.png"} <= set(pngs)
    for name in pngs:
        assert (out / name).is_file(), name
        _check_png(out / name)
    assert set(files) == {"report.md", *pngs}
    assert not list(tmp_path.glob(".report.*"))


def test_report_one_hardware_has_no_matrix(tmp_path):
    recs = [r for r in _records() if r["hardware_id"] == "bbbbbbbbbbbb"]
    for r in recs:  # top-1 only: the fidelity plot falls back to it
        r["fidelity"].pop("logits_cosine", None)
    files = write_report(recs, tmp_path / "r")
    md = files["report.md"].read_text()
    assert "Across hardware" not in md and "matrix-batch1.png" not in files
    assert "top-1 agreement" in md
    for name in _linked_pngs(md):
        _check_png(tmp_path / "r" / name)


def test_report_overwrites_and_rejects_empty(tmp_path):
    from enginekit.errors import InputError

    write_report(_records(), tmp_path / "r")
    write_report(_records()[:3], tmp_path / "r")
    assert "Across hardware" not in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(InputError):
        write_report([], tmp_path / "r")
