"""OpenVINO backend.

``compile`` converts each ONNX component to OpenVINO IR (``model.xml`` +
``model.bin``) with ``ov.convert_model`` and ``ov.save_model``. Weights keep
their precision unless ``extra={"precision": "fp16"}`` is asked for:
``save_model`` compresses to fp16 by default, and an fp32 source must stay fp32
(usability over speed, as in diffusers).

``load`` compiles the IR for a device with OpenVINO's model cache turned on, so
a second load of the same artifact skips the device compilation. The cache
lives in ``$ENGINEKIT_CACHE_DIR/openvino/<digest16>`` (default
``~/.cache/enginekit/openvino/<digest16>``), keyed by the manifest digest;
when it cannot be created the load runs uncached (``runner.cache_dir is None``).

``compile`` also takes an OpenVINO artifact (NNCF's quantized IR, say) and
rewrites it: ``extra={"static_batch": N}`` fixes the batch axis, which lets the
CPU plugin pick static-shape kernels (markedly faster at batch 1 for int8), and
``extra={"inference_precision": ...}`` sets the run-time precision.

``load`` also runs a plain exported ONNX artifact: OpenVINO reads ONNX itself,
so an edge box with only OpenVINO installed needs no compile step (the graph is
converted in memory at each load, then served from the model cache).

``extra={"num_streams": N}`` sets how many inference streams the CPU plugin
runs (benchmark_app's ``-nstreams``; 0 lets the performance hint decide).
Device ``AUTO`` is OpenVINO's AUTO plugin: it picks the device itself.

Run-time precision is recorded at compile time as ``inference_precision_hint``
and applied on every device: ``f32`` for float32 engines (CPUs with AMX or
AVX512-BF16 would otherwise run bf16 without saying so), ``default`` (the
device's choice) for fp16 ones and, per component, for weight-compressed
(MatMulNBits) ones; ``extra={"inference_precision": ...}`` overrides it.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from enginekit.artifact import make_component
from enginekit.errors import BackendError, DeviceError, one_line
from enginekit.manifest import Manifest, TensorSpec
from enginekit.memory import ReleasingFilePages
from enginekit.outputs import stream_failure_note
from enginekit.runtimes.base import Backend, BackendOptions, CompileOptions, Runner
from enginekit.runtimes.openvino_cache import CACHE_MAX_ENV, DEFAULT_CACHE_MAX_GB, cache_dir_for, prune_cache
from enginekit.runtimes.openvino_cache import low_memory_config as _low_memory_config
from enginekit.runtimes.openvino_cache import make_cache_dir as _make_cache_dir
from enginekit.runtimes.openvino_convert import convert_onnx
from enginekit.runtimes.openvino_shapes import parse_dims as _parse_dims
from enginekit.runtimes.openvino_shapes import specs as _specs
from enginekit.runtimes.openvino_shapes import static_shapes as _static_shapes

__all__ = ["CACHE_MAX_ENV", "DEFAULT_CACHE_MAX_GB", "OpenVINOBackend", "OpenVINOOptions", "OpenVINORunner",
           "cache_dir_for", "prune_cache"]

#: Device kinds we know how to name, best first for ``device='auto'``. NPU
#: comes last: it needs static shapes, and our artifacts keep a dynamic batch.
_KINDS = ("gpu", "cpu", "npu")
_PRECISIONS = ("fp32", "fp16")
_INFERENCE_PRECISIONS = ("f32", "f16", "bf16", "default")
_PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


@dataclass(frozen=True)
class OpenVINOOptions(BackendOptions):
    """What ``compile --backend openvino`` takes.

    ``precision="fp16"`` compresses the weights of every component except those
    named in ``keep_fp32`` (a pipeline's VAE that overflows in fp16).
    ``static_batch`` fixes the first axis of every input; ``dims`` binds symbolic
    dimensions to sizes, per component (``{"unet": {"batch": 2, "latent_height":
    64, "latent_width": 64}}``) or for all (key ``"*"``): static shapes let the
    CPU plugin pick faster kernels. ``inference_precision`` overrides the
    run-time precision recorded for the engine.
    """

    precision: str = field(default="fp32", metadata={"choices": _PRECISIONS})
    keep_fp32: tuple[str, ...] = ()
    performance_hint: str = field(default="LATENCY", metadata={"choices": _PERFORMANCE_HINTS})
    static_batch: int = 0
    dims: Mapping[str, Any] = field(default_factory=dict)
    inference_precision: str | None = field(default=None, metadata={"choices": _INFERENCE_PRECISIONS})
    #: Inference streams (0: the performance hint decides).
    num_streams: int = 0
    #: Run-time precision per component, over ``inference_precision`` (a pipeline's fp16
    #: denoiser beside a VAE that computes in f32 even where the CPU would pick bf16).
    component_inference_precision: Mapping[str, Any] = field(default_factory=dict)


class OpenVINORunner(Runner):
    """One compiled model and one reused infer request.

    Calls are serialized by a lock: an infer request runs one inference at a
    time, and a second thread should wait rather than meet "request is busy".

    A failed inference can leave the compiled model unusable even at shapes that
    worked before (the CPU plugin keeps the shapes of the failed call half
    applied), so after a failure the model is compiled again (``rebuild``, from
    the model cache where there is one) and the next call runs on a fresh one.
    Runs go through ``start_async``/``wait`` so that :meth:`interrupt` can cancel
    one in flight.
    """

    backend = "openvino"

    def __init__(
        self,
        compiled: Any,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        device: str,
        cache_dir: Path | None,
        loaded_from_cache: bool | None,
        rebuild: Callable[[], Any] | None = None,
        mapped: Sequence[Path] = (),
    ) -> None:
        super().__init__(inputs, outputs)
        self._rebuild = rebuild
        #: Files whose mapped pages the first inference gives back (see :meth:`_run`).
        self._mapped = list(mapped)
        self._lock = threading.Lock()
        self._use(compiled)
        self.device = device
        #: The model-cache folder used at load, or None when loading uncached.
        self.cache_dir = cache_dir
        #: Whether OpenVINO read the compiled blob from the cache (None: unknown).
        self.loaded_from_cache = loaded_from_cache

    def _use(self, compiled: Any) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._ports = [compiled.output(o.name) for o in self.outputs]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # The CPU plugin repacks compressed weights into its own memory on the first inference and
        # then never reads the mapped blob again: its pages are given back as the repack goes (one
        # FLUX.1-sized transformer otherwise holds the weights twice). A later read maps them again.
        mapped, self._mapped = self._mapped, []
        with self._lock, ReleasingFilePages(mapped):
            self._request.start_async(feeds)
            if self._interrupted:  # interrupt() came before the request started: cancel it now
                self._request.cancel()
            self._request.wait()
            # The request reuses its output buffers: copy before the next call overwrites them.
            return {o.name: np.array(self._request.get_tensor(port).data, copy=True)
                    for o, port in zip(self.outputs, self._ports)}

    def _recover(self) -> None:
        if self._rebuild is None:
            raise BackendError("this runner cannot compile its model again")
        with self._lock:
            self._request = None  # release the failed model before compiling its replacement
            self._compiled = None
            self._use(self._rebuild())

    def _interrupt(self) -> bool:
        request = self._request
        if request is None:
            return False
        request.cancel()
        return True

    def _describe(self, exc: BaseException) -> str:
        return one_line(exc)

    def _close(self) -> None:
        self._request = None
        self._ports = []
        self._compiled = None
        self._rebuild = None


class OpenVINOBackend(Backend):
    name: ClassVar[str] = "openvino"
    extra: ClassVar[str] = "openvino"
    kind: ClassVar[str] = "openvino"
    loads: ClassVar[tuple[str, ...]] = ("openvino", "onnx")
    compiles: ClassVar[tuple[str, ...]] = ("onnx", "openvino")
    Options: ClassVar[type[BackendOptions]] = OpenVINOOptions
    threads_key: ClassVar[str | None] = "inference_num_threads"
    native_auto: ClassVar[str | None] = "AUTO"
    entry_format: ClassVar[str] = "openvino-ir"
    static_shapes: ClassVar[bool] = True
    throughput_target: ClassVar[Mapping[str, Any]] = MappingProxyType({"performance_hint": "THROUGHPUT"})

    @classmethod
    def entry_companions(cls, entry: str) -> list[str]:
        """An IR's ``.xml`` reads its weights from the ``.bin`` beside it."""
        return [PurePosixPath(entry).with_suffix(".bin").as_posix()] if entry.endswith(".xml") else []

    @classmethod
    def quantized_target(cls, details: Mapping[str, Any]) -> dict[str, Any]:
        return {"backend": cls.name, "device": "cpu",
                "inference_precision_hint": details.get("inference_precision_hint", "f32"),
                "performance_hint": "LATENCY"}

    def __init__(self) -> None:
        self._core_obj: Any = None  # made on first use: nothing touches a device here

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("openvino") is not None

    @classmethod
    def version(cls) -> str | None:
        if not cls.is_available():
            return None
        try:
            return metadata.version("openvino")
        except metadata.PackageNotFoundError:
            import openvino

            return str(openvino.__version__)

    def _core(self) -> Any:
        if self._core_obj is None:
            import openvino as ov

            try:
                self._core_obj = ov.Core()
            except Exception as exc:
                raise BackendError(f"openvino could not start: {one_line(exc)}") from exc
        return self._core_obj

    def _available(self) -> list[str]:
        try:
            return [str(d) for d in self._core().available_devices]
        except Exception as exc:
            raise BackendError(f"openvino could not list devices: {one_line(exc)}") from exc

    def devices(self) -> list[str]:
        found = [d.lower() for d in self._available()]
        known = [d for d in found if d.split(".")[0] in _KINDS]
        return sorted(known, key=lambda d: _KINDS.index(d.split(".")[0]))

    def _device(self, device: str, check_present: bool = True) -> str:
        """Map ``cpu`` / ``gpu`` / ``gpu.1`` to OpenVINO's ``CPU`` / ``GPU`` / ``GPU.1``;
        ``AUTO`` is OpenVINO's AUTO plugin (it picks among the devices present)."""
        if device.upper() == "AUTO":
            if check_present and not self._available():
                raise DeviceError("openvino: AUTO found no device on this machine")
            return "AUTO"
        kind, _, index = device.lower().partition(".")
        if kind not in _KINDS or (index and not (kind == "gpu" and index.isdigit())):
            raise DeviceError(
                f"openvino: unknown device {device!r}; use one of: {', '.join(_KINDS)} (or gpu.N for a GPU by index)"
            )
        ov_name = kind.upper() + (f".{index}" if index else "")
        if check_present:
            available = self._available()
            # "GPU" addresses GPU.0, and "GPU.0" works when only "GPU" is listed.
            present = ov_name in available or any(
                a.split(".")[0] == kind.upper() and (not index or index == "0") for a in available
            )
            if not present:
                have = ", ".join(d.lower() for d in available) or "none"
                raise DeviceError(f"openvino: device {device!r} is not available here (available: {have})")
        return ov_name

    def check_device(self, device: str) -> None:
        self._device(device)  # present here: an engine "for gpu" from a box without one is refused

    def compile(self, artifact: Path, manifest: Manifest, out_dir: Path, options: CompileOptions) -> Manifest:
        import openvino as ov

        opts = OpenVINOOptions.parse(self.name, options.extra)
        hint = opts.performance_hint
        # IR is device-independent: the device is checked by name only, so a
        # build box without a GPU can prepare a GPU engine.
        self._device(options.device, check_present=False)
        static_batch = opts.static_batch
        if opts.num_streams < 0:
            raise BackendError(f"openvino: num_streams must be a positive number of streams, got {opts.num_streams}")
        if static_batch < 0:
            raise BackendError(f"openvino: static_batch must be a positive batch size, got {static_batch}")
        unknown = sorted(set(opts.keep_fp32) - set(manifest.components))
        if unknown:
            raise BackendError(f"openvino: keep_fp32 names {unknown[0]!r}, which this artifact does not have "
                               f"(it has: {', '.join(manifest.components)})")
        dims = _parse_dims(opts.dims, manifest)
        per_component = dict(opts.component_inference_precision)
        for name, value in per_component.items():
            if name not in manifest.components:
                raise BackendError(f"openvino: component_inference_precision names {name!r}, which this artifact "
                                   f"does not have (it has: {', '.join(manifest.components)})")
            if value not in _INFERENCE_PRECISIONS:
                raise BackendError(f"openvino: component_inference_precision[{name!r}] must be one of "
                                   f"{', '.join(_INFERENCE_PRECISIONS)}, got {value!r}")
        components = {}
        for comp in manifest.components.values():
            # bf16 weights: the converter folds their casts into f32 constants, twice the bytes; every
            # bf16 value within fp16's range is exact in fp16, so the IR keeps them at half size.
            compress = (opts.precision == "fp16" and comp.name not in opts.keep_fp32) or comp.precision == "bf16"
            rel_dir = Path(comp.entry).parent
            (out_dir / rel_dir).mkdir(parents=True, exist_ok=True)
            entry = str(rel_dir / "model.xml")
            # The converter copies each compressed weight out of the mapped ONNX data into its own
            # constant and never reads that page again: giving the mapped pages back as it goes keeps
            # the peak near one copy of the weights (FLUX.1's transformer otherwise holds two).
            try:
                with ReleasingFilePages([artifact / rel_dir, out_dir / rel_dir]):
                    if comp.entry.endswith(".xml"):  # IR in, IR out: reshape and retarget
                        model = self._core().read_model(str(artifact / comp.entry))
                    else:
                        model = convert_onnx(self._core(), artifact / comp.entry)
                    bound = {**dims.get("*", {}), **dims.get(comp.name, {})}
                    if static_batch or bound:
                        model.reshape(_static_shapes(model, comp, static_batch, bound))
                    ov.save_model(model, str(out_dir / entry), compress_to_fp16=compress)
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"openvino could not convert {comp.entry}: {one_line(exc)}"
                                   f"{stream_failure_note(exc, out_dir)}") from exc
            comp_precision = "fp16" if compress and comp.precision == "fp32" else comp.precision
            components[comp.name] = make_component(
                out_dir,
                comp.name,
                entry,
                [entry, str(rel_dir / "model.bin")],
                _specs(model.inputs, comp.inputs),
                _specs(model.outputs, comp.outputs),
                comp_precision,
                quantization=comp.quantization,
                fidelity=comp.fidelity if not (static_batch or bound or compress) else {},
            )
            del model
        if opts.inference_precision is None and manifest.kind != self.kind:
            # Weight-compressed components (MatMulNBits int8/int4) run in the device's own precision,
            # as OpenVINO runs NNCF's compressed models (bf16 on AMX): at f32 the CPU plugin unpacks the
            # weights to f32 (FLUX.1-schnell int4: 14.3 GiB anonymous, 36 s a call at 512x512, against
            # 11.3 GiB and 23 s) while the weights' own error dwarfs bf16's.
            for comp in components.values():
                form = str((comp.quantization or {}).get("form", ""))
                if form.startswith("MatMulNBits") and comp.name not in per_component:
                    per_component[comp.name] = "default"
        precisions = {c.precision for c in components.values()}
        # Float engines stay float32 at run time unless a half precision was
        # asked for: CPUs with AMX/AVX512-BF16 otherwise run bf16 silently.
        default_hint = "default" if precisions & {"fp16", "bf16"} else "f32"
        if manifest.kind == self.kind:  # recompiling an IR keeps its run-time precision unless told
            default_hint = str(manifest.target.get("inference_precision_hint", default_hint))
        inference_precision = opts.inference_precision or default_hint
        target = {
            "backend": self.name,
            "device": options.device,
            "openvino_version": self.version(),
            "openvino_build": str(ov.get_version()),
            "inference_precision_hint": inference_precision,
            "performance_hint": hint,
            "inference_num_threads": options.threads,
            "compress_to_fp16": opts.precision == "fp16",
        }
        if opts.num_streams:
            target["num_streams"] = opts.num_streams
        if opts.keep_fp32:
            target["keep_fp32"] = list(opts.keep_fp32)
        if static_batch:
            target["static_batch"] = static_batch
        if dims:
            target["dims"] = dims
        if per_component:
            target["component_inference_precision"] = per_component
        # A new run-time precision or shape makes a recorded fidelity stale.
        fidelity = manifest.fidelity
        if manifest.kind == self.kind and (static_batch or dims or inference_precision != manifest.target.get(
                "inference_precision_hint")):
            fidelity = {}
        return manifest.replace(kind=self.kind, components=components, target=target, fidelity=fidelity)

    def _config(self, manifest: Manifest, cache_dir: Path | None, component: str | None = None) -> dict[str, Any]:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        target = manifest.target if manifest.kind == self.kind else {}  # plain ONNX: the defaults
        hint = str(target.get("performance_hint", "LATENCY")).upper()
        if hint not in _PERFORMANCE_HINTS:
            raise BackendError(
                f"openvino: manifest performance_hint {hint!r} is not one of {', '.join(_PERFORMANCE_HINTS)}"
            )
        config: dict[str, Any] = {hints.performance_mode(): getattr(hints.PerformanceMode, hint)}
        floats = all(c.precision == "fp32" for c in manifest.components.values())
        precision = str(target.get("inference_precision_hint", "f32" if floats else "default"))
        precision = str((target.get("component_inference_precision") or {}).get(component, precision))
        types = {"f32": ov.Type.f32, "f16": ov.Type.f16, "bf16": ov.Type.bf16}
        if precision in types:
            config[hints.inference_precision()] = types[precision]
        elif precision != "default":
            raise BackendError(
                f"openvino: manifest inference_precision_hint {precision!r} is not one of "
                f"{', '.join(_INFERENCE_PRECISIONS)}"
            )
        threads = int(target.get("inference_num_threads") or target.get("threads") or 0)
        if threads > 0:
            config[props.inference_num_threads()] = threads
        streams = target.get("num_streams") or 0
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 0:
            raise BackendError(f"openvino: manifest num_streams {streams!r} is not a number of streams")
        if streams:
            config[props.streams.num()] = streams
        # Read the IR's .bin (and a cached blob) memory-mapped rather than copied into memory:
        # OpenVINO's default (checked on 2026.4), set so a changed default cannot quietly move a big
        # model's weights into anonymous memory. It is in every load's config, not only low-memory
        # ones, because the config is part of the model cache's key: a blob compiled by `compile`
        # must serve a `--low-memory` load (a second 6 GB blob per FLUX transformer otherwise).
        config[props.enable_mmap()] = True
        if cache_dir is not None:
            config[props.cache_dir()] = str(cache_dir)
        return config

    def warm(self, artifact: Path, manifest: Manifest, device: str) -> bool:
        if device not in self.devices():
            return False
        cached = True
        for name in manifest.components:
            runner = self.load(artifact, manifest, device, name)
            runner.close()
            cached = cached and runner.cache_dir is not None
        return cached

    def load(self, artifact: Path, manifest: Manifest, device: str, component: str | None = None) -> Runner:
        return self._load(artifact, manifest, device, component, low_memory=False)

    def load_low_memory(self, artifact: Path, manifest: Manifest, device: str, component: str | None = None) -> Runner:
        return self._load(artifact, manifest, device, component, low_memory=True)

    def load_cut(self, artifact: Path, manifest: Manifest, device: str, component: str, cut: Any,
                 low_memory: bool = False) -> Runner:
        return self._load(artifact, manifest, device, component, low_memory, cut)

    def load_patched(self, artifact: Path, manifest: Manifest, device: str, component: str,
                     tensors: Mapping[str, Any], low_memory: bool = False) -> Runner:
        from enginekit.runtimes.openvino_lora import load_patched

        return load_patched(self, artifact, manifest, device, component, tensors, low_memory)

    def _load(self, artifact: Path, manifest: Manifest, device: str, component: str | None, low_memory: bool,
              cut: Any = None) -> Runner:
        import openvino.properties as props

        if manifest.kind not in self.loads:
            raise BackendError(
                f"openvino loads only {', '.join(self.loads)} artifacts, this one is {manifest.kind!r}; "
                "compile it with the openvino backend first"
            )
        comp = manifest.component(component)
        ov_device = self._device(device)
        cache_dir = _make_cache_dir(manifest)
        # The OpenVINO plugins take the compute-precision and thread hints; AUTO passes
        # them on to the device it picks.
        config = self._config(manifest, cache_dir, comp.name)
        if low_memory:
            config.update(_low_memory_config())
        core = self._core()
        xml = artifact / comp.entry  # model.xml, or a plain artifact's model.onnx

        def compile_it() -> Any:
            # Compiling from the path (not a read_model result) lets a cache hit
            # skip parsing the IR altogether.
            model = str(xml) if cut is None else cut.apply_openvino(core.read_model(str(xml)), str(xml))
            return core.compile_model(model, ov_device, config)

        mapped = [xml.parent] + ([cache_dir] if cache_dir is not None else [])
        try:
            with ReleasingFilePages(mapped):  # the plugin's compile reads the mapped IR (or blob) once
                compiled = compile_it()
        except Exception as exc:
            raise BackendError(f"openvino could not load {xml} on {ov_device}: {one_line(exc)}") from exc
        try:
            from_cache: bool | None = bool(compiled.get_property(props.loaded_from_cache()))
        except Exception:  # not every plugin reports it
            from_cache = None
        inputs = _specs(compiled.inputs, [*comp.inputs, *comp.outputs])
        outputs = _specs(compiled.outputs, comp.outputs)
        if ov_device == "AUTO":
            try:  # what AUTO picked, e.g. "auto:cpu"
                device = "auto:" + ",".join(str(d).lower() for d in compiled.get_property("EXECUTION_DEVICES"))
            except Exception:
                device = "auto"
        runner = OpenVINORunner(compiled, inputs, outputs, device, cache_dir, from_cache, rebuild=compile_it,
                                mapped=mapped)
        runner.component = cut.key(comp.name) if cut is not None else comp.name
        return runner

