"""optimum-cli's quantization vocabulary: one set of names (fp16, bf16, int8, int4) for
classifiers and pipelines on every backend, the specific methods kept as names that say
what they map to, and NNCF's data-aware int4 options (--awq, --scale-estimation,
--dataset), each refused in one line before any work where it cannot run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from ..conftest import cli_ok as _ok, installed_backends, one_line_error as _one_line_error
from enginekit.app.cli import cli
from enginekit.errors import QuantizationError
from enginekit.manifest import read_manifest
from enginekit.quant.base import METHODS
from enginekit.quant.vocabulary import TABLE, VOCABULARY, describe, resolve

needs_ov = pytest.mark.skipif("openvino" not in installed_backends(), reason="openvino is not installed")
CLS, T2I = "image-classification", "text-to-image"




# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("task,backend,name,method", [
    (CLS, "onnxruntime", "int8", "int8-dynamic"), (CLS, "onnxruntime", "int4", "int4-weight"),
    (CLS, "onnxruntime", "fp16", "fp16"), (CLS, "onnxruntime", "bf16", "bf16"),
    (CLS, "openvino", "int8", "int8-static"), (CLS, "openvino", "int4", "int4-weight"),
    (CLS, "openvino", "fp16", "fp16"), (CLS, "tensorrt", "int8", "int8-modelopt"),
    (CLS, "onnxruntime", "int8-static", "int8-static"), (CLS, "openvino", "int8-weight", "int8-weight"),
    (T2I, "onnxruntime", "int8", "int8"), (T2I, "openvino", "int8", "int8"), (T2I, "openvino", "int4", "int4"),
    (T2I, "onnxruntime", "fp16", "fp16"),
])
def test_each_spelling_resolves_as_documented(task: str, backend: str, name: str, method: str) -> None:
    resolved = resolve(task, backend, name)
    assert resolved.method == method
    # a vocabulary name says nothing; a specific one says what it is, naming the vocabulary's name
    assert bool(resolved.note) == (name not in VOCABULARY)
    if resolved.note:
        assert "-m int" in resolved.note and name in resolved.note


def test_every_row_runs_a_registered_method_or_says_why_not() -> None:
    for (task, backend, name), row in TABLE.items():
        if row.method is None:
            assert row.note, (task, backend, name)
            with pytest.raises(QuantizationError, match=f"-m {name} on {backend}: "):
                resolve(task, backend, name)
        elif task == CLS:
            assert (backend, row.method) in METHODS, (backend, row.method)
    # every specific classifier method is reachable by its own name
    for backend, method in METHODS:
        assert resolve(CLS, backend, method).method == method
    assert describe(CLS, "onnxruntime", "int8") == ""


# --------------------------------------------------------------------------- the CLI


def test_help_lists_the_vocabulary() -> None:
    runner = CliRunner()
    for command in ("quantize", "export"):
        text = " ".join(_ok(runner.invoke(cli, [command, "--help"])).output.split())
        assert "fp16" in text and "int8" in text and "int4" in text and "--awq" in text, command
        assert "--scale-estimation" in text and "--dataset" in text, command
    text = " ".join(runner.invoke(cli, ["quantize", "--help"]).output.split())
    assert "onnxruntime: int8=int8-dynamic" in text and "openvino: int8=int8-static" in text
    assert "int8-weight" in text and "int8-qdq" in text


def test_vocabulary_name_and_old_name_run_the_same_method(exported: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    new = _ok(runner.invoke(cli, ["quantize", str(exported["timm"]), "-m", "int8", "-o", str(tmp_path / "new")]))
    assert "note:" not in new.stderr
    old = _ok(runner.invoke(cli, ["quantize", str(exported["timm"]), "-m", "int8-dynamic", "-o",
                                  str(tmp_path / "old")]))
    notes = [ln for ln in old.stderr.splitlines() if ln.startswith("note:")]
    assert notes == ["note: int8-dynamic is what -m int8 runs on onnxruntime"]
    a, b = read_manifest(tmp_path / "new").quantization, read_manifest(tmp_path / "old").quantization
    assert a["method"] == b["method"] == "int8-dynamic" and (a["asked"], b["asked"]) == ("int8", "int8-dynamic")
    # a specific name that is not the default says what -m int8 is instead
    out = runner.invoke(cli, ["quantize", str(exported["timm"]), "-m", "int8-static", "-c", "patterns",
                              "-o", str(tmp_path / "static")])
    assert "note: int8-static is onnxruntime's calibrated QDQ int8 (-m int8 there is int8-dynamic)" in out.stderr


def test_refused_names_say_what_to_type(exported: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    timm = str(exported["timm"])
    _one_line_error(runner.invoke(cli, ["quantize", timm, "-m", "fp32", "-o", str(tmp_path / "x")]),
                    "compile the export as it is")
    _one_line_error(runner.invoke(cli, ["quantize", timm, "-m", "bf16", "-b", "openvino", "-o", str(tmp_path / "x")]),
                    "-m fp16", "--inference-precision bf16")
    _one_line_error(runner.invoke(cli, ["quantize", timm, "-m", "int3", "-o", str(tmp_path / "x")]),
                    "it offers: fp16, bf16, int8, int4")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,needles", [
    (["-m", "int4", "-b", "openvino", "--awq"], ["--awq needs calibration data", "--dataset"]),
    (["-m", "int4", "--awq", "--dataset", "patterns"], ["runs on OpenVINO, not onnxruntime", "-b openvino"]),
    (["-m", "int4", "-b", "openvino", "--scale-estimation", "--dataset", "conceptual_captions"],
     ["conceptual_captions", "cannot be fetched offline", "image folder"]),
    (["-m", "int8", "-b", "openvino", "--awq", "--dataset", "patterns"], ["int4 weight compression"]),
    (["-m", "int4", "-b", "openvino", "--awq", "-c", "photos", "--dataset", "patterns"], ["disagree"]),
])
def test_bad_combinations_fail_in_one_line_before_any_work(exported: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                           needles: list[str]) -> None:
    import enginekit.quant.api as qapi

    def no_work(*a: Any, **k: Any) -> None:
        raise AssertionError("work started")

    monkeypatch.setattr(qapi, "quantize_artifact", no_work)
    out = tmp_path / "x"
    _one_line_error(CliRunner().invoke(cli, ["quantize", str(exported["timm"]), *args, "-o", str(out)]), *needles)
    assert not out.exists()


@pytest.mark.parametrize("args,needles", [
    (["tiny-sd15", "--weight-format", "int4", "--awq", "--dataset", "builtin"], ["-b openvino"]),
    (["tiny-sd15", "--weight-format", "int4", "-b", "openvino", "--awq"], ["--dataset", "prompts file"]),
    (["tiny-sd15", "--weight-format", "int4", "-b", "openvino", "--awq", "--dataset",
      "laion/220k-GPT4Vision-captions-from-LIVIS"], ["cannot be fetched offline", "prompts file"]),
    (["tiny-sd15", "--weight-format", "int4", "--dataset", "builtin"], ["the ONNX weight pass is data-free"]),
    (["tiny-sd15", "--weight-format", "bf16", "-b", "openvino"], ["export MODEL --weight-format bf16"]),
    (["default", "--weight-format", "int4", "--scale-estimation", "--dataset", "coco"], ["-b openvino"]),
    (["default", "--weight-format", "int4", "-b", "openvino", "--scale-estimation", "--dataset", "coco"],
     ["cannot be fetched offline"]),
])
def test_export_refuses_bad_combinations_before_exporting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          args: list[str], needles: list[str]) -> None:
    import enginekit.export.diffusion.sd as sd
    import enginekit.export.vit as vit

    def no_work(*a: Any, **k: Any) -> None:
        raise AssertionError("export started")

    monkeypatch.setattr(sd, "export_pipeline", no_work)
    monkeypatch.setattr(vit, "export_classifier", no_work)
    _one_line_error(CliRunner().invoke(cli, ["export", *args, "-o", str(tmp_path / "x")]), *needles)
    assert not (tmp_path / "x").exists()


def test_export_quantizes_a_classifier_for_its_backend(tiny_timm_dir: Path, tmp_path: Path) -> None:
    """``export --weight-format int8``: exported, then quantized with the backend's int8 and gated;
    the float export in between is removed; a specific name prints what it is."""
    runner = CliRunner()
    out = tmp_path / "int8"
    _ok(runner.invoke(cli, ["export", str(tiny_timm_dir), "--weight-format", "int8", "-o", str(out)]))
    manifest = read_manifest(out)
    assert manifest.quantization["method"] == "int8-dynamic" and manifest.quantization["asked"] == "int8"
    assert manifest.fidelity["reference"] == "float parent" and manifest.fidelity["top1_agreement"] >= 0.95
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]  # no scratch export left
    res = runner.invoke(cli, ["export", str(tiny_timm_dir), "--weight-format", "int4-weight", "-o", str(out)])
    assert res.exit_code != 0 and "already exists" in res.stderr  # refused before exporting again
    assert res.stderr.splitlines()[0] == "note: int4-weight is what -m int4 runs on onnxruntime"


# --------------------------------------------------------------------------- NNCF's data-aware int4


def _tiny_awq_graph(path: Path) -> np.ndarray:
    """MatMul -> Relu -> MatMul -> MatMul (an activation feeding a MatMul: AWQ's Act_MatMul pattern),
    with a few activation channels much larger than the rest, as AWQ expects of real models.
    Returns calibration inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dims = 128
    weights = [(rng.standard_normal((dims, dims)) / np.sqrt(dims)).astype(np.float32) for _ in range(3)]
    weights[0][:, :6] *= 20.0  # salient channels in the activation the int4 layer reads
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["a0"]),
             helper.make_node("MatMul", ["a0", "w1"], ["h1"]), helper.make_node("MatMul", ["h1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "awq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, dims])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 16, dims])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return rng.standard_normal((24, 1, 16, dims)).astype(np.float32)


def _ir(path: Path) -> tuple[Counter, bytes]:
    import openvino as ov

    model = ov.Core().read_model(str(path / "model.xml"))
    return Counter(op.get_type_name() for op in model.get_ops()), (path / "model.bin").read_bytes()


@needs_ov
def test_awq_and_scale_estimation_change_the_int4_weights(tmp_path: Path) -> None:
    """Structure (AWQ's Multiply before the layer it found; scale estimation: the same ops) and
    numbers (different int4 constants; closer to the float model on the calibration data)."""
    import onnxruntime as ort

    from enginekit.quant import openvino as ovq
    from enginekit.quant.base import QuantJob, QuantOptions

    model = tmp_path / "model.onnx"
    x = _tiny_awq_graph(model)
    results = {}
    for name, extra in (("plain", {}), ("awq", {"awq": True}), ("se", {"scale_estimation": True})):
        out = tmp_path / name
        results[name] = ovq.int4_weight(QuantJob(model, out, "x", x if extra else None,
                                                 QuantOptions(group_size=32, **extra)))
    (plain_ops, plain_bin), (awq_ops, awq_bin), (se_ops, se_bin) = (_ir(tmp_path / n) for n in ("plain", "awq", "se"))
    found = results["awq"].details["awq_multiplies"]
    assert results["awq"].details["awq"] and found >= 1
    assert awq_ops["Multiply"] == plain_ops["Multiply"] + found and se_ops == plain_ops
    assert results["se"].details["scale_estimation"] and results["se"].details["subset_size"] == len(x)
    # AWQ adds its per-channel scales (float32) beside the same int4 weights; scale estimation
    # rewrites the scales of the same constants
    assert len(plain_bin) < len(awq_bin) <= len(plain_bin) + found * 128 * 4
    assert len(se_bin) == len(plain_bin) and se_bin != plain_bin

    import openvino as ov

    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    core = ov.Core()

    def error(name: str) -> float:
        compiled = core.compile_model(str(tmp_path / name / "model.xml"), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32"})
        return float(np.mean([np.abs(compiled([s[None]])[0] - reference.run(None, {"x": s[None]})[0]).mean()
                              for s in x[:8]]))

    base = error("plain")  # measured 0.309; AWQ 0.251, scale estimation 0.266
    assert error("awq") < base and error("se") < base


@needs_ov
def test_cli_scale_estimation_on_a_classifier_is_recorded_and_gated(exported: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    timm = str(exported["timm"])
    common = ["quantize", timm, "-m", "int4", "-b", "openvino", "--group-size", "16"]
    # the weights to compare with (plain int4 on this random-weight ViT is at the edge of the budget)
    _ok(runner.invoke(cli, [*common, "--min-agreement", "0", "-o", str(tmp_path / "plain")]))
    _ok(runner.invoke(cli, [*common, "--scale-estimation", "--awq", "--dataset", "patterns",
                            "-o", str(tmp_path / "se")]))
    q = read_manifest(tmp_path / "se")
    assert q.quantization["method"] == "int4-weight" and q.quantization["scale_estimation"] is True
    # a ViT's MLP has GELU between its MatMuls, which AWQ cannot scale through: NNCF finds no pattern
    assert q.quantization["awq"] is True and q.quantization["awq_multiplies"] == 0
    assert q.quantization["calibration"]["source"].startswith("patterns")
    assert q.fidelity["budget"] and q.fidelity["logits_cosine"] >= q.fidelity["budget"]["min_cosine"]
    (plain_ops, plain_bin), (se_ops, se_bin) = _ir(tmp_path / "plain"), _ir(tmp_path / "se")
    assert plain_ops == se_ops and len(plain_bin) == len(se_bin) and plain_bin != se_bin


@needs_ov
@pytest.mark.slow
def test_export_pipeline_int4_awq_on_openvino(tmp_path: Path) -> None:
    """optimum-cli's ``export openvino --weight-format int4 --awq --scale-estimation --dataset``:
    the float export, then NNCF on OpenVINO with the denoiser calibrated on its recorded inputs,
    gated on the image; AWQ finds its patterns in the UNet (SiLU before the time projections)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox sleeping in fresh snow\na lighthouse on a cliff at dusk\n")
    out = tmp_path / "sd15-int4"
    _ok(CliRunner().invoke(cli, ["export", "tiny-sd15", "--weight-format", "int4", "-b", "openvino", "--group-size",
                                 "16", "--awq", "--scale-estimation", "--dataset", str(prompts), "-o", str(out)]))
    manifest = read_manifest(out)
    q = manifest.quantization
    assert manifest.kind == "openvino" and q["method"] == "int4" and q["backend"] == "openvino"
    assert q["data_aware"] == {"awq": True, "scale_estimation": True, "component": "unet"}
    assert q["calibration"]["source"] == str(prompts) and q["calibration"]["samples"] > 0
    unet = q["components"]["unet"]
    assert unet["awq_multiplies"] > 0 and unet["scale_estimation"] and unet["subset_size"] > 0
    assert manifest.fidelity["vs_parent"]["psnr_db"] >= manifest.fidelity["budget"]["min_psnr_db"]
    assert {p.name for p in tmp_path.iterdir()} == {"prompts.txt", "sd15-int4"}  # no scratch export left
