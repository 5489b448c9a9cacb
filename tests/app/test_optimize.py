"""`optimize` on the tiny timm ViT: it builds, judges against PyTorch, times, and keeps the
fastest candidate within budget; it rejects over-budget ones and writes nothing when none passes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from ..conftest import installed_backends, make_photo
from enginekit.artifact import cache_root
from enginekit.app.cli import cli
from enginekit.errors import ArtifactError, FidelityError, InputError, UnknownBackendError
from enginekit.manifest import read_manifest
from enginekit.app.optimize import OptimizeConfig, optimize, plan_candidates

FAST = dict(calibration_size=16, eval_size=16, warmup=1, runs=3)


def test_plan_covers_every_backend_and_precision() -> None:
    names = {c.name for c in plan_candidates(["onnxruntime", "openvino"], ["fp32", "fp16", "int8", "int4"], 1,
                                             cpu_flags=["avx2", "amx_bf16"])}
    assert {"onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8-static", "onnxruntime-int4-weight",
            "openvino-fp32", "openvino-bf16", "openvino-int8-static", "openvino-int8-qdq",
            "openvino-int4-weight"} <= names
    # no bf16 variant where the CPU has no bf16 arithmetic
    plain = plan_candidates(["openvino"], ["fp32", "fp16", "int8"], 1, cpu_flags=["avx2"])
    assert not [c for c in plain if c.precision == "bf16" or c.name.endswith("-bf16")]
    assert all(c.backend == "openvino" for c in plain)
    only_int8 = plan_candidates(["onnxruntime"], ["int8"], 1)
    assert {c.name for c in only_int8} == {"onnxruntime-int8-dynamic", "onnxruntime-int8-static"}
    # OpenVINO engines are compiled for the batch asked for, unless told to stay dynamic
    ov = plan_candidates(["openvino"], ["fp32"], 4)
    assert ov[0].compile_extra["static_batch"] == 4
    assert "static_batch" not in plan_candidates(["openvino"], ["fp32"], 4, static_shape=False)[0].compile_extra


def _fake_bench(latency_by_name: dict[str, float]) -> Any:
    """A stand-in for the harness's bench_artifact: a real record whose p50 is set per candidate."""
    from enginekit.bench.harness import engine_info, make_record

    def bench(path: Path, config: Any, device: str = "cpu", backend: str | None = None, **_: Any) -> list[dict]:
        manifest = read_manifest(path)
        p50 = latency_by_name[Path(path).name]
        stats = {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "min": p50, "max": p50, "count": 3}
        result = {"batch": 1, "latency_ms": stats, "throughput_ips": 1000.0 / p50, "runs": 3}
        return [make_record(engine=engine_info(path, manifest, backend or "onnxruntime", device), result=result,
                            threads=0, size_bytes=1, model=manifest.provenance.get("source"))]

    return bench


def test_picks_the_fastest_within_budget_and_rejects_the_rest(tiny_timm_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import enginekit.bench.harness as harness

    # int8-static is made the fastest, fp32 the slowest: timing is faked so the choice is
    # deterministic; building, the fidelity check against PyTorch and the copy are real.
    latency = {"onnxruntime-fp32": 5.0, "onnxruntime-int8-dynamic": 2.0, "onnxruntime-int8-static": 1.0}
    monkeypatch.setattr(harness, "bench_artifact", _fake_bench(latency))
    base = OptimizeConfig(backends=("onnxruntime",), precisions=("fp32", "int8"), min_agreement=0.0,
                          min_cosine=0.0, data="photos", **FAST)
    report = optimize(str(tiny_timm_dir), tmp_path / "open", base, progress=False)
    by_name = {c["candidate"]["name"]: c for c in report["candidates"]}
    assert set(by_name) == set(latency)
    assert report["picked"] == "onnxruntime-int8-static"
    assert by_name["onnxruntime-int8-static"]["status"] == "picked"
    assert {by_name[n]["status"] for n in ("onnxruntime-fp32", "onnxruntime-int8-dynamic")} == {"passed"}
    # every speed-up is a ratio to the PyTorch baseline timed in the same run
    base_p50 = report["baseline"]["latency_ms"]["p50"]
    assert by_name["onnxruntime-fp32"]["record"]["speedup"] == pytest.approx(base_p50 / 5.0)
    # PyTorch is timed before and after the engines; the faster of the two is the reference,
    # so a machine that slowed down during the run cannot flatter the engines
    before, after = report["baseline_before"]["latency_ms"]["p50"], report["baseline_after"]["latency_ms"]["p50"]
    assert base_p50 == min(before, after)
    fp32_cos = by_name["onnxruntime-fp32"]["fidelity"]["logits_cosine"]
    int8_cos = by_name["onnxruntime-int8-static"]["fidelity"]["logits_cosine"]
    assert fp32_cos > 0.99999 and int8_cos < fp32_cos  # float matches PyTorch, int8 less so

    # A cosine budget between int8-static's and fp32's rejects int8-static though it is fastest.
    threshold = (int8_cos + fp32_cos) / 2
    tight = OptimizeConfig(**{**base.__dict__, "min_cosine": threshold})
    report = optimize(str(tiny_timm_dir), tmp_path / "tight", tight, progress=False)
    by_name = {c["candidate"]["name"]: c for c in report["candidates"]}
    assert by_name["onnxruntime-int8-static"]["status"] == "rejected"
    assert "logits cosine" in by_name["onnxruntime-int8-static"]["reason"]
    passing = [n for n, c in by_name.items() if c["fidelity"]["logits_cosine"] >= threshold]
    assert "onnxruntime-fp32" in passing
    assert report["picked"] == min(passing, key=latency.__getitem__)
    manifest = read_manifest(tmp_path / "tight")
    assert manifest.fidelity["reference"] == "pytorch eager fp32"
    assert manifest.fidelity["logits_cosine"] >= threshold
    assert manifest.provenance["optimize"]["candidate"] == report["picked"]
    text = (tmp_path / "tight" / "report.md").read_text()
    assert all(name in text for name in latency) and "rejected: logits cosine" in text


def test_cli_writes_a_working_engine_and_a_report(tiny_timm_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEKIT_CACHE_DIR", str(tmp_path / "user-cache"))
    out = tmp_path / "best"
    args = ["optimize", str(tiny_timm_dir), "-o", str(out), "--precisions", "fp32,int8", "--data", "photos",
            "--eval-size", "16", "--calibration-size", "16", "--runs", "3", "--warmup", "1", "--tie-margin", "0.05",
            "--json",
            "--store", str(tmp_path / "results.jsonl")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    timed = [c for c in report["candidates"] if c["record"]]
    passed = [c for c in timed if c["status"] in ("picked", "passed")]
    assert {c["candidate"]["backend"] for c in report["candidates"]} == set(installed_backends())
    best = min(passed, key=lambda c: c["record"]["latency_ms"]["p50"])
    # with a tie margin, both agreements are reported and the budget counts decided samples
    for c in timed:
        fid = c["fidelity"]
        assert 0 <= fid["ties"] <= fid["samples"] and fid["tie_margin"] == 0.05
        assert fid["top1_agreement_decided"] >= 0.0
        if c["status"] == "rejected" and "agreement" in c["reason"]:
            assert "decided samples" in c["reason"]
    assert report["picked"] == best["candidate"]["name"]
    # the report names the commands that rebuild the pick by hand (tests/app/test_cli_familiar.py runs them)
    assert report["rebuild"][0].startswith("enginekit export") and "```sh" in (out / "report.md").read_text()
    # the picked engine is an ordinary artifact: it loads, verifies and predicts
    import enginekit

    with enginekit.load(out) as clf:
        preds = clf.predict([make_photo((40, 30), 0), make_photo((30, 50), 1), make_photo((32, 32), 2)], top_k=2)
        if best["candidate"]["backend"] == "openvino":  # compiled into this machine's cache by optimize
            assert clf.runner.loaded_from_cache is True
    assert len(preds) == 3 and all(p.label in ("cat", "dog", "bird", "fish") for p in preds)
    # the candidates' blobs left with the work folder; only the pick's can be in the user's cache
    blobs = cache_root() / "openvino"
    assert len(list(blobs.iterdir()) if blobs.is_dir() else []) <= 1
    # the baseline and every timed candidate went to the results store, with the hardware
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 + len(timed) and sum(r["baseline"] for r in rows) == 1
    assert all(r["hardware"]["cpu_model"] for r in rows)


def test_nothing_written_when_no_candidate_passes(tiny_timm_dir: Path, tmp_path: Path) -> None:
    config = OptimizeConfig(backends=("onnxruntime",), precisions=("int8",), min_cosine=1.0, data="photos", **FAST)
    with pytest.raises(FidelityError, match="no candidate keeps the budget") as info:
        optimize(str(tiny_timm_dir), tmp_path / "none", config, progress=False)
    assert not (tmp_path / "none").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".none.") and "partial" in p.name]
    report = Path(str(info.value).rsplit("the report is in ", 1)[1])
    assert report.is_file() and "rejected" in report.read_text()


def test_bad_requests_fail_before_any_work(tiny_timm_dir: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        optimize(str(tiny_timm_dir), taken, OptimizeConfig())
    with pytest.raises(UnknownBackendError):
        optimize(str(tiny_timm_dir), tmp_path / "a", OptimizeConfig(backends=("tensorflow-lite",)))
    with pytest.raises(InputError, match="precisions"):
        optimize(str(tiny_timm_dir), tmp_path / "b", OptimizeConfig(precisions=("int3",)))
    with pytest.raises(InputError, match="budget"):
        optimize(str(tiny_timm_dir), tmp_path / "c", OptimizeConfig(min_agreement=1.5))
    with pytest.raises(InputError, match="tie margin"):
        optimize(str(tiny_timm_dir), tmp_path / "c", OptimizeConfig(tie_margin=-1))
    result = CliRunner().invoke(cli, ["optimize", str(tmp_path / "missing-model"), "-o", str(tmp_path / "d")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert not (tmp_path / "d").exists()
    assert not np.any([p.name.startswith(".") for p in tmp_path.iterdir()])  # no work folder left behind
