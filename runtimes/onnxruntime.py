"""ONNX Runtime backend.

``compile`` applies ONNX Runtime's graph optimizations offline and saves the
optimized graph, so a load on the edge box skips them; the session options used
are recorded in the manifest. ``load`` runs both the compiled kind and a plain
exported ONNX folder (no compile step needed).

Two more compile options: ``transformer_fusions=True`` runs ONNX Runtime's own
transformer optimizer (``onnxruntime.transformers.optimizer``, ``model_type="vit"``)
on a ViT classifier first, fusing LayerNorm/Gelu/attention subgraphs into its
contrib kernels, and checks the fused graph against the unfused one on seeded
inputs (a miss is a :class:`FidelityError`; the check is recorded in the target);
``static_batch=N`` fixes the symbolic batch dimension, as OpenVINO's does.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from enginekit.artifact import make_component
from enginekit.errors import BackendError, DeviceError, FidelityError, MissingPackageError, need, one_line
from enginekit.manifest import Manifest, TensorSpec
from enginekit.engine import one_line
from enginekit.runtimes.base import Backend, BackendOptions, CompileOptions, Runner

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeOptions", "OnnxRuntimeRunner", "run_onnx_file"]

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(bfloat16)": "bfloat16",
}
_QUANT_METHOD = {"fp16": "fp16", "int8": "int8-dynamic", "int4": "int4-weight"}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: The fused graph against the unfused one: max |fused - unfused| <= atol + rtol * max |unfused|.
_FUSION_ATOL, _FUSION_RTOL = 1e-4, 1e-3
_LEVELS = ("disable", "basic", "extended", "all")
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


@dataclass(frozen=True)
class OnnxRuntimeOptions(BackendOptions):
    """What ``compile --backend onnxruntime`` takes.

    ONNX Runtime runs a graph at the precision it was exported or quantized
    in: ``precision`` other than fp32 is refused with the command that makes
    such a graph, rather than writing an fp32 engine under an fp16 name.
    """

    graph_optimization_level: str = field(default="extended", metadata={"choices": _LEVELS})
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "fp16", "bf16", "int8", "int4")})
    #: ONNX Runtime's transformer optimizer (model_type "vit") before the graph optimizations.
    transformer_fusions: bool = False
    #: Fix the batch axis of every input to this size (0: keep it dynamic).
    static_batch: int = 0
    #: The execution provider with ``-d cuda``: "cuda", or "tensorrt" (ORT's TensorRT provider in
    #: front of CUDA, its engines cached per artifact); "": the device's own.
    provider: str = field(default="", metadata={"choices": ("", "cpu", "cuda", "tensorrt")})


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorSpec(name=arg.name, dtype=_ORT_DTYPES.get(arg.type, arg.type), shape=shape)


def _level(ort: Any, name: str) -> Any:
    return {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[name]


def run_onnx_file(path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX file once on the CPU, outside any artifact: for parity checks."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


class OnnxRuntimeRunner(Runner):
    """An ``InferenceSession``. A failed run leaves the session as it was, so there is
    nothing to recover; :meth:`interrupt` sets the ``terminate`` flag of the runs in flight."""

    backend = "onnxruntime"

    def __init__(self, session: Any, device: str) -> None:
        super().__init__([_spec(a) for a in session.get_inputs()], [_spec(a) for a in session.get_outputs()])
        self._session = session
        self._names = [o.name for o in self.outputs]
        self._active: set[Any] = set()  # the RunOptions of the calls in flight
        self.device = device

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4  # a failure is raised, not also printed by the executor
        self._active.add(options)
        if self._interrupted:  # interrupt() came before this call was listed
            options.terminate = True
        try:
            return dict(zip(self._names, self._session.run(self._names, feeds, options)))
        finally:
            self._active.discard(options)

    def _interrupt(self) -> bool:
        active = list(self._active)
        for options in active:
            options.terminate = True
        return bool(active)

    def _describe(self, exc: BaseException) -> str:
        # "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Concat node. ..."
        return _ORT_PREFIX.sub("", one_line(exc))

    def _close(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    extra: ClassVar[str] = "onnxruntime"
    kind: ClassVar[str] = "onnxruntime"
    loads: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")
    Options: ClassVar[type[BackendOptions]] = OnnxRuntimeOptions
    threads_key: ClassVar[str | None] = "intra_op_num_threads"
    pool_per_engine: ClassVar[bool] = True

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    @classmethod
    def version(cls) -> str | None:
        if not cls.is_available():
            return None
        import onnxruntime

        return onnxruntime.__version__

    def devices(self) -> list[str]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        return [d for d in ("cuda", "cpu") if _PROVIDERS[d] in available]

    def _session_options(self, threads: int, level: str) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = _level(ort, level)
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3  # errors only: ORT's warnings are not the user's problem
        return so

    def _providers(self, device: str, provider: str = "", cache: Path | None = None, fp16: bool = False) -> list[Any]:
        import onnxruntime as ort

        from enginekit.runtimes.onnxruntime_providers import device_kind, provider_chain

        kind, _ = device_kind(device)
        if kind not in self.devices():
            raise DeviceError(
                f"onnxruntime: device {device!r} is not available here "
                f"(providers: {', '.join(self.devices())}); install onnxruntime-gpu for CUDA"
            )
        return provider_chain(device, provider, ort.get_available_providers(), cache, fp16)

    def check_device(self, device: str) -> None:
        self._providers(device)

    def compile(self, artifact: Path, manifest: Manifest, out_dir: Path, options: CompileOptions) -> Manifest:
        import onnxruntime as ort

        opts = OnnxRuntimeOptions.parse(self.name, options.extra)
        if opts.precision != "fp32":
            raise BackendError(
                f"onnxruntime runs a graph at the precision it holds; for {opts.precision} make that graph first "
                f"(enginekit quantize ART --method {_QUANT_METHOD.get(opts.precision, 'fp16')} -o Q), then compile Q"
            )
        if opts.static_batch < 0:
            raise BackendError(f"onnxruntime: static_batch must be a positive batch size, got {opts.static_batch}")
        if opts.transformer_fusions and _fusion_model_type(manifest) is None:
            raise BackendError(f"onnxruntime: transformer fusions (model_type vit) are for ViT classifiers; this "
                               f"artifact is a {manifest.task} model of family {manifest.family!r}")
        level = opts.graph_optimization_level
        providers = self._providers(options.device, opts.provider)
        if opts.provider == "tensorrt":
            # A session with ORT's TensorRT provider cannot save the graph it compiled: the offline
            # pass runs on the CPU at "basic" (no CPU-only fused kernels), TensorRT builds at load.
            providers, level = ["CPUExecutionProvider"], "basic"
        components = {}
        fusions: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="enginekit-ort-") as scratch:
            for comp in manifest.components.values():
                so = self._session_options(options.threads, level)
                if opts.static_batch:
                    for dim in {s.shape[0] for s in comp.inputs if s.shape and isinstance(s.shape[0], str)}:
                        so.add_free_dimension_override_by_name(dim, opts.static_batch)
                rel_dir = Path(comp.entry).parent
                (out_dir / rel_dir).mkdir(parents=True, exist_ok=True)
                entry = str(rel_dir / "model.onnx")
                so.optimized_model_filepath = str(out_dir / entry)
                data_file = None
                if len(comp.files) > 1:  # the source keeps weights as external data: so must we
                    data_file = "model.onnx.data"
                    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file)
                    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
                source = artifact / comp.entry
                if opts.transformer_fusions:
                    fused = Path(scratch) / comp.name / "model.onnx"
                    fusions[comp.name] = {"model_type": "vit", "fused": _fuse_vit(source, fused, data_file is not None)}
                    source = fused
                try:
                    session = ort.InferenceSession(str(source), so, providers=providers)
                except Exception as exc:
                    raise BackendError(f"onnxruntime could not optimize {comp.entry}: {exc}") from exc
                if opts.transformer_fusions:
                    fusions[comp.name]["check"] = _check_fused(artifact / comp.entry, session, comp, providers)
                files = [entry] + ([str(rel_dir / data_file)] if data_file else [])
                components[comp.name] = make_component(
                    out_dir,
                    comp.name,
                    entry,
                    files,
                    [_spec(a) for a in session.get_inputs()],
                    [_spec(a) for a in session.get_outputs()],
                    comp.precision,
                    quantization=comp.quantization,
                    fidelity=comp.fidelity,
                )
                del session
        target = {
            "backend": self.name,
            "device": options.device,
            "providers": [p if isinstance(p, str) else p[0] for p in self._providers(options.device, opts.provider)],
            "provider": opts.provider or options.device.split(":")[0].lower().replace("gpu", "cuda"),
            "graph_optimization_level": level,
            "intra_op_num_threads": options.threads,
            "onnxruntime_version": ort.__version__,
        }
        if opts.static_batch:
            target["static_batch"] = opts.static_batch
        if fusions:
            target["transformer_fusions"] = fusions if len(fusions) > 1 else next(iter(fusions.values()))
        return manifest.replace(kind=self.kind, components=components, target=target)

    def load(self, artifact: Path, manifest: Manifest, device: str, component: str | None = None) -> Runner:
        return self._load(artifact, manifest, device, component, low_memory=False)

    def load_low_memory(self, artifact: Path, manifest: Manifest, device: str, component: str | None = None) -> Runner:
        return self._load(artifact, manifest, device, component, low_memory=True)

    def load_cut(self, artifact: Path, manifest: Manifest, device: str, component: str, cut: Any,
                 low_memory: bool = False) -> Runner:
        entry = artifact / manifest.component(component).entry
        try:
            model = cut.apply_onnx(entry).SerializeToString()
        except (BackendError, MissingPackageError):
            raise
        except Exception as exc:
            raise BackendError(f"onnxruntime could not cut {entry} ({cut.label}): {one_line(exc)}") from exc
        return self._load(artifact, manifest, device, component, low_memory, model=model, label=cut.key(component),
                          folder=entry.parent)

    def load_patched(self, artifact: Path, manifest: Manifest, device: str, component: str,
                     tensors: Mapping[str, Any], low_memory: bool = False) -> Runner:
        """A second session of ``component`` with the initializers ``tensors`` replaced: the graph
        re-read with those tensors inline (the others stay in its external data file). Not
        ``SessionOptions.add_initializer``: at level "all" the NCHWc layout pass keeps the graph's
        own Conv weights and ignores the override (onnxruntime 1.32)."""
        onnx = need("onnx", "Run-time LoRA on an ONNX Runtime engine", "onnx")
        from onnx import numpy_helper

        entry = artifact / manifest.component(component).entry
        model = onnx.load(str(entry), load_external_data=False)
        for init in model.graph.initializer:
            if init.name in tensors:
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(tensors[init.name]), init.name))
        try:
            data = model.SerializeToString()
        except ValueError as exc:  # protobuf's 2 GB
            raise BackendError(f"{entry}: the LoRA-patched weights of {component} are over protobuf's 2 GB "
                               f"({one_line(exc)}); fuse these LoRAs at export instead (export --lora)") from exc
        del model
        return self._load(artifact, manifest, device, component, low_memory, model=data, folder=entry.parent)

    def _load(self, artifact: Path, manifest: Manifest, device: str, component: str | None, low_memory: bool,
              model: bytes | None = None, label: str | None = None, folder: Path | None = None) -> Runner:
        import onnxruntime as ort

        comp = manifest.component(component)
        provider = str(manifest.target.get("provider") or "") if manifest.kind == self.kind else ""
        if provider == "cpu" or (provider == "cuda" and device.lower().startswith("cpu")):
            provider = ""  # an engine optimized for one device runs on another: the device decides
        cache = None
        if provider == "tensorrt":
            from enginekit.runtimes.onnxruntime_providers import trt_cache_dir

            cache = trt_cache_dir(manifest.digest())
            cache.mkdir(parents=True, exist_ok=True)
        providers = self._providers(device, provider, cache, fp16=comp.precision == "fp16")
        threads = int(manifest.target.get("intra_op_num_threads", 0) or 0)
        # Re-running the optimizers on an offline-optimized graph is cheap and
        # lets "all"-level layout passes pick this machine's kernels.
        so = self._session_options(threads, "all")
        if low_memory:
            _low_memory_options(so)
        if folder is not None:  # a graph given as bytes reads its external data from here
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        try:
            session = ort.InferenceSession(model if model is not None else str(artifact / comp.entry), so,
                                           providers=providers)
        except Exception as exc:
            raise BackendError(f"onnxruntime could not load {artifact / comp.entry}: {exc}") from exc
        runner = OnnxRuntimeRunner(session, device)
        runner.component = label or comp.name
        return runner


def _low_memory_options(so: Any) -> None:
    """Session settings for the least resident memory (``load(..., low_memory=True)``), chosen by
    measuring each stage's peak RSS of a 180 M-parameter FLUX-shaped pipeline at 512x512
    (``benchmarks/low_memory_rss.py``; a session per step, released after it):

    - ``enable_mem_pattern = False``: without it ONNX Runtime plans one block for every
      intermediate of a run, sized at the largest shapes seen, beside the tensors the run
      makes; off, the denoising step peaked at 0.88 GiB instead of 1.25 GiB. The same numbers.

    Measured and left as they are:

    - ``enable_cpu_mem_arena`` stays on: off, the text-encoding step peaked 0.22 GiB higher
      (0.77 against 0.55 GiB; glibc keeps the freed pieces of a session's load) for 0.05 GiB
      less while denoising.
    - ``session.use_device_allocator_for_initializers``: no change (the weights of an external
      data file are memory-mapped, not allocated).
    - ``session.disable_prepacking``: the weights then stay file-backed pages of the mapped
      ``.data`` file (0.06 instead of 0.45 GiB after loading the T5 alone) but a run touches them
      all, so the peak is the same, and the unpacked kernels give a different image.
    """
    so.enable_mem_pattern = False


def _fuse_vit(source: Path, dest: Path, external: bool) -> dict[str, int]:
    """Run ONNX Runtime's transformer optimizer (model_type vit) on ``source`` into ``dest``;
    returns the fused operators it made (count per kind, those it made only)."""
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    dest.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every fusion pass at WARNING
    try:
        # num_heads/hidden_size 0: read from the graph; opt_level 0: fusions only, ORT's
        # own graph optimizations run afterwards at the level asked for.
        model = optimize_model(str(source), model_type="vit", num_heads=0, hidden_size=0, opt_level=0)
        model.save_model_to_file(str(dest), use_external_data_format=external)
        stats = model.get_fused_operator_statistics()
    except Exception as exc:
        raise BackendError(f"onnxruntime's transformer optimizer failed on {source.name}: "
                           f"{one_line(exc)}") from exc
    finally:
        quiet.setLevel(level)
    return {name: int(n) for name, n in stats.items() if n}


def _check_fused(source: Path, fused: Any, comp: Any, providers: list[str]) -> dict[str, Any]:
    """The fused session against the unfused graph on seeded normal inputs; a miss is a FidelityError."""
    import onnxruntime as ort

    from enginekit.fidelity import compare_outputs

    rng = np.random.default_rng(0)
    feeds = {}
    for spec in [_spec(a) for a in fused.get_inputs()]:
        if not spec.dtype.startswith("float"):
            return {"skipped": f"input {spec.name!r} is {spec.dtype}, not float"}
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in spec.shape]
        feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(source), so, providers=providers)
    names = [o.name for o in plain.get_outputs()]
    reference = dict(zip(names, plain.run(names, feeds)))
    got = dict(zip(names, fused.run(names, feeds)))
    report = compare_outputs(reference, got)
    first = names[0]
    budget = _FUSION_ATOL + _FUSION_RTOL * float(np.abs(reference[first]).max())
    report = {"reference": "the unfused graph", "inputs": "seeded normal noise",
              "samples": int(next(iter(feeds.values())).shape[0]), "budget_max_abs": budget, **report}
    if report[f"{first}_max_abs"] > budget:
        raise FidelityError(f"{comp.name}: the fused graph misses its budget against the unfused one: {first} max abs "
                            f"{report[f'{first}_max_abs']:.3g} (budget {budget:.3g}), cosine "
                            f"{report[f'{first}_cosine']:.6f}; compile without transformer fusions")
    return report


def _fusion_model_type(manifest: Manifest) -> str | None:
    """The transformer optimizer's model_type, as the artifact's task says (None: not fusable)."""
    from enginekit.registry import task_class

    return getattr(task_class(manifest.task), "fusion_model_type", lambda m: None)(manifest)
