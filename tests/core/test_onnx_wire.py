"""The external-data check reads ONNX protobuf bytes without the onnx package; the edge install
(no onnx, no tokenizers) loads and runs engines, and the features that need them say what to install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enginekit.artifact import check_onnx_external_data
from enginekit.errors import IntegrityError
from enginekit.onnx_wire import DATA_LOCATION, EXTERNAL, FIELDS, KEY, VALUE, WireError, external_locations


def test_field_numbers_are_onnx_s_own() -> None:
    import onnx

    for (message, field), (number, child) in FIELDS.items():
        descriptor = getattr(onnx, message).DESCRIPTOR.fields_by_name[field]
        assert descriptor.number == number, (message, field)
        assert descriptor.message_type.name == child, (message, field)
    tensor = onnx.TensorProto.DESCRIPTOR
    assert tensor.fields_by_name["data_location"].number == DATA_LOCATION
    assert onnx.TensorProto.EXTERNAL == EXTERNAL
    entry = onnx.StringStringEntryProto.DESCRIPTOR
    assert (entry.fields_by_name["key"].number, entry.fields_by_name["value"].number) == (KEY, VALUE)


def _external(tensor, location: str) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        e = tensor.external_data.add()
        e.key, e.value = key, value


def _everywhere_model():
    """A model with external tensors on every path onnx.proto allows: an initializer, a Constant's
    attribute, an If branch's initializer, a sparse initializer and a function body's Constant."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    _external(w, "init.bin")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((2, 2), np.float32), "cv"))
    _external(const.attribute[0].t, "attr.bin")
    branch_w = numpy_helper.from_array(np.ones((2, 2), np.float32), "bw")
    _external(branch_w, "sub/branch.bin")
    then = helper.make_graph([helper.make_node("Identity", ["bw"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 2])], [branch_w])
    other = helper.make_graph([helper.make_node("Identity", ["w"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 2])])
    cond = helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)
    values = numpy_helper.from_array(np.ones((1,), np.float32), "sv")
    _external(values, "sparse.bin")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.zeros((1,), np.int64), "si"), [2, 2])
    fconst = helper.make_node("Constant", [], ["fc"], value=numpy_helper.from_array(np.ones((1,), np.float32), "fv"))
    _external(fconst.attribute[0].t, "function.bin")
    function = helper.make_function("local", "f", [], ["fc"], [fconst], [helper.make_opsetid("", 17)])
    graph = helper.make_graph([const, cond, helper.make_node("f", [], ["z"], domain="local")], "g",
                              [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [w],
                              sparse_initializer=[sparse])
    return onnx, helper.make_model(graph, functions=[function],
                                   opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])


def test_every_external_tensor_is_found_where_onnx_finds_it_and_beyond(tmp_path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    onnx, model = _everywhere_model()
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    found = external_locations(path)
    assert found == ["attr.bin", "sub/branch.bin", "init.bin", "sparse.bin", "function.bin"] or \
        set(found) == {"init.bin", "attr.bin", "sub/branch.bin", "sparse.bin", "function.bin"}
    by_onnx = {next(e.value for e in t.external_data if e.key == "location")
               for t in _get_all_tensors(onnx.load(str(path), load_external_data=False)) if uses_external_data(t)}
    assert by_onnx <= set(found)


def test_an_exported_artifact_reads_what_onnx_says(exported: dict[str, Path], tmp_path: Path) -> None:
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(exported["timm"] / "model.onnx"))
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    by_onnx = [next(e.value for e in t.external_data if e.key == "location")
               for t in _get_all_tensors(onnx.load(str(tmp_path / "model.onnx"), load_external_data=False))
               if uses_external_data(t)]
    assert set(by_onnx) == {"model.onnx.data"}
    assert external_locations(tmp_path / "model.onnx") == ["model.onnx.data"]
    assert check_onnx_external_data(tmp_path, "model.onnx") == ["model.onnx.data"]
    assert check_onnx_external_data(exported["timm"], "model.onnx") == []


@pytest.mark.parametrize("cut", ["truncated", "garbage", "deep"])
def test_bytes_that_are_not_a_model_are_refused_in_one_line(tmp_path: Path, cut: str) -> None:
    _, model = _everywhere_model()
    data = model.SerializeToString()
    if cut == "truncated":
        data = data[: len(data) - 7]
    elif cut == "garbage":
        data = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    else:  # a graph nested in a graph 200 times: crafted, not exported
        inner = b""
        for _ in range(200):
            attr = b"\x32" + _len(inner) + inner          # AttributeProto.g
            node = b"\x2a" + _len(attr) + attr             # NodeProto.attribute
            inner = b"\x0a" + _len(node) + node            # GraphProto.node
        data = b"\x3a" + _len(inner) + inner               # ModelProto.graph
    (tmp_path / "model.onnx").write_bytes(data)
    with pytest.raises(WireError):
        external_locations(tmp_path / "model.onnx")
    with pytest.raises(IntegrityError, match="not a readable ONNX model"):
        check_onnx_external_data(tmp_path, "model.onnx")


def _len(b: bytes) -> bytes:
    n, out = len(b), bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


_EDGE = r"""
import json, sys
for blocked in ("onnx", "tokenizers", "torch"):
    sys.modules[blocked] = None           # as on an install without them
import numpy as np
import enginekit
from enginekit.errors import MissingPackageError
out = {}
clf = enginekit.load(sys.argv[1])
out["label"] = clf.predict(np.zeros((40, 40, 3), np.uint8))[0].label
try:
    clf.explain(np.zeros((40, 40, 3), np.uint8))
    out["explain"] = "ran"
except MissingPackageError as exc:
    out["explain"] = str(exc)
try:
    enginekit.load(sys.argv[2])("a cat", num_inference_steps=1)
    out["generate"] = "ran"
except MissingPackageError as exc:
    out["generate"] = str(exc)
out["loaded"] = sorted(m for m in ("onnx", "tokenizers", "torch") if sys.modules.get(m) is not None)
print(json.dumps(out))
"""


def test_the_edge_install_runs_engines_and_names_what_a_feature_needs(
        compiled: dict[tuple[str, str], Path], tiny_pipelines: dict[tuple[str, str], Path]) -> None:
    if ("timm", "onnxruntime") not in compiled:
        pytest.skip("onnxruntime is not installed")
    run = subprocess.run([sys.executable, "-c", _EDGE, str(compiled[("timm", "onnxruntime")]),
                          str(tiny_pipelines[("tiny-sd15", "onnxruntime")])], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["label"]
    assert "needs the onnx package" in out["explain"] and "enginekit[onnx]" in out["explain"]
    assert "needs the tokenizers package" in out["generate"] and "enginekit[pipelines]" in out["generate"]
    assert out["loaded"] == []
