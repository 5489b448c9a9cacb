"""TensorRT backend: an ONNX artifact in, one serialized plan per component out.

``compile`` (``enginekit compile ONNX -b tensorrt -d cuda -o OUT``) builds each component
(a classifier's model; a pipeline's denoiser, VAE decoder and encoder, text encoders) into
``<component>/model.plan`` with :mod:`.tensorrt_build`: a strongly typed network from the
ONNX parser, the workspace limit, ``builder_optimization_level``, the timing cache persisted
per TensorRT version and GPU, and one optimization profile per shape bucket
(:mod:`.tensorrt_profiles`: ``shapes`` in trtexec's syntax, else the task's buckets).
Precision lives in the ONNX (:mod:`.tensorrt_precision`: AutoCast for fp16/bf16; int8/fp8
Q/DQ from ``quantize``).

The manifest's ``target`` records the plan's identity: TensorRT version, GPU name and compute
capability, the profiles, the precision and each source ONNX's sha256. ``load`` compares it
with this machine (:mod:`.tensorrt_plan`, without importing TensorRT) and refuses a plan built
for another TensorRT version or compute capability before deserializing it; the runner
(:mod:`.tensorrt_run`) takes numpy in and out through cuda-python, never torch.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Mapping

from enginekit.artifact import make_component
from enginekit.errors import BackendError
from enginekit.manifest import Manifest
from enginekit.runtimes.base import Backend, BackendOptions, CompileOptions, Runner
from enginekit.runtimes.tensorrt_plan import (
    INSTALL_HINT,
    PlanIdentity,
    check_plan,
    device_index,
    installed_tensorrt_version,
    local_identity,
    missing_tensorrt,
    timing_cache_path,
)
from enginekit.runtimes.tensorrt_profiles import (
    ShapeRange,
    component_profiles,
    parse_dim_ranges,
    parse_shapes,
    profiles_from_json,
    profiles_to_json,
)

__all__ = ["TensorRTBackend", "TensorRTOptions", "plan_profiles"]

_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
#: Precisions that are Q/DQ in the ONNX, made (calibrated, gated) by ``quantize`` first.
_QDQ = {"int8": "--int8", "fp8": "--fp8"}
PLAN = "model.plan"


@dataclass(frozen=True)
class TensorRTOptions(BackendOptions):
    """What ``compile --backend tensorrt`` takes (trtexec's names in brackets).

    ``shapes``: one optimization profile per entry, ``NAME:MIN/OPT/MAX`` joined by commas
    [``--minShapes/--optShapes/--maxShapes``]; ``dim_ranges``: sizes per symbolic dimension,
    ``{"*" or component: {"batch": "1/1/32"}}`` or a list of such mappings (one profile each);
    inputs neither covers get the task's buckets (a classifier's batch 1..32; a pipeline's
    sizes around its default, batch 1..4).
    """

    precision: str = field(default="fp32", metadata={"choices": _PRECISIONS})  # [--fp16, --bf16]
    #: Components kept at fp32 whatever ``precision`` says (SDXL's VAE).
    keep_fp32: tuple[str, ...] = ()
    shapes: tuple[str, ...] = ()
    dim_ranges: Mapping[str, Any] = field(default_factory=dict)
    #: A static batch (``compile --batch N``): every ``batch`` dimension fixed at N.
    static_batch: int = 0
    #: The workspace pool limit in MiB; 0: TensorRT's default [--memPoolSize=workspace:N].
    workspace_mib: int = 0
    builder_optimization_level: int = 3  # [--builderOptimizationLevel]
    #: Read and write the timing cache kept per TensorRT version and GPU [--timingCacheFile].
    timing_cache: bool = True
    #: Replay static-shape runs as CUDA graphs [--useCudaGraph].
    cuda_graphs: bool = True
    #: A plan later TensorRT versions load, with host code the runtime must allow
    #: [--versionCompatible]; never unless asked.
    version_compatible: bool = False


def _task_buckets(manifest: Manifest) -> Mapping[str, Any]:
    """The task's default dimension ranges (``shape_buckets`` of its class), {} where it has none."""
    from enginekit.registry import task_class

    hook = getattr(task_class(manifest.task), "shape_buckets", None)
    return hook(manifest) if hook is not None else {}


def _dim_profiles(value: Any, where: str) -> list[dict[str, tuple[int, int, int]]]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [parse_dim_ranges(v, where) for v in items]


def plan_profiles(manifest: Manifest, opts: TensorRTOptions) -> dict[str, list[dict[str, ShapeRange]]]:
    """Every component's optimization profiles, resolved and checked without TensorRT."""
    shapes = [parse_shapes(s) for s in opts.shapes]
    given = dict(opts.dim_ranges)
    unknown = sorted(set(given) - set(manifest.components) - {"*"})
    if unknown:
        raise BackendError(f"tensorrt: dim_ranges names {unknown[0]!r}, which this artifact does not have "
                           f"(it has: {', '.join(manifest.components)})")
    defaults = _task_buckets(manifest)
    out = {}
    for comp in manifest.components.values():
        own = given.get(comp.name, given.get("*"))
        dims = _dim_profiles(own, f"dim_ranges[{comp.name!r}]") if own is not None else []
        fallback = defaults.get(comp.name, defaults.get("*"))
        base = _dim_profiles(fallback, f"{manifest.task} buckets") if fallback is not None else []
        # What the user gave wins dimension by dimension; the task's buckets fill the rest.
        merged = [{**b, **d} for d in dims for b in (base or [{}])] if dims else base
        if opts.static_batch:
            merged = [{**m, "batch": (opts.static_batch,) * 3} for m in (merged or [{}])]
        out[comp.name] = component_profiles(comp.name, comp.inputs, shapes, merged)
    return out


def _import_trt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise missing_tensorrt() from exc
    return tensorrt


class TensorRTBackend(Backend):
    name: ClassVar[str] = "tensorrt"
    extra: ClassVar[str] = "tensorrt"
    kind: ClassVar[str] = "tensorrt"
    loads: ClassVar[tuple[str, ...]] = ("tensorrt",)
    compiles: ClassVar[tuple[str, ...]] = ("onnx",)
    Options: ClassVar[type[BackendOptions]] = TensorRTOptions
    entry_format: ClassVar[str] = "tensorrt-plan"
    #: ``compile`` takes shape ranges (profiles), so a pipeline's --height/--width/--batch are buckets.
    shape_profiles: ClassVar[bool] = True

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def quantized_target(cls, details: Mapping[str, Any]) -> dict[str, Any]:
        """A Q/DQ ONNX for TensorRT: its gate ran on ONNX Runtime CPU; ``compile -b tensorrt`` builds it."""
        return {"backend": cls.name, "device": "cuda", "precision": str(details.get("method", "qdq")),
                "gated_on": "onnxruntime cpu"}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return f"TensorRT is not installed; {INSTALL_HINT}"
        try:
            if importlib.util.find_spec("cuda.bindings") is None:
                raise ModuleNotFoundError
        except ModuleNotFoundError:
            return "cuda-python, which the runner needs, is not installed; pip install 'cuda-python>=12.6'"
        return None

    @classmethod
    def version(cls) -> str | None:
        return installed_tensorrt_version() if importlib.util.find_spec("tensorrt") is not None else None

    def devices(self) -> list[str]:
        from enginekit.hardware import fingerprint

        if not self.is_available():
            return []
        return [f"cuda:{i}" for i in range(len(fingerprint()["gpus"]))]

    def check_device(self, device: str) -> None:
        device_index(device)  # a CPU or NPU name is refused by name first
        super().check_device(device)

    def compile(self, artifact: Path, manifest: Manifest, out_dir: Path, options: CompileOptions) -> Manifest:
        from enginekit.runtimes import tensorrt_cuda as cuda
        from enginekit.runtimes.tensorrt_build import BuildSettings, build_plan, make_logger
        from enginekit.runtimes.tensorrt_precision import prepare_onnx

        opts = TensorRTOptions.parse(self.name, options.extra)
        self._check(opts, manifest)
        profiles = plan_profiles(manifest, opts)  # refused before TensorRT is even imported
        trt = _import_trt()
        index = device_index(options.device)
        cuda.set_device(index)
        gpu_name, capability = cuda.device_properties(index)
        identity = PlanIdentity(str(trt.__version__), gpu_name, capability)
        settings = BuildSettings(workspace_bytes=opts.workspace_mib * 2**20,
                                 builder_optimization_level=opts.builder_optimization_level,
                                 timing_cache=timing_cache_path(identity) if opts.timing_cache else None,
                                 version_compatible=opts.version_compatible)
        components, sources, conversions = {}, {}, {}
        for comp in manifest.components.values():
            precision = "fp32" if comp.name in opts.keep_fp32 else opts.precision
            rel = PurePosixPath(comp.entry).parent / PLAN
            (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="enginekit-trt-") as scratch:
                onnx_path, conversions[comp.name] = prepare_onnx(artifact / comp.entry, Path(scratch), precision)
                plan = build_plan(trt, onnx_path, profiles[comp.name], settings, make_logger(trt))
            (out_dir / rel).write_bytes(plan)
            sources[comp.name] = next(f.sha256 for f in comp.files if f.path == comp.entry)
            label = precision if precision in ("fp16", "bf16") else comp.precision
            components[comp.name] = make_component(out_dir, comp.name, rel.as_posix(), [rel.as_posix()], comp.inputs,
                                                   comp.outputs, label, quantization=comp.quantization)
        target = {"backend": self.name, "device": options.device, **identity.to_dict(),
                  "precision": opts.precision, "keep_fp32": list(opts.keep_fp32),
                  "profiles": {name: profiles_to_json(p) for name, p in profiles.items()},
                  "onnx_sha256": sources, "conversion": conversions, "strongly_typed": True,
                  "builder_optimization_level": opts.builder_optimization_level,
                  "workspace_mib": opts.workspace_mib, "timing_cache": opts.timing_cache,
                  "cuda_graphs": opts.cuda_graphs, "version_compatible": opts.version_compatible}
        return manifest.replace(kind=self.kind, components=components, target=target, fidelity={})

    def _check(self, opts: TensorRTOptions, manifest: Manifest) -> None:
        if opts.precision in _QDQ:
            raise BackendError(f"tensorrt: {opts.precision} is explicit Q/DQ in the ONNX, calibrated first: compile "
                               f"{_QDQ[opts.precision]} (or enginekit quantize ART --target tensorrt, then compile it)")
        unknown = sorted(set(opts.keep_fp32) - set(manifest.components))
        if unknown:
            raise BackendError(f"tensorrt: keep_fp32 names {unknown[0]!r}, which this artifact does not have "
                               f"(it has: {', '.join(manifest.components)})")
        if not 0 <= opts.builder_optimization_level <= 5:
            raise BackendError(f"tensorrt: builder_optimization_level must be 0 to 5, got "
                               f"{opts.builder_optimization_level}")
        if opts.workspace_mib < 0 or opts.static_batch < 0:
            raise BackendError("tensorrt: workspace_mib and static_batch must be positive (0: not set)")

    def load(self, artifact: Path, manifest: Manifest, device: str, component: str | None = None) -> Runner:
        from enginekit.runtimes import tensorrt_cuda as cuda
        from enginekit.runtimes.tensorrt_build import make_logger
        from enginekit.runtimes.tensorrt_run import TensorRTRunner, deserialize

        comp = manifest.component(component)
        if manifest.kind != self.kind:
            raise BackendError(f"tensorrt loads plans, this artifact is {manifest.kind!r}; "
                               f"compile it first: enginekit compile {artifact} -b tensorrt -d cuda -o OUT")
        path = artifact / comp.entry
        # Before any plan byte is read, and before TensorRT is imported: a plan from another
        # TensorRT or GPU generation is refused here, in one line naming both.
        check_plan(path, PlanIdentity.from_target(manifest.target), local_identity(device))
        profiles = profiles_from_json((manifest.target.get("profiles") or {}).get(comp.name))
        trt = _import_trt()
        cuda.set_device(device_index(device))
        logger = make_logger(trt)
        engine = deserialize(trt, path.read_bytes(), logger,
                             allow_host_code=bool(manifest.target.get("version_compatible")))
        runner = TensorRTRunner(trt, cuda, engine, comp.inputs, comp.outputs, profiles, device,
                                cuda_graphs=bool(manifest.target.get("cuda_graphs", True)))
        runner.component = comp.name
        return runner
