"""The runtime contract: a Backend compiles and loads; a Runner runs.

Following Polygraphy, the public methods of :class:`Runner` validate feeds and
keep books; each backend writes only ``_run`` and ``_close``. Nothing touches
a device in a constructor: :meth:`Backend.load` is where sessions are made.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from enginekit.errors import ShapeError
from enginekit.manifest import Manifest, TensorSpec

__all__ = ["Runner", "Backend", "CompileOptions", "run_batched", "validate_feeds"]


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
    """A loaded engine: named numpy arrays in, named numpy arrays out."""

    #: Backend name and the device the engine runs on, e.g. ``"cpu"``.
    backend: str = ""
    device: str = ""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs: tuple[TensorSpec, ...] = tuple(inputs)
        self.outputs: tuple[TensorSpec, ...] = tuple(outputs)
        self._closed = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feeds`` against :attr:`inputs` and run the engine."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        return self._run(validate_feeds(self.inputs, feeds))

    def close(self) -> None:
        if not self._closed:
            self._close()
            self._closed = True

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _close(self) -> None:  # noqa: B027 - optional hook
        pass


@dataclass(frozen=True)
class CompileOptions:
    """What ``compile`` may be asked for, independent of the backend."""

    device: str = "cpu"
    #: Worker threads the engine may use; 0 lets the backend decide.
    threads: int = 0
    #: Backend-specific settings, recorded verbatim in the manifest.
    extra: Mapping[str, Any] = field(default_factory=dict)


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

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """True when the backend's library imports."""

    @classmethod
    @abc.abstractmethod
    def version(cls) -> str | None:
        """The backend library's version, or None when not installed."""

    @abc.abstractmethod
    def devices(self) -> list[str]:
        """Devices this backend can run on here, best first (what ``device='auto'`` picks from)."""

    @abc.abstractmethod
    def compile(self, artifact: Path, manifest: Manifest, out_dir: Path, options: CompileOptions) -> Manifest:
        """Write the compiled engine of ``artifact`` into ``out_dir`` (a fresh temporary
        folder) and return its manifest; the caller writes it and renames the folder."""

    @abc.abstractmethod
    def load(self, artifact: Path, manifest: Manifest, device: str) -> Runner:
        """Open a verified artifact on ``device`` (never ``'auto'``: resolved by the caller)."""

    def warm(self, artifact: Path, manifest: Manifest, device: str) -> bool:
        """Fill this machine's model cache for a verified artifact, where the backend keeps
        one, so that the next :meth:`load` skips the device compilation. True when it did."""
        return False


def run_batched(runner: Runner, values: np.ndarray, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Run ``values`` (N, ...) through a single-input ``runner`` in slices; concatenate outputs by name.

    Slices are ``batch_size`` rows (all N at once when None), except that an
    engine built for a fixed batch B always gets exactly B rows: the last slice
    is padded by repeating its final row, and the padding's outputs are dropped.
    """
    name = runner.inputs[0].name
    fixed = runner.inputs[0].shape[0] if runner.inputs[0].shape else None
    fixed = fixed if isinstance(fixed, int) and fixed > 0 else None
    n = len(values)
    step = fixed or batch_size or max(n, 1)
    if step >= n and (fixed is None or n == fixed):
        return runner.run({name: values})
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, step):
        chunk = values[start : start + step]
        keep = len(chunk)
        if fixed is not None and keep < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - keep, axis=0)])
        for key, value in runner.run({name: chunk}).items():
            parts.setdefault(key, []).append(value[:keep])
    return {key: np.concatenate(v) for key, v in parts.items()}
