"""What users of optimum-cli, trtexec and benchmark_app type first works, and maps onto
enginekit's typed options: compile's backend flags (and their refusals), -d/--device with
OpenVINO's AUTO, --fp16/--int8, export --model/--task, ONNX artifacts on OpenVINO alone,
and optimize's rebuild commands."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from ..conftest import cli_ok as _ok, installed_backends, make_photo, one_line_error as _one_line_error
from enginekit.app.cli import cli
from enginekit.manifest import read_manifest

needs_ov = pytest.mark.skipif("openvino" not in installed_backends(), reason="openvino is not installed")
needs_ort = pytest.mark.skipif("onnxruntime" not in installed_backends(), reason="onnxruntime is not installed")


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    make_photo((48, 40), seed=3).save(path)
    return path


def _logits(path: Path, photo: Path, backend: str | None = None, device: str = "cpu") -> np.ndarray:
    import enginekit

    with enginekit.load(path, device=device, backend=backend) as clf:
        return clf.logits([photo, photo, photo])


# --------------------------------------------------------------------------- compile flags


@needs_ov
def test_openvino_flags_map_onto_its_options(runner: CliRunner, exported: dict, tmp_path: Path,
                                             photo: Path) -> None:
    out = tmp_path / "ov"
    _ok(runner.invoke(cli, ["compile", str(exported["timm"]), "-b", "openvino", "-o", str(out), "--hint",
                            "throughput", "--streams", "2", "--inference-precision", "f32", "--batch", "2"]))
    target = read_manifest(out).target
    assert (target["performance_hint"], target["num_streams"], target["inference_precision_hint"],
            target["static_batch"]) == ("THROUGHPUT", 2, "f32", 2)
    assert read_manifest(out).component().inputs[0].shape[0] == 2
    from enginekit.api import load_runner

    runner_, _ = load_runner(out, device="cpu")
    with runner_:
        assert int(runner_._compiled.get_property("NUM_STREAMS")) == 2
    np.testing.assert_allclose(_logits(out, photo), _logits(exported["timm"], photo, backend="onnxruntime")
                               if "onnxruntime" in installed_backends() else _logits(out, photo), atol=1e-4)
    # --fp16 is --precision fp16
    half = tmp_path / "half"
    _ok(runner.invoke(cli, ["compile", str(exported["timm"]), "-b", "openvino", "-o", str(half), "--fp16"]))
    assert read_manifest(half).component().precision == "fp16"


@needs_ort
def test_onnxruntime_flags_fusions_and_static_batch(runner: CliRunner, exported: dict, tmp_path: Path,
                                                    photo: Path) -> None:
    out = tmp_path / "fused"
    result = _ok(runner.invoke(cli, ["compile", str(exported["timm"]), "-b", "onnxruntime", "-o", str(out),
                                     "--graph-optimization-level", "basic", "--transformer-fusions", "--batch", "2"]))
    assert "fused" in result.output
    manifest = read_manifest(out)
    assert manifest.target["graph_optimization_level"] == "basic" and manifest.target["static_batch"] == 2
    fusions = manifest.target["transformer_fusions"]
    assert fusions["model_type"] == "vit" and fusions["fused"]  # e.g. SkipLayerNormalization, BiasGelu
    check = fusions["check"]
    assert check["reference"] == "the unfused graph" and check["logits_max_abs"] <= check["budget_max_abs"]
    assert manifest.component().inputs[0].shape == (2, 3, 32, 32)
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / manifest.component().entry)).graph.node}
    assert ops & set(fusions["fused"])  # the fused kernels are in the saved graph
    np.testing.assert_allclose(_logits(out, photo), _logits(exported["timm"], photo), atol=1e-4)


@needs_ort
@needs_ov
@pytest.mark.parametrize("args, needles", [
    (["-b", "onnxruntime", "--streams", "2"], ["--streams is a openvino option", "--transformer-fusions"]),
    (["-b", "onnxruntime", "--hint", "latency"], ["--hint is a openvino option"]),
    (["-b", "openvino", "--transformer-fusions"], ["--transformer-fusions is a onnxruntime option", "--streams"]),
    (["-b", "openvino", "--graph-optimization-level", "all"], ["--graph-optimization-level is a onnxruntime"]),
    (["-b", "openvino", "--streams", "2", "--option", "num_streams=3"], ["num_streams is given twice"]),
    (["-b", "openvino", "--fp16", "--precision", "fp32"], ["--fp16 and --precision fp32 disagree"]),
    (["-b", "onnxruntime", "--fp16"], ["enginekit quantize ART --method fp16"]),
    (["-b", "openvino", "--int8", "--fp16"], ["--int8 and --precision fp16 disagree"]),
    (["-b", "openvino", "--calibration", "photos"], ["--calibration is for --int8"]),
    (["-b", "onnxruntime", "-d", "gpu"], ["device 'gpu' is not available here", "onnxruntime-gpu"]),
])  # fmt: skip
def test_wrong_combinations_are_one_line(runner: CliRunner, exported: dict, tmp_path: Path, args: list[str],
                                         needles: list[str]) -> None:
    out = tmp_path / "never"
    _one_line_error(runner.invoke(cli, ["compile", str(exported["timm"]), "-o", str(out), *args]), *needles)
    assert not out.exists()


@needs_ort
@needs_ov
def test_fusions_refused_off_vit(runner: CliRunner, tmp_path: Path, photo: Path) -> None:
    """A non-ViT timm model exports with its own family (resnet), and ViT fusions refuse it."""
    onnx_dir = tmp_path / "resnet"
    _ok(runner.invoke(cli, ["export", "timm:resnet18", "--random-weights", "-o", str(onnx_dir)]))
    manifest = read_manifest(onnx_dir)
    assert manifest.family == "resnet" and manifest.provenance["architecture"] == "resnet18"
    assert manifest.fidelity["logits_max_abs"] <= manifest.fidelity["budget_max_abs"]
    _one_line_error(runner.invoke(cli, ["compile", str(onnx_dir), "-b", "onnxruntime", "-o", str(tmp_path / "f"),
                                        "--transformer-fusions"]),
                    "transformer fusions (model_type vit) are for ViT classifiers", "'resnet'")
    # it runs like any classifier
    assert len(json.loads(_ok(runner.invoke(cli, ["predict", str(onnx_dir), str(photo), "--json"])).output)) == 1


# --------------------------------------------------------------------------- --int8 / --fp16


@needs_ort
def test_int8_shortcuts(runner: CliRunner, exported: dict, tmp_path: Path) -> None:
    q = tmp_path / "q"
    _ok(runner.invoke(cli, ["quantize", str(exported["timm"]), "--int8", "-o", str(q)]))
    assert read_manifest(q).quantization["method"] == "int8-dynamic"
    half = tmp_path / "half"
    _ok(runner.invoke(cli, ["quantize", str(exported["timm"]), "--fp16", "-o", str(half)]))
    assert read_manifest(half).quantization["method"] == "fp16"
    _one_line_error(runner.invoke(cli, ["quantize", str(exported["timm"]), "--int8", "-m", "fp16", "-o",
                                        str(tmp_path / "x")]), "--method and --int8 disagree")
    _one_line_error(runner.invoke(cli, ["quantize", str(exported["timm"]), "-o", str(tmp_path / "x")]),
                    "-m METHOD, --int8 or --fp16")
    # compile --int8: quantized with the backend's default method, then compiled; the parent is the ONNX
    engine = tmp_path / "engine"
    _ok(runner.invoke(cli, ["compile", str(exported["timm"]), "-b", "onnxruntime", "--int8", "-o", str(engine)]))
    manifest = read_manifest(engine)
    assert manifest.kind == "onnxruntime" and manifest.quantization["method"] == "int8-dynamic"
    parent = manifest.provenance["parent"]
    assert parent["path"] == str(exported["timm"].resolve()) and parent["quantized_with"] == "int8-dynamic"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


@needs_ov
def test_compile_int8_on_openvino_calibrates_on_photos(runner: CliRunner, exported: dict, tmp_path: Path) -> None:
    engine = tmp_path / "ov-int8"
    _ok(runner.invoke(cli, ["compile", str(exported["timm"]), "-b", "openvino", "--int8", "--batch", "1",
                            "-o", str(engine)]))
    manifest = read_manifest(engine)
    assert manifest.quantization["method"] == "int8-static"
    assert manifest.quantization["calibration"]["source"].startswith("photos")
    assert manifest.target["static_batch"] == 1


# --------------------------------------------------------------------------- export --model / --task


def test_export_takes_optimum_style_arguments(runner: CliRunner, tiny_timm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "optimum-style"
    _ok(runner.invoke(cli, ["export", "--model", str(tiny_timm_dir), "--task", "image-classification", str(out)]))
    assert read_manifest(out).task == "image-classification" and read_manifest(out).family == "vit"
    _one_line_error(runner.invoke(cli, ["export", "tiny-sd15", "--task", "image-classification", "-o",
                                        str(tmp_path / "x")]), "'tiny-sd15' is a text-to-image source")
    _one_line_error(runner.invoke(cli, ["export", "--model", "timm:vit_tiny_patch16_224", "--task",
                                        "text-to-image", str(tmp_path / "x")]), "image-classification source")
    _one_line_error(runner.invoke(cli, ["export", "--model", str(tiny_timm_dir), "-o", str(tmp_path / "y"),
                                        str(tmp_path / "z")]), "OUTPUT is given twice")
    assert not (tmp_path / "x").exists()
    usage = runner.invoke(cli, ["export", str(tiny_timm_dir)])
    assert usage.exit_code == 2 and "-o OUTPUT" in usage.output


# --------------------------------------------------------------------------- devices


@needs_ov
def test_device_aliases(runner: CliRunner, exported: dict, tmp_path: Path, photo: Path) -> None:
    engine = tmp_path / "ov"
    _ok(runner.invoke(cli, ["compile", str(exported["timm"]), "-b", "openvino", "-o", str(engine)]))
    shown = _ok(runner.invoke(cli, ["predict", str(engine), str(photo), "-d", "AUTO", "--json"]))
    auto = json.loads(shown.output)[0]
    plain = json.loads(_ok(runner.invoke(cli, ["predict", str(engine), str(photo), "-d", "cpu", "--json"])).output)[0]
    assert auto["label"] == plain["label"] and auto["score"] == pytest.approx(plain["score"], abs=1e-5)
    import enginekit

    with enginekit.load(engine, device="AUTO") as clf:
        assert clf.device.startswith("auto:")  # OpenVINO's AUTO plugin, and what it picked
    with enginekit.load(engine, device="auto") as clf:
        assert clf.device == "cpu"  # enginekit's own pick
    from enginekit.registry import get_backend

    if not [d for d in get_backend("openvino").devices() if d.startswith("gpu")]:  # refused where absent
        _one_line_error(runner.invoke(cli, ["predict", str(engine), str(photo), "-d", "GPU"]),
                        "device 'GPU' is not available here (available: cpu")


# --------------------------------------------------------------------------- edge boxes


@needs_ov
def test_onnx_artifact_runs_on_openvino_without_compile(runner: CliRunner, exported: dict, photo: Path) -> None:
    for name in ("timm", "hf"):
        ov = _logits(exported[name], photo, backend="openvino")
        if "onnxruntime" in installed_backends():
            np.testing.assert_allclose(ov, _logits(exported[name], photo, backend="onnxruntime"), atol=1e-4)
    shown = _ok(runner.invoke(cli, ["predict", str(exported["timm"]), str(photo), "--backend", "openvino"]))
    assert "openvino:cpu" in shown.output


_BLOCKED = """
import sys
sys.modules["onnxruntime"] = None  # as on a box where only enginekit[openvino] is installed
import enginekit, json
from pathlib import Path
path, photo = sys.argv[1], sys.argv[2]
with enginekit.load(path, device="cpu") as clf:  # no backend named: the one installed
    pred, backend = clf.predict([photo])[0], clf.backend
try:
    enginekit.load(path, backend="onnxruntime")
    refused = ""
except Exception as exc:
    refused = f"{type(exc).__name__}: {exc}"
print(json.dumps({"refused": refused, "label": pred.label, "score": pred.score, "backend": backend,
                  "onnxruntime": sys.modules.get("onnxruntime") is not None}))
"""


def test_onnx_artifact_on_an_openvino_only_box(exported: dict, photo: Path, tmp_path: Path) -> None:
    """With onnxruntime unimportable, the plain load runs the export on OpenVINO, no flag needed; asking
    for onnxruntime by name names the extra to install."""
    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKED)
    proc = subprocess.run([sys.executable, str(script), str(exported["timm"]), str(photo)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["onnxruntime"] is False and out["backend"] == "openvino"
    assert "BackendUnavailableError" in out["refused"] and "enginekit[onnxruntime]" in out["refused"]
    import enginekit

    with enginekit.load(exported["timm"], backend="openvino", device="cpu") as clf:
        here = clf.predict([photo])[0]
    assert out["label"] == here.label and out["score"] == pytest.approx(here.score, abs=1e-6)


# --------------------------------------------------------------------------- help


def test_help_names_optimize_and_photos(runner: CliRunner) -> None:
    top = _ok(runner.invoke(cli, ["--help"])).output
    assert "optimize MODEL" in top and "optimize" in top.split("Commands:")[1]
    for command in (["quantize"], ["compile"], ["optimize"]):
        text = " ".join(_ok(runner.invoke(cli, [*command, "--help"])).output.split())
        assert "'photos'" in text, command


# --------------------------------------------------------------------------- optimize's rebuild commands


def _fake_bench(latency_by_name: dict[str, float]) -> Any:
    from enginekit.bench.harness import engine_info, make_record

    def bench(path: Path, config: Any, device: str = "cpu", backend: str | None = None, **_: Any) -> list[dict]:
        manifest = read_manifest(path)
        p50 = latency_by_name.get(Path(path).name, 9.0)
        stats = {"p50": p50, "p90": p50, "p99": p50, "mean": p50, "min": p50, "max": p50, "count": 3}
        result = {"batch": 1, "latency_ms": stats, "throughput_ips": 1000.0 / p50, "runs": 3}
        return [make_record(engine=engine_info(path, manifest, backend or "onnxruntime", device), result=result,
                            threads=0, size_bytes=1, model=manifest.provenance.get("source"))]

    return bench


@needs_ov
@needs_ort
def test_optimize_pick_rebuilds_by_hand(runner: CliRunner, tiny_timm_dir: Path, tmp_path: Path, photo: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands optimize prints rebuild its pick: same manifest options, same outputs."""
    import enginekit.bench.harness as harness
    from enginekit.app.optimize import OptimizeConfig, optimize
    from enginekit.app.rebuild import rebuild_commands

    monkeypatch.setattr(harness, "bench_artifact", _fake_bench({"openvino-int8-static": 1.0}))
    config = OptimizeConfig(backends=("onnxruntime", "openvino"), precisions=("fp32", "int8"), min_agreement=0.0,
                            min_cosine=0.0, data="photos", calibration_size=16, eval_size=16, warmup=1, runs=3,
                            batch=2)
    work = tmp_path / "work"
    report = optimize(str(tiny_timm_dir), tmp_path / "best", config, work_dir=work, progress=False)
    assert report["picked"] == "openvino-int8-static"
    assert "enginekit compile" in (tmp_path / "best" / "report.md").read_text()
    by_name = {c["candidate"]["name"]: c["candidate"] for c in report["candidates"]}
    hand = tmp_path / "hand"
    hand.mkdir()
    monkeypatch.chdir(hand)
    for name in ("openvino-int8-static", "openvino-fp32", "onnxruntime-fp32", "onnxruntime-int8-static"):
        commands = report["rebuild"] if name == report["picked"] else rebuild_commands(report, by_name[name])
        for line in commands:
            argv = shlex.split(line)
            assert argv[0] == "enginekit"
            if argv[1] == "export" and (hand / "onnx").exists():
                continue
            _ok(runner.invoke(cli, argv[1:]))
        built = hand / name
        reference = tmp_path / "best" if name == report["picked"] else (
            work / "candidates" / name if (work / "candidates" / name).exists() else work / "quantized" / name)
        ours, theirs = read_manifest(built), read_manifest(reference)
        for key in ("static_batch", "inference_precision_hint", "performance_hint", "graph_optimization_level"):
            assert ours.target.get(key) == theirs.target.get(key), (name, key)
        assert (ours.quantization or {}).get("method") == (theirs.quantization or {}).get("method"), name
        backend = by_name[name]["backend"]
        np.testing.assert_allclose(_logits(built, photo, backend=backend), _logits(reference, photo, backend=backend),
                                   atol=1e-5, err_msg=name)
    # the pick's compile line carries the real flags
    assert report["rebuild"][-1] == ("enginekit compile openvino-int8-static-quantized -b openvino "
                                     "-o openvino-int8-static --batch 2 --inference-precision f32")
