"""The bench harness and results store: stats, timing of a fake runner, a real tiny artifact."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from enginekit.bench.harness import (
    RECORD_SCHEMA,
    BenchConfig,
    add_speedups,
    bench_artifact,
    bench_runner,
    latency_stats,
    make_feeds,
    make_record,
    time_callable,
)
from enginekit.bench.store import ResultsStore, read_results
from enginekit.runtimes.base import Runner

from ..conftest import installed_backends

from enginekit.errors import InputError, ShapeError
from enginekit.manifest import TensorSpec, read_manifest

RECORD_KEYS = {"schema", "timestamp", "hardware", "hardware_id", "engine", "batch", "threads", "latency_ms", "runs",
               "throughput_ips", "load_ms", "first_inference_ms", "peak_rss_bytes", "size_bytes", "fidelity",
               "baseline", "speedup", "model", "conditions"}
# Sleeps overshoot on a loaded 2-core box; never undershoot.
SLACK_MS = 15.0


class SleepRunner(Runner):
    """Sleeps 2 ms at batch 1 and 5 ms at batch 4."""

    backend = "fake"
    device = "cpu"
    delays_s: ClassVar[dict[int, float]] = {1: 0.002, 4: 0.005}

    def __init__(self) -> None:
        super().__init__([TensorSpec("x", "float32", ("batch", 3))], [TensorSpec("y", "float32", ("batch", 3))])
        self.batches: list[int] = []

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = feeds["x"].shape[0]
        self.batches.append(batch)
        time.sleep(self.delays_s[batch])
        return {"y": feeds["x"]}


def test_latency_stats_exact_percentiles() -> None:
    stats = latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["count"] == 100
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["min"] == pytest.approx(1.0)
    assert stats["max"] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        latency_stats([])


@pytest.mark.parametrize("kwargs", [{"runs": 5, "duration_s": 1.0}, {"runs": None, "duration_s": None}])
def test_config_needs_exactly_one_of_runs_or_duration(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of runs"):
        BenchConfig(**kwargs)


def test_config_rejects_bad_numbers() -> None:
    for kwargs in ({"runs": 0}, {"warmup": -1}, {"batch_sizes": ()}, {"runs": None, "duration_s": 0.0}):
        with pytest.raises(ValueError):
            BenchConfig(**kwargs)


@pytest.mark.parametrize("batch", [1, 4])
def test_bench_runner_measures_the_sleep(batch: int) -> None:
    runner = SleepRunner()
    config = BenchConfig(batch_sizes=(batch,), warmup=2, runs=10)
    result = bench_runner(runner, batch, config)
    delay_ms = SleepRunner.delays_s[batch] * 1e3
    assert result["batch"] == batch and result["runs"] == 10
    assert delay_ms <= result["latency_ms"]["p50"] < delay_ms + SLACK_MS
    assert result["latency_ms"]["count"] == 10
    assert result["throughput_ips"] == pytest.approx(batch * 1000 / result["latency_ms"]["p50"])
    assert runner.batches == [batch] * 12  # warm-up calls are not timed but do run


def test_time_callable_progress_and_duration_mode() -> None:
    seen: list[int] = []
    samples = time_callable(lambda: None, BenchConfig(warmup=0, runs=7), on_progress=seen.append)
    assert len(samples) == 7 and seen == list(range(1, 8))

    config = BenchConfig(warmup=1, runs=None, duration_s=0.2)
    start = time.perf_counter()
    samples = time_callable(lambda: time.sleep(0.002), config)
    elapsed = time.perf_counter() - start
    assert 0.2 <= elapsed < 0.2 + 0.25
    assert 5 <= len(samples) <= 100


def test_feeds_fill_the_batch_axis_only() -> None:
    feeds = make_feeds([TensorSpec("x", "float32", ("batch", 3, 4))], batch=2, seed=1)
    assert feeds["x"].shape == (2, 3, 4) and feeds["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds["x"], make_feeds([TensorSpec("x", "float32", ("b", 3, 4))], 2, 1)["x"])
    with pytest.raises(ShapeError, match="symbolic"):
        make_feeds([TensorSpec("x", "float32", ("batch", "height"))], batch=1)
    with pytest.raises(ShapeError, match="fixed batch"):
        make_feeds([TensorSpec("x", "float32", (1, 3))], batch=2)


def test_bench_artifact_on_a_tiny_onnx(exported: dict[str, Path]) -> None:
    path = exported["timm"]
    manifest = read_manifest(path)
    records = bench_artifact(path, BenchConfig(batch_sizes=(1, 2), warmup=1, runs=5, threads=1), progress=False)
    assert [r["batch"] for r in records] == [1, 2]
    size = sum(f.size for c in manifest.components.values() for f in c.files)
    for rec in records:
        assert set(rec) == RECORD_KEYS
        assert rec["schema"] == RECORD_SCHEMA and rec["runs"] == 5 and rec["threads"] == 1
        assert rec["load_ms"] > 0 and rec["first_inference_ms"] > 0
        # in a shared process the high-water mark is not the engine's own: not reported
        assert rec["peak_rss_bytes"] is None and rec["conditions"]["own_process"] is False
        assert rec["size_bytes"] == size
        assert rec["fidelity"]["logits_cosine"] == manifest.fidelity["logits_cosine"]
        assert rec["fidelity"]["top1_agreement"] == manifest.fidelity["top1_agreement"]
        assert rec["engine"]["method"] == "float"
        assert rec["engine"]["kind"] == "onnx" and rec["engine"]["backend"] == "onnxruntime"
        assert rec["engine"]["name"] == path.name and rec["engine"]["manifest_sha256"] == manifest.digest()
        assert rec["engine"]["precision"] == manifest.component().precision
        assert rec["baseline"] is False and rec["speedup"] is None
        assert rec["latency_ms"]["p50"] > 0
        json.dumps(rec)  # JSON-ready


def _record(batch: int, p50: float, baseline: bool = False, hw: str = "hw1") -> dict:
    result = {"batch": batch, "latency_ms": {"p50": p50}, "throughput_ips": batch * 1000 / p50, "runs": 3}
    rec = make_record(engine={"name": "x"}, result=result, threads=0, hardware={"cpu_model": "fake"},
                      baseline=baseline, timestamp="2025-01-01T00:00:00+00:00")
    rec["hardware_id"] = hw
    return rec


def test_add_speedups_against_the_baseline_of_the_same_batch() -> None:
    records = [_record(1, 10.0, baseline=True), _record(1, 4.0), _record(2, 8.0), _record(1, 5.0, hw="hw2"),
               _record(2, 16.0, baseline=True)]
    add_speedups(records)
    assert [r["speedup"] for r in records] == [pytest.approx(1.0), pytest.approx(2.5), pytest.approx(2.0), None,
                                                pytest.approx(1.0)]


def test_results_store_round_trip_and_corrupt_lines(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "deep" / "machine-a.jsonl")
    assert store.read() == []
    first, second = [_record(1, 2.0), _record(2, 3.0)], [_record(4, 5.0)]
    store.append(first)
    store.append(second)
    assert store.read() == first + second and store.skipped == 0

    with store.path.open("a", encoding="utf-8") as fh:
        fh.write('{"schema": 1, "batch": \n')  # a torn line
        fh.write(json.dumps({"schema": 99}) + "\n")
    store.append([_record(8, 1.0)])
    got = store.read()
    assert [r["batch"] for r in got] == [1, 2, 4, 8]
    assert store.skipped == 2

    other = ResultsStore(tmp_path / "deep" / "machine-b.jsonl")
    other.append([_record(1, 9.0, hw="hw2")])
    (tmp_path / "deep" / "notes.txt").write_text("not results\n")
    merged = read_results(tmp_path / "deep")
    assert [r["batch"] for r in merged] == [1, 2, 4, 8, 1]
    assert read_results([store.path, other.path]) == merged
    with pytest.raises(InputError, match="no such results"):
        read_results(tmp_path / "missing")


def test_threads_reach_the_onnxruntime_session(exported: dict[str, Path]) -> None:
    from enginekit.bench.harness import _open

    runner, manifest, backend, threads = _open(exported["timm"], "cpu", None, 2)
    try:
        assert backend == "onnxruntime" and threads == 2
        assert runner._session.get_session_options().intra_op_num_threads == 2
        assert "intra_op_num_threads" not in manifest.target  # the on-disk manifest is untouched
    finally:
        runner.close()


def test_baseline_torch_in_the_same_run(exported: dict[str, Path], tmp_path: Path) -> None:
    """`bench --baseline torch`: PyTorch eager of the artifact's own source model, timed by the same
    harness; the engine's speed-up is the ratio of the two p50s of this run."""
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    out = tmp_path / "run.json"
    result = CliRunner().invoke(cli, ["bench", str(exported["timm"]), "--baseline", "torch", "--runs", "5",
                                      "--warmup", "1", "--store", str(tmp_path / "r.jsonl"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    base = [r for r in records if r["baseline"]]
    engines = [r for r in records if not r["baseline"]]
    assert len(base) == 1 and len(engines) == 1
    assert base[0]["engine"]["backend"] == "pytorch" and base[0]["latency_ms"]["count"] == 5
    assert base[0]["model"] == engines[0]["model"] == read_manifest(exported["timm"]).provenance["source"]
    assert base[0]["hardware_id"] == engines[0]["hardware_id"]
    assert engines[0]["speedup"] == pytest.approx(base[0]["latency_ms"]["p50"] / engines[0]["latency_ms"]["p50"])
    assert "speed-up" in result.output


def test_speedups_only_against_the_same_model() -> None:
    def rec(model: str, p50: float, baseline: bool = False) -> dict:
        return {"hardware_id": "h", "batch": 1, "model": model, "baseline": baseline, "latency_ms": {"p50": p50}}

    records = [rec("a", 10.0, True), rec("b", 40.0, True), rec("a", 5.0), rec("b", 5.0), rec("c", 5.0)]
    add_speedups(records)
    assert [r.get("speedup") for r in records[2:]] == [2.0, 8.0, None]


@pytest.mark.skipif("openvino" not in installed_backends(), reason="needs the openvino backend")
def test_a_fixed_batch_engine_is_benched_at_its_batch_only(exported: dict[str, Path], tmp_path: Path) -> None:
    """An engine compiled for a fixed batch is timed at that batch; the other sizes are skipped
    with a note, while PyTorch (any batch) is timed at all of them. None matching is one clear error."""
    from click.testing import CliRunner

    from enginekit.api import compile_artifact
    from enginekit.app.cli import cli
    from enginekit.runtimes.base import CompileOptions

    static = tmp_path / "static"
    compile_artifact(exported["timm"], "openvino", static, CompileOptions(extra={"static_batch": 1}))
    out = tmp_path / "run.json"
    result = CliRunner().invoke(cli, ["bench", str(static), str(exported["timm"]), "--batch", "1,2",
                                      "--baseline", "torch", "--runs", "3", "--warmup", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "fixed batch of 1; skipping batch 2" in result.output
    records = json.loads(out.read_text())
    by_engine = {}
    for rec in records:
        by_engine.setdefault((rec["engine"]["backend"], rec["engine"]["kind"]), []).append(rec["batch"])
    assert sorted(by_engine[("openvino", "openvino")]) == [1]
    assert sorted(by_engine[("onnxruntime", "onnx")]) == [1, 2]
    assert sorted(by_engine[("pytorch", "pytorch")]) == [1, 2]
    with pytest.raises(ShapeError, match="fixed batch of 1.*--batch 1"):
        bench_artifact(static, BenchConfig(batch_sizes=(2, 4), warmup=1, runs=2), progress=False)
