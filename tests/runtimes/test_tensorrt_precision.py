"""The ONNX prepared for TensorRT, checked on ONNX Runtime CPU against the float graph.

fp16 through Model Optimizer's AutoCast (with a layer whose values overflow fp16 kept in fp32,
as SDXL's VAE needs), its ONNX Runtime fallback, and int8/fp8 Q/DQ through Model Optimizer's
quantizer: structure (the casts and Q/DQ pairs) and numbers (close to the float graph). Model
Optimizer's tests skip, saying so, where it is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from enginekit.errors import BackendError, DeviceError
from enginekit.runtimes import tensorrt_precision
from enginekit.runtimes.onnxruntime import run_onnx_file
from enginekit.runtimes.onnxruntime_providers import provider_chain

HAVE_MODELOPT = importlib.util.find_spec("modelopt") is not None
needs_modelopt = pytest.mark.skipif(not HAVE_MODELOPT, reason="NVIDIA Model Optimizer is not installed "
                                                              "(pip install 'nvidia-modelopt[onnx]')")


def _graph(path: Path, overflow: bool = False) -> Path:
    """A transformer-shaped MLP: x (batch, 8, 32) -> MatMul -> Add -> Relu -> MatMul -> Relu ->
    MatMul -> y (batch, 8, 8); with ``overflow``, a branch whose values pass fp16's 65504
    (x * 3e5 through a MatMul, then scaled back) joins the output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [weight("w1", 32, 64), weight("b1", 64, scale=0.1), weight("w2", 64, 32), weight("w3", 32, 8)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu1"),
             helper.make_node("MatMul", ["r", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y0" if overflow else "y"], name="fc3")]
    if overflow:
        inits += [numpy_helper.from_array(np.float32(3e5), "big"), numpy_helper.from_array(np.float32(1 / 3e5), "small"),
                  weight("w4", 32, 8, scale=1.0)]
        nodes += [helper.make_node("Mul", ["x", "big"], ["huge"], name="blowup"),
                  helper.make_node("MatMul", ["huge", "w4"], ["huge8"], name="huge_fc"),
                  helper.make_node("Mul", ["huge8", "small"], ["back"], name="scale_back"),
                  helper.make_node("Add", ["y0", "back"], ["y"], name="join")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _x(n: int = 16) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 8, 32)).astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@needs_modelopt
def test_autocast_fp16_runs_close_to_the_float_graph_and_keeps_overflow_in_fp32(tmp_path: Path) -> None:
    import onnx

    (tmp_path / "src").mkdir()
    source = _graph(tmp_path / "src" / "model.onnx", overflow=True)
    before = source.read_bytes()
    prepared, record = tensorrt_precision.prepare_onnx(source, tmp_path / "scratch", "fp16")
    assert source.read_bytes() == before  # the artifact's file is never written
    assert record["conversion"] == "modelopt.onnx.autocast.convert_to_mixed_precision"
    model = onnx.load(str(prepared))
    fp16 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    assert any(name.startswith(("w1", "w2")) for name in fp16)  # the MLP went fp16
    graph_in = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert graph_in["x"] == onnx.TensorProto.FLOAT  # fp32 in and out, as the runner feeds it
    ref = run_onnx_file(source, {"x": _x()})["y"]
    got = run_onnx_file(prepared, {"x": _x()})["y"]
    # The overflowing branch stayed fp32: in fp16 it would be inf and the output NaN or inf.
    assert np.isfinite(got).all() and _cosine(ref, got) > 0.999


def test_without_modelopt_fp16_falls_back_to_onnxruntimes_converter_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensorrt_precision, "modelopt_available", lambda: False)
    source = _graph(tmp_path / "model.onnx")
    prepared, record = tensorrt_precision.prepare_onnx(source, tmp_path / "scratch", "fp16")
    assert "onnxruntime" in record["conversion"] and "Model Optimizer is not installed" in record["note"]
    assert _cosine(run_onnx_file(source, {"x": _x()})["y"], run_onnx_file(prepared, {"x": _x()})["y"]) > 0.999
    with pytest.raises(BackendError, match="bf16 is made in the ONNX by NVIDIA Model Optimizer"):
        tensorrt_precision.prepare_onnx(source, tmp_path / "scratch2", "bf16")
    assert tensorrt_precision.prepare_onnx(source, tmp_path, "fp32")[0] == source  # fp32: the graph as it is


@needs_modelopt
@pytest.mark.parametrize("method", ["int8_qdq_modelopt", pytest.param("fp8_qdq_modelopt", marks=pytest.mark.slow)])
def test_modelopt_qdq_is_qdq_and_close_to_the_float_vit_on_ort_cpu(method: str, exported: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    from enginekit.quant import modelopt
    from enginekit.quant.base import QuantJob, QuantOptions

    source = exported["timm"] / "model.onnx"
    before = source.read_bytes()
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    out = tmp_path / "q"
    result = getattr(modelopt, method)(QuantJob(source, out, "pixel_values", calibration, QuantOptions()))
    assert source.read_bytes() == before  # the quantizer wrote into a copy, never the artifact
    assert result.details["quantize_linear_nodes"] >= 8 and result.details["target"] == "tensorrt"
    assert result.precision == ("int8-qdq" if method.startswith("int8") else "fp8-qdq")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # no scratch left behind
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    ref = run_onnx_file(source, {"pixel_values": x})["logits"]
    got = run_onnx_file(out / "model.onnx", {"pixel_values": x})["logits"]
    assert _cosine(ref, got) > 0.99 and (ref.argmax(1) == got.argmax(1)).mean() >= 0.75


def test_onnxruntime_provider_chains_say_what_is_missing() -> None:
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert provider_chain("cpu", "", cpu_only) == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="CUDAExecutionProvider is not in this onnxruntime.*install onnxruntime-gpu"):
        provider_chain("cuda", "", cpu_only)
    with pytest.raises(DeviceError, match="runs on a GPU; give -d cuda"):
        provider_chain("cpu", "tensorrt", cpu_only)
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chain = provider_chain("cuda:1", "tensorrt", gpu, cache=Path("/c"))
    assert [p[0] for p in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert chain[0][1]["trt_engine_cache_enable"] and chain[0][1]["trt_engine_cache_path"] == "/c"
    assert chain[0][1]["device_id"] == 1 and chain[1][1]["device_id"] == 1


def test_compile_for_cuda_on_a_cpu_build_of_onnxruntime_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    import onnxruntime

    from enginekit.api import compile_artifact
    from enginekit.engine import CompileOptions

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(DeviceError, match="install onnxruntime-gpu"):
        compile_artifact(exported["timm"], "onnxruntime", tmp_path / "o", CompileOptions(
            device="cuda", extra={"provider": "tensorrt"}))
    assert not (tmp_path / "o").exists()
