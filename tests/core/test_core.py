"""The core made for many tasks and components: the task registry, lazily loaded
components, hashed assets, typed backend options and the schema-1 reader."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import enginekit  # noqa: E402
from enginekit.api import compile_artifact  # noqa: E402
from enginekit.artifact import atomic_artifact, make_assets, make_component, write_manifest  # noqa: E402
from enginekit.errors import BackendError, InputError, IntegrityError, ManifestError, UnknownTaskError  # noqa: E402
from enginekit.manifest import Manifest, TensorSpec, read_manifest  # noqa: E402
from enginekit.registry import _runtime_tasks, register_task, task_names  # noqa: E402
from enginekit.runtimes.base import CompileOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _scale_model(factor: float) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array([factor], dtype=np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _two_component_artifact(out: Path, task: str = "test-two-scales") -> Path:
    """An ONNX artifact with components 'double' and 'triple' and one hashed asset."""
    with atomic_artifact(out) as tmp:
        comps = {}
        for name, factor in (("double", 2.0), ("triple", 3.0)):
            (tmp / name).mkdir()
            onnx.save(_scale_model(factor), str(tmp / name / "model.onnx"))
            comps[name] = make_component(tmp, name, f"{name}/model.onnx", [f"{name}/model.onnx"],
                                         [TensorSpec("x", "float32", ("batch", 3))],
                                         [TensorSpec("y", "float32", ("batch", 3))],
                                         fidelity={"cosine": 1.0})
        (tmp / "notes").mkdir()
        (tmp / "notes" / "config.json").write_text(json.dumps({"offset": 1.0}))
        manifest = Manifest(kind="onnx", task=task, family="test", components=comps,
                            assets=make_assets(tmp, ["notes/config.json"]), task_config={"offset": 1.0})
        write_manifest(tmp, manifest)
    return out


class TwoScales:
    """A task object as a plugin would write one: reads its section, uses components on demand."""

    def __init__(self, components: Mapping[str, Any], manifest: Manifest, offset: float) -> None:
        self.components = components
        self.offset = offset

    @classmethod
    def from_artifact(cls, components: Mapping[str, Any], manifest: Manifest, path: Path, offset: float | None = None):
        return cls(components, manifest, manifest.task_config["offset"] if offset is None else offset)

    def __call__(self, name: str, x: np.ndarray) -> np.ndarray:
        return self.components[name].run({"x": x})["y"] + self.offset


@pytest.fixture(scope="module", autouse=True)
def _registered() -> Any:
    register_task("test-two-scales", f"{__name__}:TwoScales")
    yield
    _runtime_tasks.pop("test-two-scales", None)


@pytest.fixture()
def two(tmp_path: Path) -> Path:
    return _two_component_artifact(tmp_path / "two")


def test_built_in_tasks_are_registered_as_entry_points() -> None:
    assert {"image-classification", "text-to-image"} <= set(task_names())


def test_load_picks_the_task_from_the_registry_and_loads_components_lazily(two: Path) -> None:
    task = enginekit.load(two, device="cpu")
    assert isinstance(task, TwoScales)
    assert task.components.loaded == ()
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(task("triple", x), 4.0)
    assert task.components.loaded == ("triple",)  # 'double' was never opened
    np.testing.assert_allclose(task("double", x), 3.0)
    assert set(task.components.loaded) == {"double", "triple"}
    task.components.close()
    assert task.components.loaded == ()


def test_task_options_are_checked_against_the_task(two: Path) -> None:
    assert enginekit.load(two, device="cpu", offset=5.0).offset == 5.0
    with pytest.raises(InputError, match="does not take those options"):
        enginekit.load(two, device="cpu", batch_size=3)


def test_unknown_component_is_a_clear_error(two: Path) -> None:
    task = enginekit.load(two, device="cpu")
    with pytest.raises(ManifestError, match="no component 'vae'.*double, triple"):
        task.components["vae"]


def test_unknown_task_is_a_clear_error(tmp_path: Path) -> None:
    art = _two_component_artifact(tmp_path / "odd", task="text-to-video")
    with pytest.raises(UnknownTaskError, match="task 'text-to-video' is not supported.*image-classification"):
        enginekit.load(art)


def test_assets_are_verified_like_payload(two: Path) -> None:
    (two / "notes" / "config.json").write_text(json.dumps({"offset": 9.0}))
    with pytest.raises(IntegrityError, match="notes/config.json does not match its sha256"):
        enginekit.load(two)
    (two / "notes" / "config.json").unlink()
    with pytest.raises(IntegrityError, match="notes/config.json is missing"):
        enginekit.load(two)


def test_compile_keeps_assets_and_component_records(two: Path, tmp_path: Path) -> None:
    out = compile_artifact(two, "onnxruntime", tmp_path / "ort")
    assert [a.path for a in out.assets] == ["notes/config.json"]
    assert (tmp_path / "ort" / "notes" / "config.json").is_file()
    assert out.components["double"].fidelity == {"cosine": 1.0}
    task = enginekit.load(tmp_path / "ort", device="cpu")
    np.testing.assert_allclose(task("double", np.ones((1, 3), np.float32)), 3.0)


@pytest.mark.parametrize(
    ("backend", "extra", "message"),
    [
        ("onnxruntime", {"bogus": 1}, "unknown option 'bogus' \\(this backend takes: graph_optimization_level, precision, provider, static_batch, transformer_fusions\\)"),
        ("onnxruntime", {"precision": "fp16"}, "enginekit quantize ART --method fp16"),
        ("onnxruntime", {"graph_optimization_level": 3}, "must be a string"),
        ("onnxruntime", {"graph_optimization_level": "max"}, "must be one of disable, basic, extended, all"),
        ("openvino", {"static_batch": "x"}, "'static_batch' must be an integer"),
        ("openvino", {"keep_fp32": ["vae"]}, "keep_fp32 names 'vae'"),
        ("openvino", {"dims": {"unet": {"batch": 2}}}, "dims names component 'unet'"),
        ("openvino", {"dims": {"*": {"batch": 0}}}, "must be a positive integer"),
        ("openvino", {"intra_op_num_threads": 2}, "unknown option 'intra_op_num_threads'"),
    ],
)
def test_typed_backend_options_refuse_what_they_do_not_know(two: Path, tmp_path: Path, backend: str,
                                                           extra: dict, message: str) -> None:
    pytest.importorskip(backend)
    with pytest.raises(BackendError, match=message):
        compile_artifact(two, backend, tmp_path / "out", CompileOptions(extra=extra))
    assert not (tmp_path / "out").exists()


def test_openvino_dims_bind_symbolic_dimensions_per_component(two: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    out = compile_artifact(two, "openvino", tmp_path / "ov",
                           CompileOptions(extra={"dims": {"double": {"batch": 4}}, "precision": "fp16",
                                                 "keep_fp32": ["triple"]}))
    assert out.components["double"].inputs[0].shape == (4, 3)
    assert out.components["triple"].inputs[0].shape == ("batch", 3)
    assert (out.components["double"].precision, out.components["triple"].precision) == ("fp16", "fp32")


def test_schema_1_manifests_still_load(tmp_path: Path) -> None:
    art = _two_component_artifact(tmp_path / "v1", task="image-classification")
    data = json.loads((art / "manifest.json").read_text())
    data["schema_version"] = 1
    data.pop("image-classification")
    data.pop("assets")
    data["preprocessing"] = {"size": [32, 32]}
    data["labels"] = ["a", "b", "c"]
    for comp in data["components"].values():
        comp.pop("quantization")
        comp.pop("fidelity")
    (art / "manifest.json").write_text(json.dumps(data))
    manifest = read_manifest(art)
    assert manifest.preprocessing == {"size": [32, 32]}
    assert manifest.labels == ("a", "b", "c")
    assert manifest.to_dict()["schema_version"] == 2
    assert manifest.to_dict()["image-classification"]["labels"] == ["a", "b", "c"]
    assert Manifest.from_dict(manifest.to_dict()).digest() == manifest.digest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": 3}, "field 'task' must be a string"),
        ({"components": []}, "'components' must be an object"),
        ({"test-two-scales": "x"}, "section 'test-two-scales' must be an object"),
        ({"target": [1]}, "field 'target' must be an object"),
        ({"assets": [{"path": "a"}]}, "malformed component or asset"),
    ],
)
def test_malformed_manifest_fields_are_named(two: Path, change: dict, message: str) -> None:
    data = {**json.loads((two / "manifest.json").read_text()), **change}
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(data)


CORE = ("manifest.py", "artifact.py", "registry.py", "errors.py", "api.py", "engine.py", "hardware.py", "fidelity.py")
STAGES = ("enginekit.export", "enginekit.quant", "enginekit.runtimes", "enginekit.bench", "enginekit.serve",
          "enginekit.app")


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_stage_module(module: str) -> None:
    tree = ast.parse((ROOT / "enginekit" / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    offending = sorted(m for m in imported if m.startswith(STAGES))
    assert offending == [], f"enginekit/{module} imports stage modules: {offending}"
