"""OpenVINO quantization methods (NNCF) on the tiny timm ViT.

Two things per method, as onnxruntime's own quantization tests do: the
structure of the IR it writes (FakeQuantize ops, low-precision constants, the
size of model.bin) and its numbers (the IR, loaded by our OpenVINO runner with
its f32 hint, against the float ONNX on ONNX Runtime).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
pytest.importorskip("nncf")
ort = pytest.importorskip("onnxruntime")

from enginekit.artifact import make_component, write_manifest  # noqa: E402
from enginekit.errors import QuantizationError  # noqa: E402
from enginekit.fidelity import compare_outputs  # noqa: E402
from enginekit.manifest import read_manifest  # noqa: E402
from enginekit.quant import openvino as ovq  # noqa: E402
from enginekit.quant.base import METHODS, MethodResult, QuantJob, QuantOptions  # noqa: E402
from enginekit.runtimes.openvino import OpenVINOBackend  # noqa: E402

INPUT = "pixel_values"
#: Divides the tiny ViT's 32 and 64 input channels (the default 128 does not).
GROUP = 16
#: Per method: precision label, FakeQuantize expected, the low-precision
#: constant types that must appear, model.bin at most this share of fp32's,
#: and the inference precision hint it asks the runner for.
EXPECT = {
    "int8-static": ("int8", True, {"i8"}, 0.40, "f32"),
    "int8-weight": ("int8", False, {"u8"}, 0.40, "default"),
    "int4-weight": ("int4", False, {"i4"}, 0.30, "default"),
    "fp16": ("fp16", False, {"f16"}, 0.55, "default"),
}


@pytest.fixture(scope="module")
def onnx_model(exported: dict[str, Path]) -> Path:
    return exported["timm"] / "model.onnx"


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(onnx_model: Path, held_out: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    logits, embedding = sess.run(["logits", "embedding"], {INPUT: held_out})
    return {"logits": logits, "embedding": embedding}


@pytest.fixture(scope="module")
def fp32_bin_size(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    out = tmp_path_factory.mktemp("ov-fp32") / "model.xml"
    ov.save_model(ov.convert_model(str(onnx_model)), str(out), compress_to_fp16=False)
    return out.with_suffix(".bin").stat().st_size


def _job(model: Path, out: Path, calibration: np.ndarray | None, **options: object) -> QuantJob:
    return QuantJob(model, out, INPUT, calibration, QuantOptions(**options))


@pytest.fixture(scope="module", params=list(EXPECT))
def quantized(request: pytest.FixtureRequest, onnx_model: Path, calibration: np.ndarray,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[str, MethodResult, Path]:
    """Each method run once through the registry: (name, result, out_dir)."""
    name = request.param
    out = tmp_path_factory.mktemp(f"ov-{name}")
    method = METHODS[("openvino", name)]
    result = method.load()(_job(onnx_model, out, calibration if method.needs_calibration else None, group_size=GROUP))
    return name, result, out


def _ops(xml: Path) -> list:
    return list(ov.Core().read_model(str(xml)).get_ordered_ops())


def _feeds_fq(op: object, port: int) -> bool:
    return op.input_value(port).get_node().get_type_name() == "FakeQuantize"


def _load(onnx_model: Path, out: Path, result: MethodResult, hint: str):
    """Our OpenVINO runner on the method's output, with a target as quant/api.py writes it."""
    parent = read_manifest(onnx_model.parent)
    comp = parent.component()
    component = make_component(out, comp.name, result.entry, result.files, comp.inputs, comp.outputs, result.precision)
    manifest = parent.replace(
        kind=result.kind,
        components={comp.name: component},
        target={"backend": "openvino", "device": "cpu", "performance_hint": "LATENCY",
                "inference_precision_hint": hint},
        quantization=result.details,
    )
    write_manifest(out, manifest)
    return OpenVINOBackend().load(out, manifest, "cpu")


def test_result_describes_an_openvino_ir(quantized: tuple[str, MethodResult, Path]) -> None:
    name, result, out = quantized
    assert (result.kind, result.entry, result.files) == ("openvino", "model.xml", ("model.xml", "model.bin"))
    assert result.precision == EXPECT[name][0]
    assert result.details["inference_precision_hint"] == EXPECT[name][4]
    assert result.details["method"] == name
    assert "openvino_version" in result.details
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "model.xml"]


def test_structure(quantized: tuple[str, MethodResult, Path], fp32_bin_size: int) -> None:
    name, _, out = quantized
    _, has_fq, low, max_share, _ = EXPECT[name]
    ops = _ops(out / "model.xml")
    n_fq = sum(op.get_type_name() == "FakeQuantize" for op in ops)
    assert (n_fq > 0) == has_fq, f"{name}: {n_fq} FakeQuantize ops"
    consts = Counter(op.get_output_element_type(0).get_type_name() for op in ops if op.get_type_name() == "Constant")
    assert low <= set(consts), f"{name}: constants {dict(consts)}"
    share = (out / "model.bin").stat().st_size / fp32_bin_size
    assert share <= max_share, f"{name}: model.bin is {share:.0%} of fp32's"
    if name == "int8-static":
        # Every linear layer reads an int8 activation (the attention MatMuls live inside SDPA ops).
        matmuls = [op for op in ops if op.get_type_name() == "MatMul"]
        assert matmuls and all(_feeds_fq(op, 0) for op in matmuls)


def test_numbers_against_float_onnx(quantized: tuple[str, MethodResult, Path], onnx_model: Path,
                                    held_out: np.ndarray, reference: dict[str, np.ndarray]) -> None:
    name, result, out = quantized
    budget = METHODS[("openvino", name)]
    # f32, and the hint the method records (bf16 on AMX CPUs for "default").
    for hint in dict.fromkeys(["f32", result.details["inference_precision_hint"]]):
        with _load(onnx_model, out, result, hint) as runner:
            got = runner.run({INPUT: held_out})
        report = compare_outputs(reference, got)
        assert report["logits_cosine"] >= budget.min_cosine, f"{name} ({hint}): {report}"
        assert report["top1_agreement"] >= budget.min_agreement, f"{name} ({hint}): {report}"


def test_int8_static_needs_calibration(onnx_model: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="needs calibration"):
        ovq.int8_static(_job(onnx_model, tmp_path, None))
    with pytest.raises(QuantizationError, match="calibration must be"):
        ovq.int8_static(_job(onnx_model, tmp_path, np.zeros((0, 3, 32, 32), np.float32)))


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_int4_ratio_out_of_range(onnx_model: Path, tmp_path: Path, ratio: float) -> None:
    with pytest.raises(QuantizationError, match=r"ratio must be in \(0, 1\]"):
        ovq.int4_weight(_job(onnx_model, tmp_path, None, group_size=GROUP, ratio=ratio))


@pytest.mark.parametrize("group_size", [0, -2])
def test_int4_group_size_not_positive(onnx_model: Path, tmp_path: Path, group_size: int) -> None:
    with pytest.raises(QuantizationError, match="group_size must be a positive integer or -1"):
        ovq.int4_weight(_job(onnx_model, tmp_path, None, group_size=group_size))


def test_int4_group_size_falls_back_to_a_divisor(onnx_model: Path, tmp_path: Path) -> None:
    """128 divides none of the tiny ViT's 32- and 64-wide inputs: those layers take groups of 32 and 64
    (NNCF's ADJUST: the largest power of two that divides) instead of failing the build, and the
    record says so."""
    import openvino as ov

    result = ovq.int4_weight(_job(onnx_model, tmp_path, None, group_size=128))
    assert result.details["group_size"] == 128 and "adjust" in result.details["group_size_fallback"]
    model = ov.Core().read_model(str(tmp_path / result.entry))
    int4 = [list(op.get_output_shape(0)) for op in model.get_ops()
            if op.get_type_name() == "Constant" and op.get_element_type() in (ov.Type.i4, ov.Type.u4)]
    assert int4 and {shape[-1] for shape in int4} == {32, 64}, int4  # (N, K / group, group)


def test_unknown_calibrate_method(onnx_model: Path, calibration: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="calibrate_method must be minmax, percentile or entropy"):
        ovq.int8_static(_job(onnx_model, tmp_path, calibration, calibrate_method="kl"))


def test_unknown_exclude_node(onnx_model: Path, calibration: np.ndarray, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="exclude_nodes not in the OpenVINO model: 'no_such_op'"):
        ovq.int8_static(_job(onnx_model, tmp_path, calibration, exclude_nodes=("no_such_op",)))


def test_exclude_nodes_stay_float(onnx_model: Path, calibration: np.ndarray, tmp_path: Path) -> None:
    matmuls = [op.get_friendly_name() for op in ov.convert_model(str(onnx_model)).get_ordered_ops()
               if op.get_type_name() == "MatMul"]
    excluded = matmuls[0]
    result = ovq.int8_static(_job(onnx_model, tmp_path, calibration, exclude_nodes=(excluded,)))
    assert result.details["exclude_nodes"] == [excluded]
    by_name = {op.get_friendly_name(): op for op in _ops(tmp_path / "model.xml")}
    kept = by_name[excluded]
    assert not any(_feeds_fq(kept, i) for i in range(kept.get_input_size()))
    # Its weight stays a float constant; the other linear layers are still quantized.
    assert kept.input_value(1).get_node().get_output_element_type(0).get_type_name() == "f32"
    assert all(_feeds_fq(by_name[n], 0) for n in matmuls[1:])


def test_sensitivity_ranks_ir_ops(onnx_model: Path, calibration: np.ndarray, held_out: np.ndarray,
                                  tmp_path: Path) -> None:
    ranked = ovq.sensitivity(_job(onnx_model, tmp_path, calibration), held_out)
    kinds = {op.get_friendly_name(): op.get_type_name() for op in ov.convert_model(str(onnx_model)).get_ops()}
    assert ranked and all(name in kinds for name, _ in ranked)
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores)
    # Every linear layer int8-static quantizes is ranked, under a name IgnoredScope accepts.
    assert {n for n, k in kinds.items() if k == "MatMul"} <= {n for n, _ in ranked}
