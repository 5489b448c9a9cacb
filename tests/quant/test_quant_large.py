"""ONNX Runtime's quantizers on a model past protobuf's 2 GB: the ModelProto cannot even be sized
(``ByteSize`` raises "Failed to serialize proto"), so the size check must not ask it, and every
method writes its result with external data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from enginekit.quant.base import QuantJob, QuantOptions
from enginekit.quant.ort_graph import over_size_limit


def test_a_model_protobuf_cannot_size_is_over_the_limit() -> None:
    class Huge:
        def ByteSize(self) -> int:  # noqa: N802 (protobuf's name)
            from google.protobuf.message import EncodeError

            raise EncodeError("Failed to serialize proto")

    class Small:
        def ByteSize(self) -> int:  # noqa: N802
            return 1000

    assert over_size_limit(Huge()) is True
    assert over_size_limit(Small()) is False


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine 8192x8192 MatMuls: 2.4 GB of fp32 weights, as external data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    dim, inits, nodes, prev = 8192, [], [], "x"
    for i in range(9):
        inits.append(numpy_helper.from_array(rng.standard_normal((dim, dim), dtype=np.float32) * 0.01, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", dim])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["b", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data")
    return folder / "model.onnx"


@pytest.mark.slow  # 2.4 GB written and quantized three ways: about 3 minutes, 8 GB of memory
@pytest.mark.parametrize("method", ["fp16", "int8_dynamic", "int4_weight"])
def test_ort_methods_quantize_a_model_past_2_gb(big_model: Path, tmp_path: Path, method: str) -> None:
    import onnxruntime as ort

    from enginekit.quant import ort as methods

    out = tmp_path / "out"
    out.mkdir()
    result = getattr(methods, method)(QuantJob(big_model, out, "x", None, QuantOptions()))
    assert sum((out / f).stat().st_size for f in result.files) < 0.6 * (big_model.parent / "model.onnx.data").stat().st_size
    x = np.random.default_rng(1).standard_normal((1, 8192)).astype(np.float32)
    got = ort.InferenceSession(str(out / result.entry), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == (1, 8192) and np.isfinite(got).all()
    shutil.rmtree(out)
