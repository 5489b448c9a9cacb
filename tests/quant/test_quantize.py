"""The quantize stage end to end: data, the fidelity gate, fallback, evaluate, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import enginekit
from enginekit.app.cli import cli
from enginekit.errors import FidelityError, InputError, OptionError, QuantizationError
from enginekit.manifest import read_manifest
from enginekit.quant.api import QuantizeRequest, evaluate_artifact, quantize_artifact
from enginekit.quant.base import METHODS, QuantOptions
from enginekit.quant.data import load_inputs, split_every
from enginekit.registry import backend_names

from ..conftest import TIMM_LABELS, make_photo


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos laid out one folder per class, the layout `evaluate --data` reads."""
    root = tmp_path_factory.mktemp("labelled")
    for c, label in enumerate(TIMM_LABELS):
        (root / label).mkdir()
        for i in range(5):
            make_photo((40 + 3 * i, 36 + 2 * c), seed=10 * c + i).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def default_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enginekit.export.vit import export_classifier

    out = tmp_path_factory.mktemp("default") / "onnx"
    export_classifier("default", out)
    return out


def test_folder_data_is_preprocessed_from_the_manifest(exported: dict, labelled: Path) -> None:
    parent = read_manifest(exported["timm"])
    data = load_inputs(labelled, parent, purpose="calibration")
    assert data.inputs.shape == (20, 3, 32, 32) and data.inputs.dtype == np.float32
    assert data.labels is not None and set(data.labels) == set(TIMM_LABELS)
    calib, held = split_every(data)
    assert calib.size == 16 and held.size == 4
    assert not set(map(bytes, calib.inputs)) & set(map(bytes, held.inputs))  # disjoint


def test_bad_data_specs(exported: dict, tmp_path: Path) -> None:
    parent = read_manifest(exported["timm"])
    with pytest.raises(InputError, match="refusing to calibrate on random noise"):
        load_inputs("synthetic", parent, purpose="calibration")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_inputs(tmp_path / "empty", parent, purpose="calibration")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"the model takes \(N, 3, 32, 32\)"):
        load_inputs(tmp_path / "wrong.npy", parent, purpose="calibration")
    with pytest.raises(InputError, match="belongs to the built-in default"):
        load_inputs("builtin", parent, purpose="calibration")
    with pytest.raises(InputError, match="no such file or folder"):
        load_inputs(tmp_path / "missing", parent, purpose="calibration")


def test_npy_calibration(exported: dict, tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(20, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    m = quantize_artifact(exported["timm"], tmp_path / "q", "int8-static", calibration=str(tmp_path / "calib.npy"))
    calib = m.quantization["calibration"]
    assert calib["size"] == 16 and calib["source"].startswith("npy:") and len(calib["sha256"]) == 64
    assert m.fidelity["samples"] == 4 and m.fidelity["reference"] == "float parent"


def _method_params() -> list:
    """Every method; Model Optimizer's skip, saying so, where it is not installed."""
    import importlib.util

    missing = importlib.util.find_spec("modelopt") is None
    return [pytest.param(b, m, id=f"{b}-{m}", marks=pytest.mark.skip(
                reason="NVIDIA Model Optimizer is not installed (pip install 'nvidia-modelopt[onnx]')")
                if missing and METHODS[(b, m)].target.startswith("enginekit.quant.modelopt:") else ())
            for b, m in sorted(METHODS)]


@pytest.mark.parametrize("backend,method", _method_params())
def test_every_method_passes_its_gate_and_loads(exported: dict, labelled: Path, tmp_path: Path,
                                                backend: str, method: str) -> None:
    out = tmp_path / "q"
    # group_size 16 divides the tiny model's 32 channels; only int4 methods read it.
    m = quantize_artifact(exported["timm"], out, method, backend=backend, calibration=str(labelled),
                          options=QuantOptions(group_size=16))
    spec = METHODS[(backend, method)]
    assert m.quantization["method"] == method and m.quantization["backend"] == backend
    assert m.target["backend"] == backend  # the target the backend says a quantized artifact has
    assert m.target.get("validated_on") == (None if backend in backend_names() else "onnxruntime cpu")
    assert m.fidelity["top1_agreement"] >= spec.min_agreement
    assert m.fidelity["logits_cosine"] >= spec.min_cosine
    assert "accuracy" in m.fidelity  # the held-out part of a labelled folder
    assert m.provenance["parent"]["manifest_sha256"] == read_manifest(exported["timm"]).digest()
    with enginekit.load(out, device="cpu") as clf:
        preds = clf.predict([make_photo((40, 40), 99)])
    assert preds[0].label in TIMM_LABELS


def test_gate_refuses_and_writes_nothing(exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "q"
    # int4 with 16-weight groups on a random tiny model cannot be this faithful.
    with pytest.raises(FidelityError, match=r"misses its fidelity budget .* logits cosine") as err:
        quantize_artifact(exported["timm"], out, "int4-weight", options=QuantOptions(group_size=16),
                          min_cosine=0.9999999, min_agreement=1.0)
    assert not out.exists() and [p for p in tmp_path.iterdir()] == []
    # what to try next: a weight-only int4 has no calibration to add or layers to fall back on
    tries = str(err.value).split("To try: ", 1)[1]
    assert "--group-size 32" in tries and "no calibration: int8-dynamic" in tries and "--min-cosine, now 1" in tries
    assert "--auto-fallback" not in tries and "calibration data" not in tries


def test_a_calibrated_method_that_misses_says_to_add_data_or_fall_back(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(FidelityError) as err:
        quantize_artifact(exported["timm"], tmp_path / "q", "int8-static", calibration="patterns",
                          calibration_size=8, min_cosine=0.9999999, min_agreement=1.0)
    tries = str(err.value).split("To try: ", 1)[1]
    assert "more or closer calibration data (it had 8" in tries and "--auto-fallback" in tries
    assert "no calibration: int8-dynamic" in tries


def test_auto_fallback_keeps_layers_in_float(exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "q"
    # A budget plain int8 misses on this model; keeping layers in float recovers it.
    m = quantize_artifact(exported["timm"], out, "int8-static", calibration="synthetic",
                          allow_synthetic_calibration=True, min_cosine=0.99995, auto_fallback=True)
    kept = m.quantization["excluded_nodes"]
    steps = m.quantization["fallback"]["steps"]
    assert kept and steps[0]["logits_cosine"] < 0.99995 <= m.fidelity["logits_cosine"]
    import onnx

    names = {n.name for n in onnx.load(str(exported["timm"] / "model.onnx")).graph.node}
    assert set(kept) <= names


def test_method_errors(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="backend 'openvino' cannot do 'int8-dynamic'"):
        quantize_artifact(exported["timm"], tmp_path / "a", "int8-dynamic", backend="openvino")
    with pytest.raises(QuantizationError, match="no quantization methods for backend 'nope'"):
        quantize_artifact(exported["timm"], tmp_path / "a", "fp16", backend="nope")
    with pytest.raises(InputError, match="needs calibration data"):
        quantize_artifact(exported["timm"], tmp_path / "a", "int8-static")
    with pytest.raises(QuantizationError, match="auto-fallback applies to calibrated"):
        quantize_artifact(exported["timm"], tmp_path / "a", "fp16", auto_fallback=True)
    with pytest.raises(QuantizationError, match="no quantization methods for backend 'nope'"):
        quantize_artifact(exported["timm"], tmp_path / "a", "fp16", QuantizeRequest(backend="nope"))
    with pytest.raises(OptionError, match="no field 'calib'"):
        quantize_artifact(exported["timm"], tmp_path / "a", "fp16", calib="builtin")


def test_quantized_artifact_is_not_quantized_again(exported: dict, tmp_path: Path) -> None:
    quantize_artifact(exported["timm"], tmp_path / "fp16", "fp16")
    with pytest.raises(QuantizationError, match="takes a float ONNX artifact"):
        quantize_artifact(tmp_path / "fp16", tmp_path / "again", "int8-dynamic")


def test_builtin_calibration_and_evaluate_on_the_default(default_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    m = quantize_artifact(default_onnx, out, "int8-static", calibration="builtin")
    assert m.quantization["calibration"]["source"] == "builtin:digits (training split)"
    assert m.fidelity["inputs"] == "builtin:digits (held-out split)" and m.fidelity["accuracy"] > 0.9
    report = evaluate_artifact(out)
    assert report["samples"] == 360 and report["reference"] == str(default_onnx.resolve())
    assert report["accuracy"] > 0.9 and report["top1_agreement"] > 0.95


def test_cli_quantize_and_evaluate(exported: dict, labelled: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "q"
    result = runner.invoke(cli, ["quantize", str(exported["timm"]), "-m", "int8-qdq", "--target", "tensorrt",
                                 "-c", str(labelled), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "agreement" in result.output
    result = runner.invoke(cli, ["evaluate", str(out), "--data", str(labelled), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["samples"] == 20 and 0 <= report["accuracy"] <= 1 and report["method"] == "int8-qdq"
    for args, needle in (
        (["-m", "int8-wat"], "cannot do 'int8-wat'"),
        (["-m", "int8-static", "-c", str(tmp_path / "nothing")], "no such file or folder"),
        (["-m", "int8-static", "-c", "synthetic"], "refusing to calibrate on random noise"),
        (["-m", "int8-dynamic", "-b", "openvino"], "cannot do 'int8-dynamic'"),
        (["-m", "int4-weight", "--min-cosine", "0.9999999", "--group-size", "16"], "misses its fidelity budget"),
    ):
        result = runner.invoke(cli, ["quantize", str(exported["timm"]), "-o", str(tmp_path / "x"), *args])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith("Error: ") and needle in result.output, result.output
    assert not (tmp_path / "x").exists()
