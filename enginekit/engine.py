"""The runtime contract: a Backend compiles and loads; a Runner runs.

Part of the core (``enginekit.engine``): ``enginekit.api`` and the registries
depend on it, and the core imports no stage module.

Following Polygraphy, the public methods of :class:`Runner` validate feeds and
keep books; each backend writes only ``_run`` and ``_close`` (and, where it can,
``_recover`` after a failed run and ``_interrupt`` for a run in flight). Nothing touches
a device in a constructor: :meth:`Backend.load` is where sessions are made.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from enginekit.errors import BackendError, EngineBrokenError, EngineKitError, RunInterrupted, ShapeError
from enginekit.manifest import Manifest, TensorSpec

__all__ = ["Runner", "Backend", "BackendOptions", "CompileOptions", "validate_feeds", "one_line"]


def validate_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check names, dtypes and fixed dimensions of ``feeds`` against ``specs``.

    Raises :class:`ShapeError` naming the first mismatch. Arrays are not cast:
    a float64 image handed to a float32 engine is a caller bug worth reporting.
    """
    if not isinstance(feeds, Mapping):
        raise ShapeError(f"feeds must be a dict of name -> array, got {type(feeds).__name__}")
    expected = {s.name for s in specs}
    missing = expected - set(feeds)
    unknown = set(feeds) - expected
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {sorted(missing)}")
        if unknown:
            parts.append(f"unexpected {sorted(unknown)}")
        raise ShapeError(f"feeds do not match the engine inputs ({'; '.join(parts)}); expected {sorted(expected)}")
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise ShapeError(f"input {spec.name!r} must be a numpy array, got {type(value).__name__}")
        if value.dtype != np.dtype(spec.dtype):
            raise ShapeError(f"input {spec.name!r} has dtype {value.dtype}, the engine expects {spec.dtype}")
        if value.ndim != len(spec.shape):
            raise ShapeError(
                f"input {spec.name!r} has shape {tuple(value.shape)}, the engine expects rank {len(spec.shape)} "
                f"{_fmt_shape(spec.shape)}"
            )
        for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise ShapeError(
                    f"input {spec.name!r} has shape {tuple(value.shape)}, the engine expects "
                    f"{_fmt_shape(spec.shape)} (axis {axis} must be {want})"
                )
        out[spec.name] = np.ascontiguousarray(value)
    return out


def _fmt_shape(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class Runner(abc.ABC):
    """A loaded engine: named numpy arrays in, named numpy arrays out.

    A failed call never spreads to the next one: :meth:`run` turns whatever the
    backend raised into a one-line :class:`BackendError` naming the component,
    then lets the backend put the engine back as it was (:meth:`_recover`). An
    engine that cannot be put back is *broken* (:attr:`broken` says why) and
    refuses every later call with :class:`EngineBrokenError`.
    """

    #: Backend name and the device the engine runs on, e.g. ``"cpu"``.
    backend: str = ""
    device: str = ""
    #: The artifact component this runner runs (``"unet"``); "" for a single-component artifact.
    component: str = ""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs: tuple[TensorSpec, ...] = tuple(inputs)
        self.outputs: tuple[TensorSpec, ...] = tuple(outputs)
        self._closed = False
        #: Why the engine can no longer run (its recovery after a failure failed); None while usable.
        self.broken: str | None = None
        self._interrupt_lock = threading.Lock()
        self._running = 0  # calls in progress (ONNX Runtime lets threads share a session)
        self._interrupted = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feeds`` against :attr:`inputs` and run the engine."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if self.broken is not None:
            raise EngineBrokenError(f"{self._label()} is broken ({self.broken}); load the model again")
        checked = validate_feeds(self.inputs, feeds)
        with self._interrupt_lock:
            if not self._running:
                self._interrupted = False
            self._running += 1
        try:
            return self._run(checked)
        except EngineKitError:
            raise
        except Exception as exc:
            if self._interrupted:  # stopped on purpose: the engine is as it was
                raise RunInterrupted(f"{self._label()}: the run was interrupted") from exc
            reason = self._describe(exc)
            try:
                self._recover()
            except Exception as again:
                self.broken = f"recovery after a failed run failed: {self._describe(again)}"
            raise BackendError(f"{self._label()} failed: {reason}") from exc
        finally:
            with self._interrupt_lock:
                self._running -= 1

    def interrupt(self) -> bool:
        """Stop the run in progress, from another thread; it raises :class:`RunInterrupted`.
        False when no run was in progress or the backend cannot stop one (nothing happens)."""
        with self._interrupt_lock:
            if not self._running or self._closed:
                return False
            self._interrupted = True
            try:
                return self._interrupt()
            except Exception:  # a run that ended meanwhile: nothing left to stop
                return False

    def close(self) -> None:
        if not self._closed:
            self._close()
            self._closed = True

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _label(self) -> str:
        """``"onnxruntime component 'unet'"``: who failed, for one-line errors."""
        name = self.backend or type(self).__name__
        return f"{name} component {self.component!r}" if self.component else name

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _close(self) -> None:  # noqa: B027 - optional hook
        pass

    def _recover(self) -> None:  # noqa: B027 - optional hook
        """Put the engine back as it was before a failed run (the backend's hook; raise if it cannot)."""

    def _interrupt(self) -> bool:
        """Stop the run in progress (the backend's hook); False where the backend cannot."""
        return False

    def _describe(self, exc: BaseException) -> str:
        """The informative line of a backend exception (backends strip their own prefixes)."""
        return one_line(exc)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message (its type's name when it has none), at most ``limit`` long."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class CompileOptions:
    """What ``compile`` may be asked for, independent of the backend."""

    device: str = "cpu"
    #: Worker threads the engine may use; 0 lets the backend decide.
    threads: int = 0
    #: Backend-specific settings: parsed by the backend's :class:`BackendOptions`
    #: subclass, which refuses keys it does not know and values of the wrong type.
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendOptions:
    """Base of each backend's typed compile options (a frozen dataclass per backend).

    :meth:`parse` turns the free ``CompileOptions.extra`` mapping into the
    dataclass: an unknown key or a value of the wrong type is a one-line
    :class:`BackendError` naming the key and what it takes, never an option
    that is silently ignored. Fields may carry ``metadata={"choices": (...)}``.
    """

    @classmethod
    def parse(cls, backend: str, values: Mapping[str, Any]) -> BackendOptions:
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise BackendError(f"{backend}: options must be a mapping of name -> value")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            known = ", ".join(sorted(fields)) or "none"
            raise BackendError(f"{backend}: unknown option {unknown[0]!r} (this backend takes: {known})")
        hints = typing.get_type_hints(cls)
        parsed = {name: _coerce(backend, name, value, hints[name], fields[name]) for name, value in values.items()}
        return cls(**parsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(backend: str, name: str, value: Any, hint: Any, spec: dataclasses.Field) -> Any:
    """Check ``value`` against the field's type: int, float, str, bool, a tuple of str or a mapping."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    wrong = f"{backend}: option {name!r} must be {_type_name(origin)}, got {value!r}"
    if origin is bool:
        if not isinstance(value, bool):
            raise BackendError(wrong)
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BackendError(wrong)
    elif origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BackendError(wrong)
        value = float(value)
    elif origin is str:
        if not isinstance(value, str):
            raise BackendError(wrong)
    elif origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise BackendError(f"{backend}: option {name!r} must be a list of names, got {value!r}")
        value = tuple(value)
    elif origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise BackendError(wrong)
        value = dict(value)
    choices = spec.metadata.get("choices")
    if choices and isinstance(value, str):  # "latency" names LATENCY: match the spelling the backend uses
        value = next((c for c in choices if isinstance(c, str) and c.lower() == value.lower()), value)
    if choices and value not in choices:
        raise BackendError(f"{backend}: option {name!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _type_name(origin: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "a list of names"}.get(origin, "a mapping")


class Backend(abc.ABC):
    """A named backend. Subclasses import their library inside methods only."""

    name: ClassVar[str]
    #: The pip extra that installs the backend's library: ``enginekit[<extra>]``.
    extra: ClassVar[str]
    #: The artifact kind :meth:`compile` writes.
    kind: ClassVar[str]
    #: Artifact kinds :meth:`load` accepts.
    loads: ClassVar[tuple[str, ...]]
    #: Artifact kinds :meth:`compile` takes (an exported ONNX graph by default).
    compiles: ClassVar[tuple[str, ...]] = ("onnx",)
    #: The typed options :meth:`compile` takes in ``CompileOptions.extra``.
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    #: The ``target`` key of a manifest that holds the engine's thread count, applied at
    #: load (None: the backend takes none); callers that pin threads ask this, not a name.
    threads_key: ClassVar[str | None] = None
    #: A device name that hands the choice to the backend's own plugin (OpenVINO's
    #: ``AUTO``) instead of enginekit's ``auto``, which picks from :meth:`devices`.
    native_auto: ClassVar[str | None] = None
    #: The format of the file a component's ``entry`` names in artifacts of :attr:`kind`:
    #: ``"onnx"`` (a graph whose external data the core checks) or the backend's own format,
    #: whose other files :meth:`entry_companions` names.
    entry_format: ClassVar[str] = "onnx"
    #: Whether :meth:`compile` fixes the input sizes (a pipeline is compiled at one image size,
    #: so rebuilding it names ``--height/--width/--batch``).
    static_shapes: ClassVar[bool] = False
    #: Whether each loaded engine keeps its own thread pool sized to every core, so that
    #: engines serving requests side by side should split the cores between them.
    pool_per_engine: ClassVar[bool] = False
    #: ``target`` settings that tune a loaded engine for many requests at once rather than
    #: one at a time (applied at load by ``bench --mode throughput``); empty: none.
    throughput_target: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})

    @classmethod
    def entry_companions(cls, entry: str) -> list[str]:
        """The files besides ``entry`` (a component's entry, in :attr:`entry_format`) that
        loading it reads, relative to the artifact like ``entry``; none by default."""
        return []

    @classmethod
    def quantized_target(cls, details: Mapping[str, Any]) -> dict[str, Any]:
        """The manifest ``target`` of an artifact quantized for this backend (``details``: what
        the quantizer recorded about its result)."""
        return {"backend": cls.name, "device": "cpu"}

    def options(self, extra: Mapping[str, Any]) -> BackendOptions:
        """Parse ``CompileOptions.extra`` into this backend's typed options (refusing unknown keys)."""
        return self.Options.parse(self.name, extra)

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """True when the backend's library imports."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, in one line (None when it can): what ``doctor`` and
        the registry's refusal say. The default names the extra that installs the library."""
        return None if cls.is_available() else f"not installed; install it with: pip install 'enginekit[{cls.extra}]'"

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str | None:
        """The backend library's version, or None when not installed."""

    @abc.abstractmethod
    def devices(self) -> list[str]:
        """Devices this backend can run on here, best first (what ``device='auto'`` picks from)."""

    def check_device(self, device: str) -> None:
        """Refuse (:class:`DeviceError`) a device this machine lacks, before a compile writes an
        engine for it. The default compares the device's kind (``gpu.1`` -> ``gpu``; ``gpu`` and
        ``cuda`` are one) with :meth:`devices`; a backend with its own names overrides it."""
        from enginekit.errors import DeviceError

        same = {"gpu": {"gpu", "cuda"}, "cuda": {"gpu", "cuda"}}
        kind = device.lower().split(":")[0].split(".")[0]
        have = [d.lower() for d in self.devices()]
        if not any(d.split(":")[0].split(".")[0] in same.get(kind, {kind}) for d in have):
            raise DeviceError(f"{self.name}: device {device!r} is not available here "
                              f"(available: {', '.join(have) or 'none'}); compile on a machine that has it")

    @abc.abstractmethod
    def compile(self, artifact: Path, manifest: Manifest, out_dir: Path, options: CompileOptions) -> Manifest:
        """Write the compiled engine of ``artifact`` into ``out_dir`` (a fresh temporary
        folder) and return its manifest; the caller writes it and renames the folder."""

    @abc.abstractmethod
    def load(self, artifact: Path, manifest: Manifest, device: str, component: str | None = None) -> Runner:
        """Open one component of a verified artifact on ``device`` (never ``'auto'``: resolved
        by the caller); ``component=None`` means the artifact's only one."""

    def load_low_memory(self, artifact: Path, manifest: Manifest, device: str, component: str | None = None) -> Runner:
        """Open one component as :meth:`load` does, with the backend's settings for the least
        resident memory rather than the fastest run (no memory arena kept between runs, weights
        left memory-mapped where the backend allows): what ``load(..., low_memory=True)`` uses.
        The engine computes the same numbers. The default is :meth:`load` itself."""
        return self.load(artifact, manifest, device, component)

    def load_cut(self, artifact: Path, manifest: Manifest, device: str, component: str, cut: Any,
                 low_memory: bool = False) -> Runner:
        """Open a graph derived from one component: cut by ``cut`` (a
        :class:`enginekit.runtimes.graph_cut.Cut`: outputs kept, outputs fed back in as inputs), or
        with intermediate tensors added as outputs (an
        :class:`enginekit.runtimes.attention_taps.AttentionTap`); ``cut.apply_onnx(path)`` and
        ``cut.apply_openvino(model, where)`` derive it. The settings are those :meth:`load` (or
        :meth:`load_low_memory`) gives the whole of it."""
        if getattr(cut, "label", None) == "attention":  # an explanation asked for the attention probabilities
            raise BackendError(f"{self.name} cannot give its engine's attention probabilities (its kernels fuse "
                               "the attention); explain with method='occlusion', or run the engine on onnxruntime "
                               "or openvino")
        raise BackendError(f"{self.name} cannot run part of an engine (a graph cut); use onnxruntime or openvino")

    def load_patched(self, artifact: Path, manifest: Manifest, device: str, component: str,
                     tensors: Mapping[str, Any], low_memory: bool = False) -> Runner:
        """Open one component with some of its weight tensors replaced (``tensors``: graph tensor
        name -> new value, same shape and dtype): what LoRA at run time opens beside the base engine."""
        raise BackendError(f"{self.name} cannot replace an engine's weights at run time (LoRA); "
                           "use onnxruntime or openvino, or fuse the LoRA at export (export --lora)")

    def warm(self, artifact: Path, manifest: Manifest, device: str) -> bool:
        """Fill this machine's model cache for every component of a verified artifact, where
        the backend keeps one, so that the next :meth:`load` skips the device compilation.
        True when it did."""
        return False
