"""The CUDA the TensorRT runner needs, through cuda-python's runtime bindings (``cuda.bindings.runtime``).

Device buffers, a stream, host<->device copies, a captured CUDA graph and the device's
properties: the few calls NVIDIA's samples and ``demo/Diffusion`` make, wrapped so that each
failure is one :class:`BackendError` line naming the CUDA error. No torch and no cupy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from enginekit.errors import BackendError, BackendUnavailableError

__all__ = ["runtime", "call", "Stream", "DeviceBuffer", "CudaGraph", "device_properties", "set_device", "versions"]


def runtime() -> Any:
    """``cuda.bindings.runtime``, or a one-line error naming the package that provides it."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        raise BackendUnavailableError("backend 'tensorrt' needs cuda-python for device memory: pip install "
                                      "'cuda-python>=12.6' (or pip install 'enginekit[tensorrt]')") from exc
    return cudart


def call(result: Any, what: str = "CUDA call") -> Any:
    """Check a cuda-python result tuple ``(err, *values)``; return the value(s)."""
    cudart = runtime()
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        try:
            name = cudart.cudaGetErrorName(err)[1].decode()
        except Exception:
            name = str(err)
        raise BackendError(f"{what} failed: {name}")
    return values[0] if len(values) == 1 else (values or None)


def set_device(index: int) -> None:
    call(runtime().cudaSetDevice(index), f"cudaSetDevice({index})")


def device_properties(index: int) -> tuple[str, str]:
    """(name, compute capability "major.minor") of GPU ``index``."""
    props = call(runtime().cudaGetDeviceProperties(index), f"cudaGetDeviceProperties({index})")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


def versions() -> dict[str, int]:
    """The CUDA runtime and driver versions (e.g. 12080 for 12.8)."""
    cudart = runtime()
    return {"runtime": int(call(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
            "driver": int(call(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion"))}


class Stream:
    """One CUDA stream (``handle`` is what ``execute_async_v3`` takes)."""

    def __init__(self) -> None:
        self._stream = call(runtime().cudaStreamCreate(), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    @property
    def raw(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        call(runtime().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            call(runtime().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None


class DeviceBuffer:
    """``nbytes`` of device memory (at least one byte, as cudaMalloc wants)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(call(runtime().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        cudart = runtime()
        call(cudart.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes,
                                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.raw), "host-to-device copy")

    def download(self, array: np.ndarray, stream: Stream) -> None:
        cudart = runtime()
        call(cudart.cudaMemcpyAsync(array.ctypes.data, self.ptr, array.nbytes,
                                    cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.raw), "device-to-host copy")

    def free(self) -> None:
        if self.ptr:
            call(runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class CudaGraph:
    """``execute`` captured once on ``stream`` and replayed by :meth:`launch` (TensorRT's rule: run
    the context once before capturing, so its deferred allocations are not captured)."""

    def __init__(self, stream: Stream, execute: Any) -> None:
        cudart = runtime()
        execute()  # the uncaptured warm-up run
        call(cudart.cudaStreamBeginCapture(stream.raw, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
             "cudaStreamBeginCapture")
        try:
            execute()
        finally:
            self._graph = call(cudart.cudaStreamEndCapture(stream.raw), "cudaStreamEndCapture")
        self._exec = call(cudart.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")

    def launch(self, stream: Stream) -> None:
        call(runtime().cudaGraphLaunch(self._exec, stream.raw), "cudaGraphLaunch")

    def close(self) -> None:
        cudart = runtime()
        if self._exec is not None:
            call(cudart.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            self._exec = None
        if self._graph is not None:
            call(cudart.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None
