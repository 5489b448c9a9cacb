"""Honest numbers: bench times PyTorch around the engines, each engine in its own process;
gates say what data judged them; plots draw each engine's own budget; optimize's pick must
hold on a second, differently made set; throughput mode keeps several requests in flight."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from click.testing import CliRunner

from ..conftest import installed_backends
from enginekit.app.cli import cli
from enginekit.bench.harness import BenchConfig
from enginekit.manifest import TensorSpec, read_manifest
from enginekit.runtimes.base import Runner


def _bench(args: list[str], tmp_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    out = tmp_path / "run.json"
    result = CliRunner().invoke(cli, ["bench", *args, "--store", str(tmp_path / "r.jsonl"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


# ---------------------------------------------------------------- 1. bench


def test_bench_times_pytorch_before_and_after_each_engine_alone(exported: dict[str, Path], tmp_path: Path) -> None:
    """PyTorch runs before and after the engines (the faster is the baseline); every engine runs
    in a fresh process without torch, so its peak RSS is its own; load averages and p99/p50 are kept."""
    result, records = _bench([str(exported["timm"]), str(exported["hf"]), "--baseline", "torch", "--runs", "5",
                              "--warmup", "1"], tmp_path)
    bases = [r for r in records if r["baseline"]]
    engines = [r for r in records if not r["baseline"]]
    assert len(bases) == 2 and len(engines) == 2  # one PyTorch model per distinct source
    for b in bases:
        p = b["conditions"]["baseline_p50_ms"]
        assert b["latency_ms"]["p50"] == min(p["before"], p["after"])
        assert b["conditions"]["drift"] == pytest.approx(p["after"] / p["before"])
    for e in engines:
        c = e["conditions"]
        assert c["own_process"] is True and c["torch_in_process"] is False
        assert e["peak_rss_bytes"] > 0
        assert len(c["load_avg_start"]) == 3 and len(c["load_avg_end"]) == 3
        assert c["p99_over_p50"] == pytest.approx(e["latency_ms"]["p99"] / e["latency_ms"]["p50"])
        base = next(b for b in bases if b["model"] == e["model"])
        assert e["speedup"] == pytest.approx(base["latency_ms"]["p50"] / e["latency_ms"]["p50"])
    out = " ".join(result.output.split())
    assert "timed before and after the engines" in out and "load average" in out and "peak MB" in out


def test_same_process_hides_peak_memory(exported: dict[str, Path], tmp_path: Path) -> None:
    result, records = _bench([str(exported["timm"]), "--runs", "3", "--warmup", "1", "--same-process"], tmp_path)
    assert records[0]["peak_rss_bytes"] is None and "peak MB" not in result.output


def test_each_peak_is_its_own_while_the_parent_holds_a_large_buffer(exported: dict[str, Path]) -> None:
    """The parent touches 1 GiB; the engine's and PyTorch's peaks are read in processes of their
    own (VmHWM, not a child's ru_maxrss, which carries the parent's high-water mark across exec)."""
    import psutil

    from enginekit.bench.memory import vm_hwm_bytes
    from enginekit.bench.session import bench_classifiers, run_notes

    before = psutil.Process().memory_info().rss
    size = 2**30
    buffer = np.ones(size // 8)  # ones, not zeros: every page touched and resident
    assert psutil.Process().memory_info().rss > before + 0.9 * size
    records = bench_classifiers([exported["timm"]], BenchConfig(warmup=1, runs=3), baseline=True, progress=False)
    engine = next(r for r in records if not r["baseline"])
    torch_rec = next(r for r in records if r["baseline"])
    how = "vmhwm" if vm_hwm_bytes() is not None else "sampled"
    for rec in (engine, torch_rec):
        c = rec["conditions"]
        assert c["own_process"] is True and c["peak_rss_how"] == how
        # Inherited, the peak would be at least the parent's: what it held before plus the buffer.
        assert 0 < rec["peak_rss_bytes"] < before + size / 2
    assert engine["peak_rss_bytes"] < 400e6  # a 0.6 MB model on ONNX Runtime, whatever the parent holds
    assert engine["conditions"]["torch_in_process"] is False and torch_rec["conditions"]["torch_in_process"] is True
    assert engine["peak_rss_bytes"] < torch_rec["peak_rss_bytes"]  # importing torch alone outweighs it
    assert any("VmHWM" in n or "sampled" in n for n in run_notes(records))
    assert float(buffer[-1]) == 1.0  # held to the end


def test_peak_memory_falls_back_to_sampling_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc has no VmHWM the peak is the largest RSS sampled, and says so."""
    from enginekit import memory as core
    from enginekit.bench import memory

    monkeypatch.setattr(core, "vm_hwm_bytes", lambda pid="self": None)
    with memory.PeakMemory(sample_s=0.001) as peak:
        block = np.ones(50 * 2**20 // 8)
        time.sleep(0.05)  # a few samples while the block is resident (not a timing: nothing is asserted on it)
    assert peak.how == "sampled" and peak.bytes is not None and peak.bytes > 50 * 2**20
    assert float(block[0]) == 1.0


def test_an_error_in_the_bench_process_is_one_clear_line(exported: dict[str, Path], tmp_path: Path) -> None:
    from enginekit.bench.session import bench_isolated
    from enginekit.errors import ShapeError

    if "openvino" not in installed_backends():
        pytest.skip("needs the openvino backend for a fixed-batch engine")
    from enginekit.api import compile_artifact
    from enginekit.runtimes.base import CompileOptions

    static = tmp_path / "static"
    compile_artifact(exported["timm"], "openvino", static, CompileOptions(extra={"static_batch": 1}))
    with pytest.raises(ShapeError, match="fixed batch of 1"):
        bench_isolated(static, BenchConfig(batch_sizes=(2,), warmup=1, runs=2), progress=False)


def test_notes_warn_when_the_machine_speed_moved() -> None:
    from enginekit.bench.harness import DRIFT_WARN
    from enginekit.bench.session import SPREAD_WARN, run_notes

    def base(before: float, after: float) -> dict[str, Any]:
        return {"baseline": True, "batch": 1, "threads": 2, "engine": {"name": "pytorch-eager"},
                "conditions": {"baseline_p50_ms": {"before": before, "after": after}, "drift": after / before,
                               "run_load_avg_start": [0.5, 0.4, 0.3], "run_load_avg_end": [1.5, 0.6, 0.3]}}

    noisy = {"baseline": False, "batch": 1, "engine": {"name": "e"},
             "conditions": {"p99_over_p50": SPREAD_WARN + 1, "own_process": True}}
    steady = run_notes([base(10.0, 10.0 * (1 + DRIFT_WARN / 2))])
    assert not [n for n in steady if n.startswith("WARNING")]
    assert any("0.50 0.40 0.30 at the start" in n for n in steady)
    moved = run_notes([base(10.0, 10.0 * (1 + DRIFT_WARN * 2)), noisy])
    assert any(n.startswith("WARNING: the machine's speed moved") for n in moved)
    assert any("noisy timings" in n and "e (batch 1" in n for n in moved)


# ---------------------------------------------------------------- 2. the data that judged a gate


def test_quantize_judges_on_photos_by_default_and_says_so(exported: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(cli, ["quantize", str(exported["timm"]), "-m", "int8-dynamic", "-o",
                                      str(tmp_path / "q"), "--eval-size", "16"])
    assert result.exit_code == 0, result.output
    fid = read_manifest(tmp_path / "q").fidelity
    assert fid["inputs"].startswith("photos") and fid["reference"] == "float parent"
    assert "on 16 held-out photo crops" in " ".join(result.output.split())

    # Without scikit-learn (no photos), the gate falls back to noise and says so.
    import enginekit.quant.api as qapi

    monkeypatch.setattr(qapi, "photos_available", lambda: False)
    result = CliRunner().invoke(cli, ["quantize", str(exported["timm"]), "-m", "int8-dynamic", "-o",
                                      str(tmp_path / "n"), "--eval-size", "16"])
    assert result.exit_code == 0, result.output
    assert "16 held-out samples of seeded noise (not images)" in " ".join(result.output.split())


def test_describe_data_names_every_source() -> None:
    from enginekit.quant.data import describe_data

    assert describe_data("photos (scikit-learn sample photos, crops seeded 1)", 8).startswith("8 held-out photo")
    assert "seeded noise" in describe_data("synthetic (seeded normal noise, seed 1)", 8)
    assert "pattern images" in describe_data("patterns (seeded ...; seed 1001)", 8)
    assert "built-in digits" in describe_data("builtin:digits (held-out split)", 8)
    assert "/x/y" in describe_data("folder:/x/y (held-out part)", 8)


def test_patterns_are_seeded_and_differ_from_photos(exported: dict[str, Path]) -> None:
    from enginekit.quant.data import load_inputs

    m = read_manifest(exported["timm"])
    a = load_inputs("patterns", m, purpose="evaluation", limit=10, seed=1)
    b = load_inputs("patterns", m, purpose="evaluation", limit=10, seed=1)
    c = load_inputs("patterns", m, purpose="calibration", limit=10)
    photos = load_inputs("photos", m, purpose="evaluation", limit=10, seed=1)
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256 and a.sha256 != photos.sha256
    assert a.inputs.shape == photos.inputs.shape and np.isfinite(a.inputs).all()


# ---------------------------------------------------------------- 3. report: budgets, references, no matplotlib


def _rec(name: str, cosine: float, budget: float | None, reference: str | None, *, baseline: bool = False,
         p50: float = 10.0) -> dict[str, Any]:
    fid: dict[str, Any] = {} if baseline else {"logits_cosine": cosine, "top1_agreement": 1.0,
                                               "reference": reference, "data": "photos (crops seeded 1)"}
    if budget is not None:
        fid["budget"] = {"min_cosine": budget, "min_agreement": 0.99}
    return {"schema": 1, "timestamp": "2026-12-01T00:00:00+00:00", "hardware": {"cpu_model": "cpu"},
            "hardware_id": "h", "engine": {"name": name, "backend": "x", "device": "cpu", "method": "float"},
            "batch": 1, "threads": 1, "latency_ms": {"p50": p50, "p90": p50, "p99": p50}, "runs": 3,
            "throughput_ips": 1000 / p50, "load_ms": None, "first_inference_ms": None, "peak_rss_bytes": 123_400_000,
            "size_bytes": 1, "fidelity": fid, "baseline": baseline, "speedup": None, "model": "m",
            "conditions": {"own_process": name == "q8"}}


def test_plot_draws_each_engines_budget_and_names_the_reference(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from enginekit.bench.report import write_report

    lines: list[float] = []
    labels: list[str] = []
    monkeypatch.setattr(Axes, "axvline", lambda self, x=0, *a, **k: lines.append(x))
    real = Axes.set_xlabel
    monkeypatch.setattr(Axes, "set_xlabel", lambda self, text, *a, **k: (labels.append(text),
                                                                         real(self, text, *a, **k))[1])
    recs = [_rec("torch", 1.0, None, None, baseline=True, p50=40.0), _rec("q8", 0.9962, 0.995, "float parent"),
            _rec("opt", 0.9995, 0.999, "pytorch eager fp32", p50=5.0)]
    write_report(recs, tmp_path / "r")
    assert sorted(lines) == [0.995, 0.999]  # each engine's own budget, not one hard-coded line
    assert any("each engine's reference" in t for t in labels)
    md = (tmp_path / "r" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| q8 "))
    assert "float parent" in row and "photo crops" in row
    assert "PyTorch" in next(line for line in md.splitlines() if line.startswith("| opt "))
    # peak RSS only where the engine ran in a process of its own
    assert "123.4" in row and "123.4" not in next(line for line in md.splitlines() if line.startswith("| opt "))

    lines.clear(), labels.clear()
    write_report([recs[0], recs[1]], tmp_path / "one")
    assert lines == [0.995] and any(t == "logits cosine vs float parent" for t in labels)


_BLOCK_MATPLOTLIB = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("matplotlib is blocked for this test")
sys.meta_path.insert(0, Block())
from enginekit.app.cli import cli
cli(sys.argv[1:], prog_name="enginekit")
"""


def test_report_without_matplotlib(tmp_path: Path) -> None:
    store = tmp_path / "r.jsonl"
    store.write_text("\n".join(json.dumps(r) for r in (_rec("torch", 1, None, None, baseline=True),
                                                       _rec("q8", 0.999, 0.995, "float parent"))) + "\n")

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _BLOCK_MATPLOTLIB, "bench", "report", str(store), "-o",
                               str(tmp_path / "rep"), *extra], capture_output=True, text=True)

    ok = run("--no-plots")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "rep" / "report.md").is_file() and not list((tmp_path / "rep").glob("*.png"))
    assert "tables only" in " ".join(ok.stderr.split())  # the console wraps long paths at 80 columns
    refused = run()
    assert refused.returncode == 1 and "--no-plots" in refused.stderr and "Traceback" not in refused.stderr


# ---------------------------------------------------------------- 4. optimize holds off the calibration data


def test_optimize_rejects_a_pick_that_only_holds_on_the_calibration_distribution(
        tiny_timm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Static int8 calibrated on near-constant images learns tiny activation ranges: it agrees on
    held-out images of that kind and clips on the differently made patterns. Judged on both sets
    (budget on the worse), it is rejected where the first set alone would have passed it."""
    import enginekit.bench.harness as harness
    from enginekit.app.optimize import OptimizeConfig, optimize

    from ..app.test_optimize import _fake_bench

    rng = np.random.default_rng(0)
    narrow = tmp_path / "narrow.npy"
    np.save(narrow, (0.3 + 0.02 * rng.standard_normal((60, 3, 32, 32))).astype(np.float32))
    names = ("onnxruntime-fp32", "onnxruntime-int8-dynamic", "onnxruntime-int8-static")
    monkeypatch.setattr(harness, "bench_artifact", _fake_bench({"onnxruntime-fp32": 5.0,
                                                                 "onnxruntime-int8-dynamic": 2.0,
                                                                 "onnxruntime-int8-static": 1.0}))
    base = dict(backends=("onnxruntime",), precisions=("fp32", "int8"), data=str(narrow), second_data="patterns",
                calibration_size=40, eval_size=16, warmup=1, runs=3)
    free = optimize(str(tiny_timm_dir), tmp_path / "free", OptimizeConfig(min_agreement=0, min_cosine=0, **base),
                    progress=False)
    static = next(c for c in free["candidates"] if c["candidate"]["name"] == names[2])
    first, second = static["fidelity"]["sets"]
    assert first["inputs"].startswith("npy:") and second["inputs"].startswith("patterns")
    assert second["logits_cosine"] < first["logits_cosine"]  # holds on its own kind of data only
    assert static["fidelity"]["logits_cosine"] == second["logits_cosine"]  # the worse one is reported
    fp32 = next(c for c in free["candidates"] if c["candidate"]["name"] == names[0])
    threshold = (first["logits_cosine"] + second["logits_cosine"]) / 2
    assert min(s["logits_cosine"] for s in fp32["fidelity"]["sets"]) > threshold

    report = optimize(str(tiny_timm_dir), tmp_path / "strict",
                      OptimizeConfig(min_agreement=0, min_cosine=threshold, **base), progress=False)
    by_name = {c["candidate"]["name"]: c for c in report["candidates"]}
    assert by_name[names[2]]["status"] == "rejected"
    assert "pattern images" in by_name[names[2]]["reason"]
    assert report["picked"] != names[2]
    md = (tmp_path / "strict" / "report.md").read_text()
    assert "second held-out set, made differently: patterns" in md
    fid = read_manifest(tmp_path / "strict").fidelity
    assert len(fid["sets"]) == 2 and fid["judged_on"]["cosine"].split(" ")[0] in ("patterns", f"npy:{narrow}")


# ---------------------------------------------------------------- 5. throughput mode


class SleepRunner(Runner):
    """Sleeps 20 ms per call, releasing the GIL: N calls in flight finish about N times as fast."""

    backend = "fake"
    device = "cpu"
    delay_s: ClassVar[float] = 0.02

    def __init__(self) -> None:
        super().__init__([TensorSpec("x", "float32", ("batch", 3))], [TensorSpec("y", "float32", ("batch", 3))])

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.delay_s)
        return {"y": feeds["x"]}


def test_throughput_keeps_requests_in_flight() -> None:
    from enginekit.bench.throughput import bench_throughput

    config = BenchConfig(warmup=1, runs=24)
    one = bench_throughput(SleepRunner(), 1, config, requests=1)
    four = bench_throughput(SleepRunner(), 1, config, requests=4)
    assert one["runs"] == four["runs"] == 24 and four["requests"] == 4 and four["how"] == "threads"
    assert one["throughput_ips"] <= 1 / SleepRunner.delay_s
    assert four["throughput_ips"] > 2 * one["throughput_ips"]  # several in flight, not one after another
    assert four["latency_ms"]["p50"] >= SleepRunner.delay_s * 1e3


def test_bench_throughput_mode_on_every_backend(compiled: dict, tmp_path: Path) -> None:
    arts = [str(compiled[("timm", kind)]) for kind in ("onnx", *installed_backends())]
    result, records = _bench([*arts, "--mode", "throughput", "--requests", "2", "--runs", "8", "--warmup", "1",
                              "--baseline", "torch"], tmp_path)
    engines = [r for r in records if not r["baseline"]]
    assert len(engines) == len(arts)
    for r in engines:
        c = r["conditions"]
        assert c["mode"] == "throughput" and c["requests"] == 2 and r["runs"] == 8 and r["throughput_ips"] > 0
        expect = "openvino infer requests" if r["engine"]["backend"] == "openvino" else "threads"
        assert c["how"] == expect
        base = next(b for b in records if b["baseline"])
        assert r["speedup"] == pytest.approx(r["throughput_ips"] / base["throughput_ips"])
    assert "fps" in result.output and "in flight" in result.output


# ---------------------------------------------------------------- 6. the detector-shaped checkpoint


def test_detector_checkpoint_decides_with_margin(tmp_path: Path) -> None:
    """The speed target's model, on timm's tiny test_vit: a 2-label head fitted on the seeded body's
    features that tells the two photos apart, saved as a folder export takes."""
    from benchmarks.detector import LABELS, build_detector
    from enginekit.export.sources import resolve_source

    info = build_detector(tmp_path / "det", arch="test_vit", fit_size=24, check_size=12)
    assert info["fit"]["accuracy"] == 1.0  # separable: the head has its margin on what it was fitted to
    assert info["check"]["logit_gap_median"] > info["check"]["logits_std"] / 10
    src = resolve_source(str(tmp_path / "det"))
    assert src.labels == LABELS and src.architecture == "test_vit"
    assert json.loads((tmp_path / "det" / "detector.json").read_text())["fit"]["crop_seed"] == info["fit"]["crop_seed"]


def test_the_speed_target_follows_the_cpu() -> None:
    from benchmarks.targets import TARGET_SPEEDUP, TARGET_SPEEDUP_BF16, speedup_target

    assert speedup_target(["avx2", "fma"]) == TARGET_SPEEDUP
    assert speedup_target(["avx2", "avx512f", "avx512_bf16"]) == speedup_target(["amx_bf16"]) == TARGET_SPEEDUP_BF16


def test_quiet_lock_waits_for_others_and_removes_only_its_own(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.targets as targets

    path = tmp_path / "quiet.lock"
    path.write_text("someone else\n")
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the other holder finishes while we wait
        waits.append(seconds)
        path.unlink()

    monkeypatch.setattr(targets.time, "sleep", sleep)
    lock = targets.QuietLock(path, lambda msg: None)
    lock.acquire()
    assert waits and path.read_text().startswith(str(__import__("os").getpid()))
    lock.acquire()  # held already: a no-op
    lock.release()
    assert not path.exists()
    targets.QuietLock(None, lambda msg: None).acquire()  # no lock asked for: nothing happens
