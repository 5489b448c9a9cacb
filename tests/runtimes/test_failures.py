"""A failed call never affects the next one, on every backend; a runner that cannot be put
back says so; cancellation reaches the running work (between steps, and inside an engine call).

The runner-level failure is a graph with a U-Net's skip connection (pool, upsample, concat):
an odd side makes the concat's inputs disagree inside the engine, which on OpenVINO's CPU
plugin used to leave the compiled model failing at every shape that worked before. The
pipeline-level failure corrupts the denoiser's feed (a batch that does not match), so it
fails inside the engine whatever sizes the exported graphs take.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

import enginekit  # noqa: E402
from enginekit.api import load_runner  # noqa: E402
from enginekit.artifact import atomic_artifact, make_component, write_manifest  # noqa: E402
from enginekit.errors import BackendError, EngineBrokenError, EngineKitError, RunInterrupted  # noqa: E402
from enginekit.manifest import Manifest, TensorSpec  # noqa: E402
from enginekit.registry import backend_class  # noqa: E402
from enginekit.runtimes.tasks.text_to_image import GenerationCancelled  # noqa: E402

BACKENDS = ["onnxruntime", "openvino"]
#: The pipeline artifact each backend runs (ONNX Runtime runs the exported ONNX itself).
PIPELINE_KIND = {"onnxruntime": "onnx", "openvino": "openvino"}


def _need(backend: str) -> None:
    if not backend_class(backend).is_available():
        pytest.skip(f"{backend} is not installed (pip install enginekit[{backend}])")


def _artifact(out: Path, name: str, model: onnx.ModelProto, inputs: list[TensorSpec],
              outputs: list[TensorSpec]) -> Path:
    with atomic_artifact(out) as tmp:
        (tmp / name).mkdir()
        onnx.save(model, str(tmp / name / "model.onnx"))
        comp = make_component(tmp, name, f"{name}/model.onnx", [f"{name}/model.onnx"], inputs, outputs)
        write_manifest(tmp, Manifest(kind="onnx", task="image-classification", family="test", components={name: comp}))
    return out


@pytest.fixture(scope="module")
def skip_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = concat(x, upsample(maxpool(x))): runs at even sides, fails inside the engine at odd ones."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Resize", ["pooled", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["x", "up"], ["cat"], axis=1),
        helper.make_node("Relu", ["cat"], ["y"]),
    ]
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    graph = helper.make_graph(nodes, "skip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "h", "w"])], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _artifact(tmp_path_factory.mktemp("skip") / "skip", "skip", model,
                     [TensorSpec("x", "float32", ("batch", 2, "h", "w"))], [TensorSpec("y", "float32", ("batch", 4, "h", "w"))])


@pytest.fixture(scope="module")
def slow_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twenty 768x768 matrix products in a row: long enough to be stopped half-way."""
    n = 768
    weight = helper.make_tensor("w", TensorProto.FLOAT, [n, n], (np.eye(n, dtype=np.float32) * 0.5).ravel().tolist())
    nodes, last = [], "x"
    for i in range(20):
        nodes.append(helper.make_node("MatMul", [last, "w"], [f"m{i}"]))
        last = f"m{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _artifact(tmp_path_factory.mktemp("slow") / "slow", "slow", model,
                     [TensorSpec("x", "float32", ("rows", n))], [TensorSpec("y", "float32", ("rows", n))])


def _x(h: int, w: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((1, 2, h, w), dtype=np.float32)}


# ---------------------------------------------------------------------------- runners

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_run_leaves_the_runner_as_it_was(skip_graph: Path, backend: str) -> None:
    _need(backend)
    runner, _ = load_runner(skip_graph, device="cpu", backend=backend)
    first = runner.run(_x(8, 8))["y"]
    with pytest.raises(BackendError) as info:
        runner.run(_x(9, 8))
    message = str(info.value)
    assert message.startswith(f"{backend} component 'skip' failed: ") and "\n" not in message, message
    assert runner.broken is None
    np.testing.assert_array_equal(runner.run(_x(8, 8))["y"], first)
    np.testing.assert_array_equal(runner.run(_x(8, 8))["y"], first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_runner_that_cannot_be_put_back_is_broken_and_says_why(skip_graph: Path, backend: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _need(backend)
    runner, _ = load_runner(skip_graph, device="cpu", backend=backend)

    def cannot() -> None:
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setattr(runner, "_recover", cannot)
    with pytest.raises(BackendError, match="failed"):
        runner.run(_x(9, 8))
    assert runner.broken == "recovery after a failed run failed: device lost"
    with pytest.raises(EngineBrokenError, match="is broken .*device lost.*load the model again"):
        runner.run(_x(8, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_interrupt_stops_an_engine_call_in_flight(slow_graph: Path, backend: str) -> None:
    _need(backend)
    runner, _ = load_runner(slow_graph, device="cpu", backend=backend)
    feeds = {"x": np.ones((256, 768), dtype=np.float32)}
    assert runner.interrupt() is False  # nothing runs: nothing to stop
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["out"] = runner.run(feeds)
        except Exception as exc:  # noqa: BLE001 - the test reads it
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    while thread.is_alive() and not runner.interrupt():
        pass
    thread.join(120)
    assert isinstance(outcome.get("error"), RunInterrupted), outcome
    assert runner.broken is None
    out = runner.run({"x": np.ones((2, 768), dtype=np.float32)})["y"]
    np.testing.assert_allclose(out, np.full((2, 768), 0.5 ** 20, dtype=np.float32), rtol=1e-5)


# ---------------------------------------------------------------------------- pipelines

def _pipeline(tiny_pipelines: dict, backend: str):
    _need(backend)
    return enginekit.load(tiny_pipelines[("tiny-sd15", PIPELINE_KIND[backend])], device="cpu", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_good_bad_good_gives_the_same_image(tiny_pipelines: dict, backend: str) -> None:
    pipe = _pipeline(tiny_pipelines, backend)
    args = dict(prompt="a lighthouse", num_inference_steps=2, guidance_scale=5.0, seed=3, output_type="np")
    first = pipe(**args).images

    def corrupt(component: str, feeds: dict) -> None:  # a batch that does not match the latents
        if component == "unet":
            feeds["encoder_hidden_states"] = np.concatenate([feeds["encoder_hidden_states"]] * 2)[:3]

    pipe.recorder = corrupt
    with pytest.raises(BackendError, match=f"^{backend} component 'unet' failed: ") as info:
        pipe(**args)
    assert isinstance(info.value, EngineKitError) and "\n" not in str(info.value)
    pipe.recorder = None
    np.testing.assert_array_equal(pipe(**args).images, first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_from_another_thread_stops_at_the_next_step(tiny_pipelines: dict, backend: str) -> None:
    pipe = _pipeline(tiny_pipelines, backend)
    cancel = threading.Event()
    seen: list[np.ndarray] = []

    def callback(i: int, t: float, latents: np.ndarray) -> None:
        seen.append(latents.copy())
        if i == 1:  # during the run, from another thread
            other = threading.Thread(target=cancel.set)
            other.start()
            other.join()

    with pytest.raises(GenerationCancelled) as info:
        pipe("a cat", num_inference_steps=10, seed=1, callback=callback, cancel=cancel, output_type="np")
    assert len(seen) == 2 and (info.value.step, info.value.steps) == (2, 10)
    np.testing.assert_array_equal(info.value.latents, seen[-1])
    assert pipe.decode(info.value.latents).shape == (1, 64, 64, 3)


def test_a_callback_returning_false_stops_with_what_was_made(tiny_pipelines: dict) -> None:
    pipe = _pipeline(tiny_pipelines, "onnxruntime")
    seen: list[np.ndarray] = []

    def callback(i: int, t: float, latents: np.ndarray) -> bool | None:
        seen.append(latents.copy())
        return False if i == 2 else None  # None (and True) go on

    with pytest.raises(GenerationCancelled, match="by the callback after step 3") as info:
        pipe("a cat", num_inference_steps=6, seed=1, callback=callback)
    assert (info.value.step, info.value.steps) == (3, 6) and len(seen) == 3
    np.testing.assert_array_equal(info.value.latents, seen[-1])
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled, match="before step 1") as info:
        pipe("a cat", num_inference_steps=6, seed=1, cancel=cancel)
    assert info.value.latents is None and info.value.step == 0
