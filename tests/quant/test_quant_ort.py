"""ONNX Runtime quantization methods on the tiny seeded ViT: structure (which
nodes each quantizer wrote) and numbers (logits close to the float model)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, numpy_helper  # noqa: E402

from enginekit.errors import QuantizationError  # noqa: E402
from enginekit.fidelity import compare_outputs  # noqa: E402
from enginekit.quant import ort as quant  # noqa: E402
from enginekit.quant import ort_graph  # noqa: E402
from enginekit.runtimes.onnxruntime import run_onnx_file
from enginekit.quant.base import METHODS, MethodResult, QuantJob, QuantOptions  # noqa: E402

INPUT = "pixel_values"
#: Method function -> its registry key; the budgets come from the registry.
CASES: dict[str, tuple[Callable[[QuantJob], MethodResult], tuple[str, str], str]] = {
    "int8-dynamic": (quant.int8_dynamic, ("onnxruntime", "int8-dynamic"), "int8"),
    "int8-static": (quant.int8_static, ("onnxruntime", "int8-static"), "int8"),
    "int4-weight": (quant.int4_weight, ("onnxruntime", "int4-weight"), "int4"),
    "fp16": (quant.fp16, ("onnxruntime", "fp16"), "fp16"),
    "int8-qdq": (quant.int8_qdq_tensorrt, ("tensorrt", "int8-qdq"), "int8-qdq"),
}
#: The tiny model's K is 32 or 64: a block of 16 gives every row several blocks.
GROUP = 16


def _job(model: Path, out_dir: Path, calibration: np.ndarray | None, **options: Any) -> QuantJob:
    out_dir.mkdir(parents=True, exist_ok=True)
    return QuantJob(model, out_dir, INPUT, calibration, QuantOptions(**{"group_size": GROUP, **options}))


def _run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    return run_onnx_file(path, {INPUT: x})


def _graph(path: Path) -> Any:
    return onnx.load(str(path)).graph


def _ops(graph: Any) -> Counter:
    return Counter(n.op_type for n in graph.node)


def _producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _initializers(graph: Any) -> dict[str, Any]:
    return {i.name: i for i in graph.initializer}


def _const_matmuls(graph: Any) -> list[str]:
    inits = _initializers(graph)
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]


@pytest.fixture(scope="module")
def float_model(exported: dict[str, Path]) -> Path:
    return exported["timm"] / "model.onnx"


@pytest.fixture(scope="module")
def float_graph(float_model: Path) -> Any:
    return _graph(float_model)


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(8, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(float_model: Path, held_out: np.ndarray) -> dict[str, np.ndarray]:
    return _run(float_model, held_out)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, float_model: Path,
            calibration: np.ndarray) -> dict[str, tuple[MethodResult, Path]]:
    """Every method once with default options: {name: (result, out_dir)}."""
    root = tmp_path_factory.mktemp("quant-ort")
    out = {}
    for name, (fn, _, _) in CASES.items():
        job = _job(float_model, root / name, calibration)
        out[name] = (fn(job), job.out_dir)
    return out


# -- contract and numbers ------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_result_describes_what_was_written(results: dict, name: str) -> None:
    result, out_dir = results[name]
    assert result.kind == "onnx" and result.entry == "model.onnx" and result.files == ("model.onnx",)
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx"]  # no scratch left behind
    assert result.precision == CASES[name][2]
    assert result.details["method"] == name
    assert result.details["onnxruntime_version"] == ort.__version__
    assert result.details["library"].startswith("onnxruntime.")


@pytest.mark.parametrize("name", list(CASES))
def test_logits_stay_within_the_registry_budget(results: dict, reference: dict, held_out: np.ndarray,
                                                name: str) -> None:
    result, out_dir = results[name]
    got = _run(out_dir / result.entry, held_out)
    report = compare_outputs(reference, got)
    assert got["logits"].dtype == np.float32
    assert report["logits_cosine"] >= METHODS[CASES[name][1]].min_cosine, report


# -- structure -------------------------------------------------------------------------


def test_dynamic_quantizes_every_constant_matmul_and_the_head(results: dict, float_graph: Any) -> None:
    result, out_dir = results["int8-dynamic"]
    ops = _ops(_graph(out_dir / result.entry))
    # ORT rewrites the Gemm head into MatMul + Add and quantizes it with the rest.
    expected = len(_const_matmuls(float_graph)) + _ops(float_graph)["Gemm"]
    assert ops["MatMulInteger"] == expected == result.details["quantized_nodes"]
    assert ops["DynamicQuantizeLinear"] > 0 and ops["QuantizeLinear"] == 0
    # Attention's activation x activation MatMuls stay float.
    assert ops["MatMul"] == _ops(float_graph)["MatMul"] - len(_const_matmuls(float_graph))


def test_static_puts_qdq_on_the_inputs_of_weighted_nodes_only(results: dict, float_graph: Any) -> None:
    result, out_dir = results["int8-static"]
    graph = _graph(out_dir / result.entry)
    ops, producers, inits = _ops(graph), _producers(graph), _initializers(graph)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    weighted = set(_const_matmuls(float_graph)) | {n.name for n in float_graph.node if n.op_type in ("Gemm", "Conv")}
    nodes = {n.name: n for n in graph.node}
    for name in weighted:
        assert producers[nodes[name].input[0]].op_type == "DequantizeLinear", name
    for node in graph.node:
        if node.op_type == "MatMul" and node.name not in weighted:  # attention stays float
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
        if node.op_type in ("MatMul", "Gemm", "Conv"):  # no requantize on outputs
            assert not any(node.output[0] in n.input for n in graph.node if n.op_type == "QuantizeLinear")
    # x86 CPU: uint8 activations, int8 weights.
    q_zero_points = {inits[n.input[2]].data_type for n in graph.node if n.op_type == "QuantizeLinear"}
    assert q_zero_points == {TensorProto.UINT8}
    assert result.details["quantized_nodes"] == len(weighted)


def test_int4_turns_every_constant_matmul_into_matmulnbits(results: dict, float_graph: Any) -> None:
    result, out_dir = results["int4-weight"]
    graph = _graph(out_dir / result.entry)
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(_const_matmuls(float_graph)) == result.details["quantized_nodes"]
    assert _const_matmuls(graph) == []
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == GROUP
        assert len(node.input) == 3  # symmetric: no zero points


def test_fp16_weights_with_float32_io(results: dict) -> None:
    result, out_dir = results["fp16"]
    graph = _graph(out_dir / result.entry)
    io = list(graph.input) + list(graph.output)
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    types = Counter(i.data_type for i in graph.initializer if numpy_helper.to_array(i).size > 1)
    assert types[TensorProto.FLOAT16] > 0 and types[TensorProto.FLOAT] == 0


def test_tensorrt_qdq_is_symmetric_int8_with_per_channel_weights(results: dict, float_graph: Any) -> None:
    result, out_dir = results["int8-qdq"]
    model = onnx.load(str(out_dir / result.entry))
    graph = model.graph
    inits, producers = _initializers(graph), _producers(graph)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert result.details["target"] == "tensorrt" and result.details["symmetric"] is True
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize
    for node in quantize + [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        zero_point = inits[node.input[2]]
        assert zero_point.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero_point).any(), node.name
    # Weights: float initializer -> Q -> DQ, per output channel (1-D scales and an axis).
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear"
                 and producers[n.input[0]].op_type == "QuantizeLinear" and producers[n.input[0]].input[0] in inits]
    n_weighted = len(_const_matmuls(float_graph)) + sum(n.op_type in ("Gemm", "Conv") for n in float_graph.node)
    assert len(weight_dq) == n_weighted
    for node in weight_dq:
        scale = numpy_helper.to_array(inits[node.input[1]])
        weight = numpy_helper.to_array(inits[producers[node.input[0]].input[0]])
        axis = {a.name: a.i for a in node.attribute}.get("axis")
        assert axis is not None and scale.ndim == 1 and scale.size == weight.shape[axis] > 1, node.name
    # Every MatMul (attention included), Gemm and Conv reads dequantized inputs; biases stay float.
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            assert producers[node.input[0]].op_type == "DequantizeLinear", node.name
            assert producers[node.input[1]].op_type == "DequantizeLinear", node.name
    assert not any(i.data_type == TensorProto.INT32 for i in graph.initializer)


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrators(tmp_path: Path, float_model: Path, calibration: np.ndarray,
                               reference: dict, held_out: np.ndarray, method: str) -> None:
    job = _job(float_model, tmp_path / method, calibration[:4], calibrate_method=method)
    result = quant.int8_static(job)
    assert result.details["calibrate_method"] == method and result.details["calibration_samples"] == 4
    report = compare_outputs(reference, _run(job.out_dir / result.entry, held_out))
    assert report["logits_cosine"] >= METHODS[("onnxruntime", "int8-static")].min_cosine, report


def test_per_tensor_weights(tmp_path: Path, float_model: Path, calibration: np.ndarray) -> None:
    result = quant.int8_static(_job(float_model, tmp_path, calibration[:4], per_channel=False))
    graph = _graph(tmp_path / result.entry)
    inits = _initializers(graph)
    scales = [numpy_helper.to_array(inits[n.input[1]]) for n in graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert scales and all(s.size == 1 for s in scales)
    assert result.details["weights"] == "int8 symmetric per-tensor"


@pytest.mark.parametrize("name", ["int8-static", "int8-qdq"])
def test_unknown_calibrate_method_is_refused(tmp_path: Path, float_model: Path, calibration: np.ndarray,
                                            name: str) -> None:
    with pytest.raises(QuantizationError, match=r"calibrate_method 'kl'.*minmax, entropy, percentile"):
        CASES[name][0](_job(float_model, tmp_path, calibration, calibrate_method="kl"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["int8-static", "int8-qdq"])
def test_missing_calibration_is_refused(tmp_path: Path, float_model: Path, name: str) -> None:
    with pytest.raises(QuantizationError, match="needs calibration data"):
        CASES[name][0](_job(float_model, tmp_path, None))


@pytest.mark.parametrize("group_size", [48, 8, 0])
def test_group_size_must_be_a_power_of_two(tmp_path: Path, float_model: Path, group_size: int) -> None:
    with pytest.raises(QuantizationError, match=f"power of two >= 16.*got {group_size}"):
        quant.int4_weight(_job(float_model, tmp_path, None, group_size=group_size))


@pytest.mark.parametrize("name", list(CASES))
def test_unknown_excluded_node_is_refused(tmp_path: Path, float_model: Path, calibration: np.ndarray,
                                          name: str) -> None:
    with pytest.raises(QuantizationError, match="exclude_nodes names no node.*'no_such_node'"):
        CASES[name][0](_job(float_model, tmp_path, calibration, exclude_nodes=("no_such_node",)))


def test_quantizer_failure_is_one_line(tmp_path: Path, calibration: np.ndarray) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(QuantizationError) as info:
        quant.int8_dynamic(_job(broken, tmp_path / "out", None))
    assert "\n" not in str(info.value) and info.value.__cause__ is not None


@pytest.mark.parametrize("name", list(CASES))
def test_excluded_matmul_stays_float(tmp_path: Path, float_model: Path, float_graph: Any,
                                     calibration: np.ndarray, name: str) -> None:
    target = _const_matmuls(float_graph)[1]
    result = CASES[name][0](_job(float_model, tmp_path, calibration[:4], exclude_nodes=(target,)))
    graph = _graph(tmp_path / result.entry)
    node = next(n for n in graph.node if n.name == target)
    producers, inits = _producers(graph), _initializers(graph)
    assert node.op_type == "MatMul"
    if name == "fp16":  # fp16 weights, cast back: the node computes in float32
        assert all(producers[i].op_type == "Cast" and producers[i].attribute[0].i == TensorProto.FLOAT
                   for i in node.input)
    else:
        assert inits[node.input[1]].data_type == TensorProto.FLOAT
        assert node.input[0] not in producers or producers[node.input[0]].op_type != "DequantizeLinear"
    assert result.details["excluded_nodes"] == [target]


def test_dynamic_honours_an_excluded_gemm(tmp_path: Path, float_model: Path, float_graph: Any) -> None:
    head = next(n.name for n in float_graph.node if n.op_type == "Gemm")
    result = quant.int8_dynamic(_job(float_model, tmp_path, None, exclude_nodes=(head,)))
    graph = _graph(tmp_path / result.entry)
    assert result.details["quantized_nodes"] == len(_const_matmuls(float_graph))
    assert any(n.name.startswith(head) and n.op_type == "MatMul" for n in graph.node)


@pytest.mark.parametrize("name", list(CASES))
def test_external_data_past_the_size_limit(tmp_path: Path, float_model: Path, calibration: np.ndarray,
                                           held_out: np.ndarray, reference: dict, name: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_graph, "EXTERNAL_DATA_BYTES", 0)  # every model counts as "over 2 GB"
    result = CASES[name][0](_job(float_model, tmp_path, calibration[:4]))
    assert result.files == ("model.onnx", "model.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    report = compare_outputs(reference, _run(tmp_path / result.entry, held_out))
    assert report["logits_cosine"] >= METHODS[CASES[name][1]].min_cosine, report


def test_quantizers_stay_quiet(tmp_path: Path, float_model: Path, calibration: np.ndarray,
                               capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quant.int8_static(_job(float_model, tmp_path / "a", calibration[:4], calibrate_method="entropy"))
    quant.int8_dynamic(_job(float_model, tmp_path / "b", None))
    captured = capsys.readouterr()
    assert captured.out == "" and "consider" not in captured.err.lower()
    assert root.handlers == handlers and root.level == level


# -- sensitivity ------------------------------------------------------------------------------


def test_sensitivity_ranks_quantized_nodes_worst_first(tmp_path: Path, float_model: Path, float_graph: Any,
                                                       calibration: np.ndarray, held_out: np.ndarray) -> None:
    excluded = _const_matmuls(float_graph)[0]
    ranking = quant.sensitivity(_job(float_model, tmp_path, calibration, exclude_nodes=(excluded,)), held_out[:4])
    names = [name for name, _ in ranking]
    scores = [score for _, score in ranking]
    weighted = set(_const_matmuls(float_graph)) | {n.name for n in float_graph.node if n.op_type in ("Gemm", "Conv")}
    assert set(names) == weighted - {excluded}
    assert scores == sorted(scores, reverse=True) and scores[0] > 0 and min(scores) >= 0
    assert list(tmp_path.iterdir()) == []  # quantized in scratch, nothing left
    # The names feed straight back into exclude_nodes.
    result = quant.int8_static(_job(float_model, tmp_path / "again", calibration[:4], exclude_nodes=tuple(names[:2])))
    assert result.details["quantized_nodes"] == len(weighted) - 2


def test_sensitivity_refuses_bad_inputs(tmp_path: Path, float_model: Path, calibration: np.ndarray) -> None:
    with pytest.raises(QuantizationError, match="eval_inputs"):
        quant.sensitivity(_job(float_model, tmp_path, calibration), np.zeros((3, 32, 32), np.float32))
