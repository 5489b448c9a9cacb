"""A stand-in for the ``tensorrt`` module and for :mod:`enginekit.runtimes.tensorrt_cuda`, for
machines without TensorRT or a GPU.

It records every builder call (so a test can assert the sequence the backend makes: the
STRONGLY_TYPED flag, the profiles, the timing cache), and its "engine" runs the parsed ONNX
on ONNX Runtime's CPU provider through host memory that plays the device's, so the glue
around TensorRT (compile -> manifest -> identity check -> deserialize -> runner -> task) runs
end to end. It proves structure, not TensorRT: the GPU tests do that.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import types
from typing import Any

import numpy as np

CALLS: list[tuple] = []
_MEMORY: dict[int, bytearray] = {}
_NEXT = itertools.count(0x1000, 0x1000)


def make_module(version: str = "10.13.0.35") -> types.ModuleType:
    """A fresh fake ``tensorrt`` module (importlib finds it: it has a spec)."""
    CALLS.clear()
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    class ILogger:
        def __init__(self) -> None:
            pass

    class IOutputAllocator:
        def __init__(self) -> None:
            pass

    trt.Logger, trt.ILogger, trt.IOutputAllocator = Logger, ILogger, IOutputAllocator
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(VERSION_COMPATIBLE="VERSION_COMPATIBLE",
                                            EXCLUDE_LEAN_RUNTIME="EXCLUDE_LEAN_RUNTIME")
    trt.nptype = lambda dtype: np.dtype(dtype).type
    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.parser_errors: list[str] = []  # type: ignore[misc]  # what the next parse reports
    return trt


class _Cache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+timings"


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        CALLS.append(("profile.set_shape", name, tuple(lo), tuple(opt), tuple(hi)))
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _Config:
    def __init__(self) -> None:
        self.cache: Any = None
        self.builder_optimization_level = 3

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "builder_optimization_level":
            CALLS.append(("config.builder_optimization_level", value))
        object.__setattr__(self, name, value)

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        CALLS.append(("config.set_memory_pool_limit", pool, size))

    def set_flag(self, flag: Any) -> None:
        CALLS.append(("config.set_flag", flag))

    def create_timing_cache(self, data: bytes) -> _Cache:
        CALLS.append(("config.create_timing_cache", bytes(data)))
        return _Cache(bytes(data))

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        CALLS.append(("config.set_timing_cache", ignore_mismatch))
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache:
        return self.cache

    def add_optimization_profile(self, profile: _Profile) -> int:
        CALLS.append(("config.add_optimization_profile", dict(profile.shapes)))
        return 0


class _Network:
    def __init__(self) -> None:
        self.onnx: str | None = None


class Builder:
    def __init__(self, logger: Any) -> None:
        CALLS.append(("Builder",))

    def create_network(self, flags: int) -> _Network:
        CALLS.append(("create_network", flags))
        return _Network()

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes:
        CALLS.append(("build_serialized_network",))
        return b"FAKEPLAN:" + str(network.onnx).encode()


class _Error:
    def __init__(self, text: str) -> None:
        self.text = text

    def desc(self) -> str:
        return self.text

    def node_name(self) -> str:
        return "/blocks.0/attn/MatMul"

    def node_operator(self) -> str:
        return "MatMul"


class OnnxParser:
    def __init__(self, network: _Network, logger: Any) -> None:
        import tensorrt

        self._network = network
        self._errors = [_Error(t) for t in tensorrt.parser_errors]

    def parse_from_file(self, path: str) -> bool:
        CALLS.append(("parse_from_file", path))
        self._network.onnx = path
        return not self._errors

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> _Error:
        return self._errors[index]


class Runtime:
    def __init__(self, logger: Any) -> None:
        self.engine_host_code_allowed = True  # the fake starts permissive: the backend must turn it off

    def deserialize_cuda_engine(self, plan: bytes) -> _Engine:
        CALLS.append(("deserialize_cuda_engine", self.engine_host_code_allowed))
        return _Engine(plan.split(b":", 1)[1].decode())


class _Engine:
    """Runs the ONNX the plan was "built" from on ONNX Runtime CPU."""

    def __init__(self, onnx_path: str) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def create_execution_context(self) -> _Context:
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.results: dict[str, np.ndarray] | None = None
        self.executions = 0

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        CALLS.append(("set_optimization_profile_async", index))
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        self.shapes[name] = tuple(shape)
        self.results = None
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def _compute(self) -> dict[str, np.ndarray]:
        if self.results is None:
            feeds = {}
            for arg in self.engine.session.get_inputs():
                shape = self.shapes[arg.name]
                raw = _MEMORY[self.addresses[arg.name]][: int(np.prod(shape)) * 4]
                feeds[arg.name] = np.frombuffer(bytes(raw), np.float32).reshape(shape)
            names = [o.name for o in self.engine.session.get_outputs()]
            self.results = dict(zip(names, self.engine.session.run(names, feeds)))
        return self.results

    def get_tensor_shape(self, name: str) -> tuple:
        return self.shapes[name] if name in self.shapes else self._compute()[name].shape

    def execute_async_v3(self, stream: int) -> bool:
        self.executions += 1
        CALLS.append(("execute_async_v3",))
        self.results = None
        for name, value in self._compute().items():
            data = np.ascontiguousarray(value).tobytes()
            _MEMORY[self.addresses[name]][: len(data)] = data
        return True


class FakeCuda:
    """Stands in for :mod:`enginekit.runtimes.tensorrt_cuda`: host memory plays the device's."""

    def __init__(self, name: str = "NVIDIA H100 80GB HBM3", capability: str = "9.0") -> None:
        self.properties = (name, capability)
        self.graphs = 0
        self.launches = 0
        fake = self

        class Stream:
            handle = 7

            def synchronize(self) -> None:
                pass

            def close(self) -> None:
                pass

        class DeviceBuffer:
            def __init__(self, nbytes: int) -> None:
                self.nbytes = max(int(nbytes), 1)
                self.ptr = next(_NEXT)
                _MEMORY[self.ptr] = bytearray(self.nbytes)

            def upload(self, array: np.ndarray, stream: Any) -> None:
                _MEMORY[self.ptr][: array.nbytes] = array.tobytes()

            def download(self, array: np.ndarray, stream: Any) -> None:
                array[...] = np.frombuffer(bytes(_MEMORY[self.ptr][: array.nbytes]), array.dtype).reshape(array.shape)

            def free(self) -> None:
                _MEMORY.pop(self.ptr, None)

        class CudaGraph:
            def __init__(self, stream: Any, execute: Any) -> None:
                fake.graphs += 1
                execute()  # the warm-up run; the capture itself runs nothing
                self._execute = execute

            def launch(self, stream: Any) -> None:
                fake.launches += 1
                self._execute()

            def close(self) -> None:
                pass

        self.Stream, self.DeviceBuffer, self.CudaGraph = Stream, DeviceBuffer, CudaGraph

    def set_device(self, index: int) -> None:
        CALLS.append(("cudaSetDevice", index))

    def device_properties(self, index: int) -> tuple[str, str]:
        return self.properties
