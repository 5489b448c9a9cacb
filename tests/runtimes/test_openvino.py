"""OpenVINO backend: compile a tiny seeded ONNX artifact to IR, load it, check numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from enginekit.artifact import atomic_artifact, make_component, verify_artifact, write_manifest  # noqa: E402
from enginekit.errors import BackendError, DeviceError, ShapeError  # noqa: E402
from enginekit.manifest import Manifest, TensorSpec, read_manifest  # noqa: E402
from enginekit.registry import get_backend  # noqa: E402
from enginekit.runtimes.base import CompileOptions  # noqa: E402
from enginekit.runtimes.openvino import OpenVINOBackend, cache_dir_for  # noqa: E402

IN_DIM, OUT_DIM = 4, 8
N_WEIGHTS = IN_DIM * OUT_DIM + OUT_DIM


def _weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((IN_DIM, OUT_DIM)).astype(np.float32),
        rng.standard_normal(OUT_DIM).astype(np.float32),
    )


def _reference(x: np.ndarray) -> dict[str, np.ndarray]:
    w, b = _weights()
    embedding = x @ w + b
    return {"logits": np.maximum(embedding, 0), "embedding": embedding}


def _onnx_model() -> onnx.ModelProto:
    w, b = _weights()
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["embedding"]),
            helper.make_node("Relu", ["embedding"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_DIM])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", OUT_DIM]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", OUT_DIM]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _write_onnx_artifact(out: Path) -> Path:
    with atomic_artifact(out) as tmp:
        (tmp / "classifier").mkdir()
        onnx.save(_onnx_model(), str(tmp / "classifier" / "model.onnx"))
        comp = make_component(
            tmp,
            "classifier",
            "classifier/model.onnx",
            ["classifier/model.onnx"],
            [TensorSpec("x", "float32", ("batch", IN_DIM))],
            [
                TensorSpec("logits", "float32", ("batch", OUT_DIM)),
                TensorSpec("embedding", "float32", ("batch", OUT_DIM)),
            ],
        )
        manifest = Manifest(kind="onnx", task="image-classification", family="test", components={"classifier": comp})
        write_manifest(tmp, manifest)
    return out


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source artifact, shared: tests must not modify it."""
    return _write_onnx_artifact(tmp_path_factory.mktemp("src") / "onnx")


@pytest.fixture(scope="module")
def ov_artifact(onnx_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default (fp32, LATENCY) compile of :func:`onnx_artifact`, shared: tests must not modify it."""
    return _compile(onnx_artifact, tmp_path_factory.mktemp("ov") / "ov")[0]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENGINEKIT_CACHE_DIR", str(cache))
    return cache


def _compile(src: Path, out: Path, **kwargs: object) -> tuple[Path, Manifest]:
    options = CompileOptions(**kwargs)  # type: ignore[arg-type]
    with atomic_artifact(out) as tmp:
        manifest = OpenVINOBackend().compile(src, read_manifest(src), tmp, options)
        write_manifest(tmp, manifest)
    return out, read_manifest(out)


def _load(artifact: Path, device: str = "cpu"):
    manifest = read_manifest(artifact)
    verify_artifact(artifact, manifest)
    return OpenVINOBackend().load(artifact, manifest, device)


def test_registered_and_available() -> None:
    backend = get_backend("openvino")
    assert isinstance(backend, OpenVINOBackend)
    assert OpenVINOBackend.version()
    assert "cpu" in backend.devices()
    assert all(d == d.lower() for d in backend.devices())


def test_compile_writes_ir_with_source_names(onnx_artifact: Path, tmp_path: Path) -> None:
    out, manifest = _compile(onnx_artifact, tmp_path / "ov")
    verify_artifact(out, manifest)
    assert manifest.kind == "openvino"
    assert (manifest.task, manifest.family) == ("image-classification", "test")
    comp = manifest.component()
    assert comp.entry == "classifier/model.xml"
    assert {f.path for f in comp.files} == {"classifier/model.xml", "classifier/model.bin"}
    assert comp.precision == "fp32"
    # Names survive convert_model; the symbolic batch comes back from the source spec.
    assert comp.inputs == (TensorSpec("x", "float32", ("batch", IN_DIM)),)
    assert comp.outputs == (
        TensorSpec("logits", "float32", ("batch", OUT_DIM)),
        TensorSpec("embedding", "float32", ("batch", OUT_DIM)),
    )
    target = manifest.target
    assert target["backend"] == "openvino"
    assert target["device"] == "cpu"
    assert target["openvino_version"] == OpenVINOBackend.version()
    assert target["performance_hint"] == "LATENCY"
    assert target["inference_precision_hint"] == "f32"


@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_match_numpy(ov_artifact: Path, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, IN_DIM)).astype(np.float32)
    with _load(ov_artifact) as runner:
        assert runner.device == "cpu"
        got = runner.run({"x": x})
    want = _reference(x)
    assert set(got) == {"logits", "embedding"}
    for name in want:
        assert got[name].shape == (batch, OUT_DIM)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_fp32_stays_fp32_on_disk_and_at_run_time(ov_artifact: Path) -> None:
    assert (ov_artifact / "classifier" / "model.bin").stat().st_size >= 4 * N_WEIGHTS
    with _load(ov_artifact) as runner:
        # Without the explicit hint, AMX / AVX512-BF16 CPUs would run this in bf16.
        hint = runner._compiled.get_property(ov.properties.hint.inference_precision())
        assert hint == ov.Type.f32


def test_fp16_when_asked(onnx_artifact: Path, tmp_path: Path) -> None:
    out, manifest = _compile(onnx_artifact, tmp_path / "ov16", extra={"precision": "fp16"})
    size = (out / "classifier" / "model.bin").stat().st_size
    assert 2 * N_WEIGHTS <= size < 4 * N_WEIGHTS
    assert manifest.component().precision == "fp16"
    assert manifest.target["inference_precision_hint"] == "default"
    x = np.random.default_rng(7).standard_normal((2, IN_DIM)).astype(np.float32)
    with _load(out) as runner:
        got = runner.run({"x": x})
    np.testing.assert_allclose(got["embedding"], _reference(x)["embedding"], rtol=2e-2, atol=2e-2)


def test_options_recorded_and_applied(onnx_artifact: Path, tmp_path: Path) -> None:
    out, manifest = _compile(onnx_artifact, tmp_path / "ov", threads=1, extra={"performance_hint": "throughput"})
    assert manifest.target["performance_hint"] == "THROUGHPUT"
    assert manifest.target["inference_num_threads"] == 1
    with _load(out) as runner:
        assert runner._compiled.get_property(ov.properties.inference_num_threads()) == 1
        assert runner.run({"x": np.ones((1, IN_DIM), np.float32)})["logits"].shape == (1, OUT_DIM)


@pytest.mark.parametrize("extra", [{"precision": "int3"}, {"performance_hint": "FAST"}, {"inference_precision": "f8"}])
def test_bad_compile_options(onnx_artifact: Path, tmp_path: Path, extra: dict) -> None:
    with pytest.raises(BackendError):
        _compile(onnx_artifact, tmp_path / "bad", extra=extra)
    assert not (tmp_path / "bad").exists()


def test_convert_failure_is_backend_error(tmp_path: Path) -> None:
    src = _write_onnx_artifact(tmp_path / "onnx")
    (src / "classifier" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(BackendError) as info:
        _compile(src, tmp_path / "ov")
    assert "\n" not in str(info.value)


def test_model_cache_populated_and_reused(ov_artifact: Path, _cache_in_tmp: Path) -> None:
    manifest = read_manifest(ov_artifact)
    expected = _cache_in_tmp / "openvino" / manifest.digest()[:16]
    assert cache_dir_for(manifest) == expected
    x = np.ones((2, IN_DIM), np.float32)
    with _load(ov_artifact) as first:
        assert first.cache_dir == expected
        assert first.loaded_from_cache is False
        a = first.run({"x": x})
    assert any(expected.iterdir())
    with _load(ov_artifact) as second:
        assert second.loaded_from_cache is True
        b = second.run({"x": x})
    np.testing.assert_array_equal(a["logits"], b["logits"])


def test_model_cache_keeps_under_its_cap_least_recently_used_first(ov_artifact: Path, _cache_in_tmp: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ENGINEKIT_CACHE_MAX_GB the folders loaded longest ago go, never the one being loaded."""
    import os

    from enginekit.runtimes.openvino import prune_cache

    root = _cache_in_tmp / "openvino"
    root.mkdir(parents=True, exist_ok=True)
    for i, age in enumerate((300, 200, 100)):  # three stale artifacts' blobs, 1 MiB each
        folder = root / f"stale{i}"
        folder.mkdir()
        (folder / "blob").write_bytes(b"\0" * 2**20)
        os.utime(folder, (folder.stat().st_atime - age,) * 2)
    monkeypatch.setenv("ENGINEKIT_CACHE_MAX_GB", str(2.5 / 1024))  # 2.5 MiB
    with _load(ov_artifact) as runner:
        assert runner.cache_dir is not None and runner.cache_dir.is_dir()
    left = sorted(p.name for p in root.iterdir())
    # The oldest went first; the one just loaded stays whatever its size.
    assert "stale0" not in left and runner.cache_dir.name in left
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) <= 2.5 * 2**20 or left == [runner.cache_dir.name]
    assert prune_cache(root, max_bytes=None) == []  # no cap: nothing removed
    monkeypatch.setenv("ENGINEKIT_CACHE_MAX_GB", "0")
    assert prune_cache(root) == []


def test_unwritable_cache_loads_uncached(ov_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("ENGINEKIT_CACHE_DIR", str(blocker))
    with _load(ov_artifact) as runner:
        assert runner.cache_dir is None
        assert runner.run({"x": np.ones((1, IN_DIM), np.float32)})["logits"].shape == (1, OUT_DIM)


@pytest.mark.parametrize("device", ["tpu", "gpu.x", "cpu.0", "cuda"])
def test_unknown_device(ov_artifact: Path, device: str) -> None:
    with pytest.raises(DeviceError) as info:
        _load(ov_artifact, device)
    assert "\n" not in str(info.value)


def test_missing_device_lists_available(ov_artifact: Path) -> None:
    if "npu" in OpenVINOBackend().devices():
        pytest.skip("this machine has an NPU")
    with pytest.raises(DeviceError, match="available: .*cpu"):
        _load(ov_artifact, "npu")


def test_wrong_feeds_are_shape_errors(ov_artifact: Path) -> None:
    with _load(ov_artifact) as runner:
        with pytest.raises(ShapeError, match="axis 1 must be 4"):
            runner.run({"x": np.ones((1, IN_DIM + 1), np.float32)})
        with pytest.raises(ShapeError, match="dtype"):
            runner.run({"x": np.ones((1, IN_DIM), np.float64)})
        with pytest.raises(ShapeError, match="missing"):
            runner.run({"y": np.ones((1, IN_DIM), np.float32)})


def test_outputs_are_copies(ov_artifact: Path) -> None:
    with _load(ov_artifact) as runner:
        first = runner.run({"x": np.ones((1, IN_DIM), np.float32)})
        kept = first["embedding"].copy()
        runner.run({"x": np.full((1, IN_DIM), -3.0, np.float32)})
    np.testing.assert_array_equal(first["embedding"], kept)


def test_runs_a_plain_onnx_artifact(onnx_artifact: Path) -> None:
    """OpenVINO reads ONNX itself: an exported artifact runs with no compile step."""
    x = np.random.default_rng(5).standard_normal((3, IN_DIM)).astype(np.float32)
    with _load(onnx_artifact) as runner:
        assert runner.backend == "openvino" and [s.name for s in runner.inputs] == ["x"]
        got = runner.run({"x": x})
    np.testing.assert_allclose(got["embedding"], _reference(x)["embedding"], rtol=1e-5, atol=1e-5)


def test_auto_device_is_openvinos_auto_plugin(ov_artifact: Path) -> None:
    x = np.ones((1, IN_DIM), np.float32)
    with _load(ov_artifact, device="AUTO") as runner:
        assert runner.device.startswith("auto:") and "cpu" in runner.device
        np.testing.assert_allclose(runner.run({"x": x})["embedding"], _reference(x)["embedding"], rtol=1e-5, atol=1e-5)


def test_streams_recorded_and_applied(onnx_artifact: Path, tmp_path: Path) -> None:
    out, manifest = _compile(onnx_artifact, tmp_path / "streams", extra={"num_streams": 2,
                                                                         "performance_hint": "throughput"})
    assert manifest.target["num_streams"] == 2 and manifest.target["performance_hint"] == "THROUGHPUT"
    with _load(out) as runner:
        assert int(runner._compiled.get_property("NUM_STREAMS")) == 2


def test_closed_runner_refuses(ov_artifact: Path) -> None:
    runner = _load(ov_artifact)
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.run({"x": np.ones((1, IN_DIM), np.float32)})


def test_ir_recompiled_for_a_static_batch(ov_artifact: Path, tmp_path: Path) -> None:
    from enginekit.api import compile_artifact
    from enginekit.runtimes.base import run_batched

    parent = read_manifest(ov_artifact).replace(fidelity={"top1_agreement": 1.0})
    out, manifest = _compile(ov_artifact, tmp_path / "static", extra={"static_batch": 2})
    assert manifest.component().inputs[0].shape == (2, IN_DIM)
    assert manifest.target["static_batch"] == 2
    assert manifest.target["inference_precision_hint"] == parent.target["inference_precision_hint"]
    x = np.random.default_rng(3).standard_normal((5, IN_DIM)).astype(np.float32)
    with _load(out) as runner:
        with pytest.raises(ShapeError):
            runner.run({"x": x[:1]})
        got = run_batched(runner, x)  # 2 + 2 + (1 padded to 2)
    np.testing.assert_allclose(got["embedding"], _reference(x)["embedding"], rtol=1e-5, atol=1e-5)
    assert got["logits"].shape == (5, OUT_DIM)
    # only OpenVINO takes an IR back in; ONNX Runtime says what it compiles
    with pytest.raises(BackendError, match="compiles onnx artifacts"):
        compile_artifact(ov_artifact, "onnxruntime", tmp_path / "ort")
    assert not (tmp_path / "ort").exists()


def test_compile_fills_this_machines_cache(onnx_artifact: Path, tmp_path: Path, _cache_in_tmp: Path) -> None:
    """compile_artifact compiles the engine once for the device here, so the first load is a cache hit."""
    from enginekit.api import compile_artifact, load_runner, warm_cache

    out = tmp_path / "warm"
    manifest = compile_artifact(onnx_artifact, "openvino", out)
    assert any(cache_dir_for(manifest).iterdir())
    runner, _ = load_runner(out, device="cpu")
    with runner:
        assert runner.loaded_from_cache is True
    assert warm_cache(onnx_artifact) is False  # plain ONNX runs on ONNX Runtime: no model cache to fill
    assert warm_cache(tmp_path / "missing") is False  # best effort: never raises
