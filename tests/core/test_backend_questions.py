"""The core asks the backend, never its name: a backend registered at run time answers the
same questions as the built-in ones (defaults on :class:`enginekit.engine.Backend`), and the
core acts on its answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import pytest

from enginekit.artifact import make_component, verify_artifact, write_manifest
from enginekit.engine import Backend, Runner
from enginekit.errors import IntegrityError
from enginekit.manifest import Manifest, TensorSpec
from enginekit.registry import backend_class, backend_for_kind, register_backend, unregister_backend


class FakeIRBackend(Backend):
    """A third-party backend with its own engine format: ``model.fir`` reads ``model.fir.weights``."""

    name: ClassVar[str] = "fakeir"
    extra: ClassVar[str] = "fakeir"
    kind: ClassVar[str] = "fakeir"
    loads: ClassVar[tuple[str, ...]] = ("fakeir",)
    entry_format: ClassVar[str] = "fake-ir"
    static_shapes: ClassVar[bool] = True
    throughput_target: ClassVar[Mapping[str, Any]] = {"fake_streams": "many"}

    @classmethod
    def entry_companions(cls, entry: str) -> list[str]:
        return [entry + ".weights"]

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def version(cls) -> str | None:
        return "0"

    def devices(self) -> list[str]:
        return ["cpu"]

    def compile(self, *args: Any) -> Manifest:
        raise NotImplementedError

    def load(self, artifact: Path, manifest: Manifest, device: str, component: str | None = None) -> Runner:
        return _TargetRunner(manifest)


class _TargetRunner(Runner):
    """Runs nothing; keeps the ``target`` the backend was asked to load with."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__([], [])
        self.target = dict(manifest.target)

    def _run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return {}


class PlainBackend(FakeIRBackend):
    """One that overrides none of the questions: the base class's answers."""

    name: ClassVar[str] = "plainbe"
    kind: ClassVar[str] = "plainbe"
    entry_format = Backend.entry_format
    static_shapes = Backend.static_shapes
    entry_companions = Backend.entry_companions
    throughput_target = Backend.throughput_target


@pytest.fixture
def fake_backends():
    register_backend("fakeir", f"{__name__}:FakeIRBackend")
    register_backend("plainbe", f"{__name__}:PlainBackend")
    try:
        yield
    finally:
        unregister_backend("fakeir")
        unregister_backend("plainbe")


def _artifact(root: Path, kind: str, files: dict[str, bytes]) -> Manifest:
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    spec = TensorSpec("x", "float32", (1,))
    comp = make_component(root, "model", "model.fir", sorted(files), [spec], [spec])
    manifest = Manifest(kind=kind, task="image-classification", family="test", components={"model": comp})
    write_manifest(root, manifest)
    return manifest


def test_a_backend_registered_at_run_time_owns_its_kind(fake_backends) -> None:
    assert backend_for_kind("fakeir") is FakeIRBackend
    assert backend_for_kind("onnx") is None  # the export's kind: no backend writes it
    assert backend_for_kind("no-such-kind") is None


def test_defaults_answer_for_a_backend_that_says_nothing(fake_backends) -> None:
    plain = backend_class("plainbe")
    assert (plain.entry_format, plain.static_shapes, plain.pool_per_engine) == ("onnx", False, False)
    assert plain.entry_companions("model.fir") == [] and dict(plain.throughput_target) == {}
    assert plain.quantized_target({}) == {"backend": "plainbe", "device": "cpu"}


def test_verify_asks_the_backend_which_files_an_entry_reads(fake_backends, tmp_path: Path) -> None:
    # The backend says model.fir reads model.fir.weights: an artifact that does not list it is refused.
    unlisted = _artifact(tmp_path / "a", "fakeir", {"model.fir": b"graph"})
    with pytest.raises(IntegrityError, match=r"model\.fir reads model\.fir\.weights"):
        verify_artifact(tmp_path / "a", unlisted)
    listed = _artifact(tmp_path / "b", "fakeir", {"model.fir": b"graph", "model.fir.weights": b"w"})
    verify_artifact(tmp_path / "b", listed)


def test_pipeline_rebuild_asks_whether_compile_fixes_the_size(fake_backends) -> None:
    from enginekit.app.rebuild import pipeline_rebuild_commands

    report = {"model": "m", "size": 64, "source": {}}
    candidate = {"name": "best", "backend": "fakeir", "how": "quantize", "method": "int8",
                 "precisions": {"*": "int8"}}
    fixed = pipeline_rebuild_commands(report, candidate, ["unet"])
    assert fixed[-1].startswith("enginekit compile quantized -b fakeir") and "--height 64 --width 64" in fixed[-1]
    # A backend whose compile keeps shapes open runs the quantized pipeline as it is: no compile line.
    plain = pipeline_rebuild_commands(report, {**candidate, "backend": "plainbe"}, ["unet"])
    assert not any(line.startswith("enginekit compile") for line in plain)
    # A streamed optimize export (full-size pipelines) is rebuilt streamed.
    streamed = pipeline_rebuild_commands({**report, "source": {"streaming": True}}, candidate, ["unet"])
    assert streamed[0] == "enginekit export m -o onnx --streaming" and "--streaming" not in fixed[0]


@pytest.mark.parametrize(("mode", "target"), [("throughput", {"fake_streams": "many"}), ("latency", {})])
def test_bench_loads_with_the_backend_s_throughput_settings(fake_backends, tmp_path: Path, mode: str,
                                                           target: dict) -> None:
    from enginekit.bench.harness import _open

    _artifact(tmp_path / "a", "fakeir", {"model.fir": b"graph", "model.fir.weights": b"w"})
    runner, _, name, _ = _open(tmp_path / "a", "cpu", "fakeir", 0, mode)
    with runner:
        assert (name, runner.target) == ("fakeir", target)
