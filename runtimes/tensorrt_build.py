"""Building a TensorRT plan from an ONNX file, as trtexec and Polygraphy do.

``Builder`` -> ``create_network`` with ``STRONGLY_TYPED`` (TensorRT 11 builds only strongly
typed networks, and on TensorRT 10 the flag makes the ONNX's own types the engine's: the
precision is decided in the ONNX, by autocast or Q/DQ, not by builder flags) ->
``OnnxParser.parse_from_file`` (which finds external weights beside the file) ->
``IBuilderConfig`` (workspace pool limit, ``builder_optimization_level``, the persisted timing
cache, one optimization profile per shape bucket) -> ``build_serialized_network``.

The ``tensorrt`` module is a parameter, never imported here: the call sequence is tested
with a stand-in on machines without TensorRT, and the backend passes the real one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from enginekit.errors import BackendError
from enginekit.runtimes.tensorrt_profiles import ShapeRange

__all__ = ["BuildSettings", "make_logger", "build_plan", "parser_errors"]

log = logging.getLogger("enginekit")


@dataclass(frozen=True)
class BuildSettings:
    """The builder configuration one plan is built with."""

    #: ``MemoryPoolType.WORKSPACE`` limit in bytes (0: TensorRT's default, the GPU's memory).
    workspace_bytes: int = 0
    #: 0 (fastest build) to 5 (widest tactic search); TensorRT's default is 3.
    builder_optimization_level: int = 3
    #: Where the timing cache is read from and written back to (None: no persisted cache).
    timing_cache: Path | None = None
    #: ``BuilderFlag.VERSION_COMPATIBLE`` with ``EXCLUDE_LEAN_RUNTIME``: only when asked (the plan
    #: then loads on later TensorRT versions, with host code the runtime must be told to allow).
    version_compatible: bool = False


def make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that keeps the errors it is given (to report in one line) and drops the rest."""

    class _Logger(trt.ILogger):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                self.errors.append(" ".join(str(msg).split()))

    return _Logger()


def parser_errors(parser: Any) -> list[str]:
    """The ONNX parser's errors, one line each: ``node NAME (OP): description``."""
    out = []
    for index in range(int(parser.num_errors)):
        error = parser.get_error(index)
        try:
            desc = " ".join(str(error.desc()).split())
            node = error.node_name() if hasattr(error, "node_name") else ""
            op = error.node_operator() if hasattr(error, "node_operator") else ""
            where = f"node {node}" + (f" ({op})" if op else "") if node else f"node #{error.node()}"
            out.append(f"{where}: {desc}")
        except Exception:  # an older binding without these accessors: its own text
            out.append(" ".join(str(error).split()))
    return out


def _one_line(what: str, lines: Sequence[str], limit: int = 3) -> str:
    shown = "; ".join(lines[:limit])
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return f"{what}: {shown}{more}" if lines else what


def build_plan(trt: Any, onnx_path: Path, profiles: Sequence[Mapping[str, ShapeRange]],
               settings: BuildSettings, logger: Any = None) -> bytes:
    """Build ``onnx_path`` into a serialized plan (bytes), one optimization profile per entry
    of ``profiles``; the timing cache in ``settings`` is read first and written back after."""
    logger = logger if logger is not None else make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    errors = parser_errors(parser)
    if not parsed or errors:
        raise BackendError(_one_line(f"tensorrt's ONNX parser refused {onnx_path.name}",
                                     errors or list(getattr(logger, "errors", [])) or ["no reason given"]))
    config = builder.create_builder_config()
    if settings.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    cache = None
    if settings.timing_cache is not None:
        previous = settings.timing_cache.read_bytes() if settings.timing_cache.is_file() else b""
        cache = config.create_timing_cache(previous)
        # A cache from another TensorRT or GPU is refused (its key says which), not mixed in.
        config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, r in profile.items():
            trt_profile.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(trt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(_one_line(f"tensorrt could not build {onnx_path.name}",
                                     list(getattr(logger, "errors", [])) or ["no reason given"]))
    if settings.timing_cache is not None:
        try:
            _save(settings.timing_cache, config.get_timing_cache().serialize())
        except OSError as exc:  # a cache is an optimisation: the plan is built either way
            log.warning("could not write the TensorRT timing cache %s: %s", settings.timing_cache, exc)
    return bytes(memoryview(plan))


def _save(path: Path, data: Any) -> None:
    """Write the timing cache atomically: two builds at once leave one whole cache, never half of each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
