"""Running a TensorRT plan: named numpy arrays in and out, no torch.

``Runtime.deserialize_cuda_engine`` -> ``create_execution_context``; per call the optimization
profile that covers the feeds, ``set_input_shape`` + ``set_tensor_address`` per input, device
buffers (grown, never shrunk) per output, ``execute_async_v3`` on the runner's stream, copies
back. A plan whose profiles are all static (min = opt = max) replays a captured CUDA graph
after its first call at a shape; outputs whose shape depends on the data (``-1`` after the
input shapes are set) are sized by TensorRT through an ``IOutputAllocator``.

``trt`` (the tensorrt module) and ``cuda`` (:mod:`.tensorrt_cuda`) are parameters, so the
bookkeeping is testable with stand-ins.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np

from enginekit.errors import BackendError
from enginekit.manifest import TensorSpec
from enginekit.runtimes.base import Runner
from enginekit.runtimes.tensorrt_profiles import ShapeRange, pick_profile

__all__ = ["TensorRTRunner", "deserialize", "make_output_allocator"]


def deserialize(trt: Any, plan: bytes, logger: Any, allow_host_code: bool = False) -> Any:
    """The engine of a serialized plan (the caller has already checked its TensorRT version and GPU)."""
    runtime = trt.Runtime(logger)
    # Host code runs in this process: only for a plan built version-compatible on request.
    runtime.engine_host_code_allowed = allow_host_code
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        errors = "; ".join(getattr(logger, "errors", [])[:2]) or "no reason given"
        raise BackendError(f"tensorrt could not deserialize the plan: {errors}")
    return engine


def make_output_allocator(trt: Any, cuda: Any) -> Any:
    """An ``IOutputAllocator`` that keeps one growing device buffer per data-dependent output
    and the shape TensorRT reports for it."""

    class _Allocator(trt.IOutputAllocator):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, Any] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name: str, memory: int, size: int, alignment: int) -> int:
            buf = self.buffers.get(tensor_name)
            if buf is None or buf.nbytes < size:
                if buf is not None:
                    buf.free()
                buf = self.buffers[tensor_name] = cuda.DeviceBuffer(size)
            return buf.ptr

        def reallocate_output_async(self, tensor_name: str, memory: int, size: int, alignment: int,
                                    stream: int) -> int:
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name: str, shape: Any) -> None:
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

        def free(self) -> None:
            for buf in self.buffers.values():
                buf.free()
            self.buffers.clear()

    return _Allocator()


class TensorRTRunner(Runner):
    """One engine, one execution context, one stream. Calls are serialized (a context runs one
    inference at a time); a failed call leaves the context usable, so there is nothing to recover."""

    backend = "tensorrt"

    def __init__(self, trt: Any, cuda: Any, engine: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 profiles: Sequence[Mapping[str, ShapeRange]], device: str, cuda_graphs: bool = True) -> None:
        super().__init__(inputs, outputs)
        self._trt, self._cuda, self._engine = trt, cuda, engine
        self._profiles = list(profiles)
        self.device = device
        self._lock = threading.Lock()
        self._context = engine.create_execution_context()
        self._stream = cuda.Stream()
        self._profile = 0
        self._buffers: dict[str, Any] = {}
        self._allocator: Any = None
        self._graph: Any = None
        self._graph_key: Any = None
        # Graphs replay fixed addresses and shapes: only where every profile is static.
        self.cuda_graphs = cuda_graphs and all(r.static for p in self._profiles for r in p.values())

    def _buffer(self, name: str, nbytes: int) -> Any:
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                buf.free()
            buf = self._buffers[name] = self._cuda.DeviceBuffer(nbytes)
            self._drop_graph()  # an address it captured is gone
        return buf

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self._run_locked(feeds)

    def _run_locked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, ctx, stream = self._trt, self._context, self._stream
        index = pick_profile(self._profiles, {n: a.shape for n, a in feeds.items()})
        if index != self._profile:
            if not ctx.set_optimization_profile_async(index, stream.handle):
                raise BackendError(f"could not switch to optimization profile {index}")
            self._profile = index
            self._drop_graph()
        for name, array in feeds.items():
            if not ctx.set_input_shape(name, array.shape):
                raise BackendError(f"input {name!r} shape {array.shape} is outside the plan's profile {index}")
            buf = self._buffer(name, array.nbytes)
            buf.upload(array, stream)
            ctx.set_tensor_address(name, buf.ptr)
        results: dict[str, np.ndarray] = {}
        dynamic: list[str] = []
        for spec in self.outputs:
            shape = tuple(ctx.get_tensor_shape(spec.name))
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(spec.name)))
            if any(d < 0 for d in shape):  # data-dependent: TensorRT asks the allocator during the run
                dynamic.append(spec.name)
                if self._allocator is None:
                    self._allocator = make_output_allocator(trt, self._cuda)
                ctx.set_output_allocator(spec.name, self._allocator)
                continue
            results[spec.name] = np.empty(shape, dtype)
            ctx.set_tensor_address(spec.name, self._buffer(spec.name, results[spec.name].nbytes).ptr)
        self._execute(feeds, graphable=not dynamic)
        for name in dynamic:
            shape = self._allocator.shapes[name]
            results[name] = np.empty(shape, np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))))
        for name, array in results.items():
            (self._allocator.buffers[name] if name in dynamic else self._buffers[name]).download(array, stream)
        stream.synchronize()
        return {spec.name: results[spec.name] for spec in self.outputs}

    def _execute(self, feeds: Mapping[str, np.ndarray], graphable: bool) -> None:
        ctx, stream = self._context, self._stream

        def execute() -> None:
            if not ctx.execute_async_v3(stream.handle):
                raise BackendError("execute_async_v3 failed")

        if not (self.cuda_graphs and graphable):
            return execute()
        key = (self._profile, tuple((n, a.shape) for n, a in feeds.items()))
        if self._graph is None or self._graph_key != key:
            self._drop_graph()
            self._graph = self._cuda.CudaGraph(stream, execute)
            self._graph_key = key
            return None  # the capture's warm-up run computed this call's outputs
        self._graph.launch(stream)
        return None

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None
            self._graph_key = None

    def _close(self) -> None:
        with self._lock:
            self._drop_graph()
            for buf in self._buffers.values():
                buf.free()
            self._buffers.clear()
            if self._allocator is not None:
                self._allocator.free()
                self._allocator = None
            self._stream.close()
            self._context = None
            self._engine = None
