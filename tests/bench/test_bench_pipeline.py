"""The pipeline bench on tiny-sd15 at 64x64 with 2 steps: records for every part, the
diffusers baseline and its speed-ups, the store, the report, the CLI and static engines."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from enginekit.app.cli import cli
from enginekit.bench.harness import add_speedups, make_record
from enginekit.bench.pipeline import PipelineBenchConfig, bench_pipeline, is_pipeline
from enginekit.bench.report import write_report
from enginekit.bench.store import ResultsStore
from enginekit.errors import ShapeError

from ..conftest import installed_backends

PARTS = {"component:text_encoder", "component:unet", "component:vae_decoder", "component:vae_encoder", "step",
         "image"}
ROWS = {"component:text_encoder": 2, "component:unet": 2, "component:vae_decoder": 1, "component:vae_encoder": 1,
        "step": 1, "image": 1}
RECORD_KEYS = {"schema", "timestamp", "hardware", "hardware_id", "engine", "batch", "threads", "latency_ms", "runs",
               "throughput_ips", "load_ms", "first_inference_ms", "peak_rss_bytes", "size_bytes", "fidelity",
               "baseline", "speedup", "model", "part", "height", "width", "steps"}
FAST = PipelineBenchConfig(height=64, width=64, steps=2, warmup=1, runs=2, image_runs=1)


@pytest.fixture(scope="module")
def sd15(tiny_pipelines: dict) -> Path:
    """tiny-sd15 as the session's shared export writes it (the ONNX artifact, run on ONNX Runtime)."""
    return tiny_pipelines[("tiny-sd15", "onnx")]


@pytest.fixture(scope="module")
def with_torch(sd15: Path) -> list[dict[str, Any]]:
    """One run with the diffusers baseline, shared by the tests that read its records."""
    return bench_pipeline(sd15, FAST, baseline=True, progress=False)


def _by_part(records: list[dict[str, Any]], baseline: bool) -> dict[str, dict[str, Any]]:
    return {r["part"]: r for r in records if r["baseline"] is baseline}


def test_records_for_every_part(sd15: Path) -> None:
    assert is_pipeline(sd15)
    records = bench_pipeline(sd15, FAST, progress=False)
    ours = _by_part(records, baseline=False)
    assert set(ours) == PARTS and len(records) == len(PARTS)
    for part, rec in ours.items():
        assert RECORD_KEYS <= set(rec), part
        lat = rec["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["max"] and math.isfinite(lat["max"])
        assert rec["runs"] == lat["count"] == (1 if part == "image" else 2)
        assert rec["batch"] == ROWS[part]
        assert (rec["height"], rec["width"], rec["steps"]) == (64, 64, 2)
        assert rec["engine"]["backend"] == "onnxruntime" and rec["model"] == "tiny-sd15"
        assert rec["threads"] >= 1 and rec["hardware_id"] and rec["hardware"]
        assert rec["speedup"] is None and rec["load_ms"] > 0 and rec["peak_rss_bytes"] > 0
        assert (rec["first_inference_ms"] is None) == (part == "image")
    # The whole image runs two UNet calls plus the text encoder and the decoder: it is never the cheapest part.
    assert ours["image"]["latency_ms"]["p50"] > ours["component:text_encoder"]["latency_ms"]["min"]
    assert ours["image"]["size_bytes"] == sum(ours[f"component:{c}"]["size_bytes"]
                                              for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder"))


def test_torch_baseline_gives_speedups_in_the_same_run(with_torch: list[dict[str, Any]]) -> None:
    ours, base = _by_part(with_torch, baseline=False), _by_part(with_torch, baseline=True)
    assert set(base) == PARTS
    for part, rec in ours.items():
        ref = base[part]
        assert ref["engine"]["backend"] == "pytorch" and ref["speedup"] == 1.0
        assert ref["threads"] == rec["threads"] and ref["batch"] == rec["batch"]
        # Timed before and after the engine; the baseline is the faster of the two.
        b = ref["baseline_p50_ms"]
        assert ref["latency_ms"]["p50"] == pytest.approx(min(b["before"], b["after"]))
        assert rec["speedup"] == pytest.approx(ref["latency_ms"]["p50"] / rec["latency_ms"]["p50"])
    # Same latents and scheduler on both sides: the images agree.
    fid = ours["image"]["fidelity"]
    assert fid["image_max_abs"] < 1e-2 and fid["image_mean_abs"] < 1e-3
    assert base["component:unet"]["size_bytes"] > 0


def test_store_round_trip(with_torch: list[dict[str, Any]], tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(with_torch)
    back = store.read()
    assert store.skipped == 0
    assert back == json.loads(json.dumps(with_torch))
    assert {r["part"] for r in back} == PARTS


def test_report_renders_a_pipeline_table(with_torch: list[dict[str, Any]], tmp_path: Path) -> None:
    files = write_report(with_torch, tmp_path / "report")
    md = files["report.md"].read_text()
    assert "openvino" not in md and "tiny-sd15 (onnxruntime/cpu, float): 64×64, 2 steps" in md
    assert "| part | rows | p50 ms |" in md and "PyTorch p50 ms" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert PARTS <= set(rows)
    step = _by_part(with_torch, baseline=False)["step"]
    assert f"{step['speedup']:.2f}×" in rows["step"]
    assert list(files) == ["report.md"]  # nothing to plot: the plots are about classifiers


def test_report_with_classifiers_and_pipelines(with_torch: list[dict[str, Any]], tmp_path: Path) -> None:
    engine = {"name": "vit-ov", "backend": "openvino", "device": "cpu", "method": "float"}
    hw = with_torch[0]["hardware"]
    vit = [make_record(engine=engine, result={"batch": 1, "latency_ms": {"p50": 2.0, "p90": 2.5, "p99": 3.0},
                                              "runs": 5, "throughput_ips": 500.0},
                       threads=2, hardware=hw, fidelity={"logits_cosine": 0.9999})]
    files = write_report(with_torch + vit, tmp_path / "report")
    md = files["report.md"].read_text()
    assert "### Batch 1" in md and "| step |" in md and len(files) == 3
    assert all(p.stat().st_size > 0 for p in files.values())


def test_speedups_match_on_part_and_size() -> None:
    def rec(part: str, p50: float, baseline: bool, height: int = 64) -> dict[str, Any]:
        return {"hardware_id": "h", "batch": 2, "model": "m", "part": part, "height": height, "width": 64,
                "steps": 2, "baseline": baseline, "latency_ms": {"p50": p50}, "speedup": None}

    records = [rec("component:unet", 10.0, True), rec("component:text_encoder", 1.0, True),
               rec("component:unet", 5.0, False), rec("component:text_encoder", 0.5, False),
               rec("component:unet", 5.0, False, height=128)]
    add_speedups(records)
    assert [r["speedup"] for r in records[2:]] == [2.0, 2.0, None]


def test_cli_bench_of_a_pipeline(sd15: Path, tmp_path: Path) -> None:
    store = tmp_path / "r.jsonl"
    result = CliRunner().invoke(cli, ["bench", str(sd15), "--height", "64", "--width", "64", "--steps", "2",
                                      "--runs", "1", "--warmup", "0", "--image-runs", "0", "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "component:unet" in result.output and "step" in result.output
    parts = {r["part"] for r in ResultsStore(store).read()}
    assert parts == PARTS - {"image"}
    bad = CliRunner().invoke(cli, ["bench", str(sd15), "--batch", "1,2", "--store", str(store)])
    assert bad.exit_code != 0 and "one batch" in bad.output


def test_config_refuses_what_it_cannot_time() -> None:
    with pytest.raises(ValueError, match="guidance_scale"):
        PipelineBenchConfig(guidance_scale=1.0)
    with pytest.raises(ValueError, match="steps"):
        PipelineBenchConfig(steps=0)
    with pytest.raises(ValueError, match="runs"):
        PipelineBenchConfig(runs=None)


@pytest.mark.skipif("openvino" not in installed_backends(), reason="OpenVINO is not installed")
def test_static_engine_benches_at_its_own_size(sd15: Path, tmp_path: Path) -> None:
    out = tmp_path / "ov"
    result = CliRunner().invoke(cli, ["compile", str(sd15), "--backend", "openvino", "-o", str(out),
                                      "--height", "64", "--width", "64", "--batch", "1"])
    assert result.exit_code == 0, result.output
    config = PipelineBenchConfig(steps=2, warmup=0, runs=1, image_runs=0)
    records = bench_pipeline(out, config, progress=False)
    assert {(r["height"], r["width"]) for r in records} == {(64, 64)}
    assert {r["engine"]["backend"] for r in records} == {"openvino"}
    with pytest.raises(ShapeError, match="static height of 64"):
        bench_pipeline(out, PipelineBenchConfig(height=128, width=128, steps=2, runs=1, image_runs=0), progress=False)
