"""One entry point for ``enginekit export``: a classifier or a diffusion pipeline,
told apart by the source itself (or ``task=`` / ``family=`` where it cannot tell)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from enginekit.errors import ArtifactError, OptionError, SourceError
from enginekit.manifest import Manifest

__all__ = ["TASKS", "source_task", "is_pipeline_source", "export_model"]


def _tasks() -> tuple[str, ...]:
    from enginekit.registry import task_names, task_stages

    return tuple(t for t in task_names() if task_stages(t).export is not None)


#: The tasks ``export`` writes (those with an export implementation in the task registry).
TASKS = _tasks()


def is_pipeline_source(spec: str, family: str | None = None) -> bool:
    """Whether ``spec`` names a diffusion pipeline: a built-in or seeded pipeline name, a
    folder holding ``model_index.json``, a ``.safetensors`` checkpoint, or anything given a
    diffusion ``family``. (The task registry asks this to route a source.)"""
    from enginekit.export.diffusion.sources import ARCHITECTURES, BUILTINS

    path = Path(spec).expanduser()
    return (
        spec in BUILTINS
        or spec in ARCHITECTURES
        or (path.is_dir() and (path / "model_index.json").is_file())
        or (path.suffix == ".safetensors" and not path.is_dir())
        or family is not None
    )


def source_task(spec: str, family: str | None = None, task: str | None = None) -> str:
    """Which task ``spec`` exports to, as the task registry recognises it (a pipeline:
    see :func:`is_pipeline_source`; anything else is a classifier). A hub id cannot be
    told apart offline: it is a classifier unless ``task`` or ``family`` says otherwise."""
    from enginekit.export.diffusion.sources import FAMILIES
    from enginekit.registry import DEFAULT_SOURCE_TASK
    from enginekit.registry import source_task as recognise

    if task is not None and task not in TASKS:
        raise SourceError(f"unknown task {task!r}; enginekit exports: {', '.join(TASKS)}")
    if family is not None and family not in FAMILIES:
        raise SourceError(f"unknown family {family!r}; the diffusion families are {', '.join(FAMILIES)} "
                          "(classifiers need no --family)")
    found = recognise(spec, family)
    # Only a hub id can be either: timm names, the built-in model and folders tell.
    path = Path(spec).expanduser()
    ambiguous = found == DEFAULT_SOURCE_TASK and not path.exists() and not spec.startswith("timm:") \
        and spec != "default"
    if task is not None and task != found and not ambiguous:
        raise SourceError(f"{spec!r} is a {found} source, not {task}")
    return task or found


def export_model(spec: str, out_dir: str | Path, *, task: str | None = None,
                 on_step: Callable[[str], None] = lambda msg: None, **options: Any) -> Manifest:
    """Export ``spec`` to an ONNX artifact at ``out_dir``, parity-checked against PyTorch,
    with the export implementation of the task it is (see :func:`source_task`).
    ``options`` are the fields of :class:`ExportRequest` (``family``, ``random_weights``,
    ``seed``, ``loras``, ...)."""
    from enginekit.registry import stage
    from enginekit.stages import with_fields

    request = with_fields(ExportRequest, None, options)
    return stage(source_task(spec, request.family, task), "export")(spec, out_dir, request, on_step=on_step)


@dataclass(frozen=True)
class ExportRequest:
    """What ``export`` was asked, beside the source and the output."""

    family: str | None = None
    random_weights: bool = False
    weights: str | Path | None = None
    revision: str | None = None
    seed: int = 0
    opset: int = 18
    atol: float | None = None
    rtol: float | None = None
    image_check: bool = True
    loras: tuple[str, ...] = ()
    lora_scale: float = 1.0
    without_t5: bool = False
    controlnets: tuple[str, ...] = ()
    streaming: bool = False
    #: The weights, in the quantization vocabulary (fp32, fp16, bf16, int8, int4; a specific method
    #: such as int8-static for a classifier), or a :class:`~enginekit.export.compress.WeightFormat`.
    #: Pipelines: the denoiser's, with per-component overrides; classifiers: quantized after export.
    weight_format: Any = None
    component_formats: Mapping[str, Any] | None = None
    #: Classifiers (ViTs): token pairs each block merges (ToMe; 0 none), an approximation gated downstream.
    token_merge: int = 0
    #: int8/int4 options, as optimum-cli's (a WeightFormat given above carries its own).
    group_size: int = 128
    ratio: float = 1.0
    sym: bool = False
    #: The backend the weights are quantized for: classifiers, that backend's method for the name
    #: (default onnxruntime); pipelines, "openvino" compresses with NNCF into an OpenVINO IR (as
    #: optimum-cli export openvino), otherwise the ONNX pass (MatMulNBits, read by both backends).
    backend: str | None = None
    #: NNCF's data-aware int4 compression (OpenVINO), calibrated on ``dataset``.
    awq: bool = False
    scale_estimation: bool = False
    dataset: str | None = None
    overwrite: bool = False

    @property
    def mode(self) -> str | None:
        """The weight format's name, as asked."""
        fmt = self.weight_format
        return None if fmt is None else str(getattr(fmt, "mode", fmt))

    def quantize_options(self, task: str) -> Any:
        """The ``quantize`` stage's options for what was asked, checked (vocabulary, data-aware
        options, dataset) before any work."""
        from enginekit.quant.vocabulary import calibration_spec, check_data_aware, resolve
        from enginekit.stages import QuantizeOptions

        backend = self.backend or "onnxruntime"
        name = self.mode or "fp32"
        resolve(task, backend, name)
        check_data_aware(task, backend, name, awq=self.awq, scale_estimation=self.scale_estimation,
                         dataset=self.dataset)
        dataset = calibration_spec(task, None, self.dataset)
        fmt = self.weight_format
        group_size, ratio, sym = ((fmt.group_size, fmt.ratio, fmt.sym) if hasattr(fmt, "group_size")
                                  else (self.group_size, self.ratio, self.sym))
        return QuantizeOptions(method=name, backend=self.backend, dataset=dataset, group_size=group_size,
                               ratio=float(ratio), symmetric=sym, awq=self.awq or None,
                               scale_estimation=self.scale_estimation or None, overwrite=self.overwrite or None)

    def weight_pass(self) -> Any:
        """The ONNX weight pass's format (a WeightFormat), with the data-aware options refused."""
        from enginekit.export.compress import WeightFormat
        from enginekit.quant.vocabulary import check_data_aware

        check_data_aware("text-to-image", self.backend or "onnxruntime", self.mode or "fp32", awq=self.awq,
                         scale_estimation=self.scale_estimation, dataset=self.dataset)
        if self.dataset is not None:
            raise OptionError("--dataset calibrates NNCF's data-aware compression (--awq, --scale-estimation with "
                              "-b openvino); the ONNX weight pass is data-free")
        fmt = self.weight_format
        if fmt is None or isinstance(fmt, WeightFormat):
            return fmt
        return WeightFormat(str(fmt), group_size=self.group_size, ratio=self.ratio, sym=self.sym)

    def budget(self) -> dict[str, Any]:
        return {k: v for k, v in (("atol", self.atol), ("rtol", self.rtol)) if v is not None}


def export_pipeline_source(spec: str, out_dir: str | Path, request: ExportRequest, *,
                           on_step: Callable[[str], None] = lambda msg: None) -> Manifest:
    """``export`` of a diffusion pipeline (the task registry routes text-to-image sources here)."""
    from dataclasses import replace

    from enginekit.export.diffusion.lora import parse_lora
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    if request.weights is not None:
        raise SourceError("--weights is for timm classifiers; give a pipeline's .safetensors file as MODEL")
    if request.token_merge:
        raise SourceError("--token-merge applies to ViT classifiers; pipelines cache steps instead (--cache)")
    specs = tuple(parse_lora(text, request.lora_scale) for text in request.loras)
    # A backend whose engines are not ONNX (OpenVINO's IR) compresses with its own quantizer (NNCF)
    # after export; else the ONNX weight pass, which every ONNX-reading backend runs.
    nncf = request.mode not in (None, "fp32") and _quantizes_to_own_format(request.backend)
    if nncf:
        quantize = replace(request.quantize_options("text-to-image"),
                           components={k: str(getattr(v, "mode", v)) for k, v in (request.component_formats or {}).items()}
                           or None)
        if request.streaming:
            raise OptionError(f"--streaming compresses with the ONNX weight pass; -b {request.backend} quantizes "
                              "the float export afterwards (drop one)")
    options = PipelineExportOptions(opset=request.opset, seed=request.seed, image_check=request.image_check,
                                    loras=specs, without_t5=request.without_t5, streaming=request.streaming,
                                    controlnets=tuple(str(c) for c in request.controlnets),
                                    weight_format=None if nncf else request.weight_pass(),
                                    component_formats=None if nncf else request.component_formats,
                                    **request.budget())

    def export(folder: Path) -> Manifest:
        return export_pipeline(spec, folder, options, family=request.family, random_weights=request.random_weights,
                               revision=request.revision, overwrite=request.overwrite, on_step=on_step)

    if nncf:
        return _export_then_quantize(export, out_dir, quantize, on_step)
    return export(Path(out_dir))


def export_classifier_source(spec: str, out_dir: str | Path, request: ExportRequest, *,
                             on_step: Callable[[str], None] = lambda msg: None) -> Manifest:
    """``export`` of an image classifier (the task registry routes classifier sources here)."""
    from enginekit.export.vit import ExportOptions, export_classifier

    if request.loras:
        raise SourceError("--lora applies to diffusion pipelines only")
    if request.controlnets:
        raise SourceError("--controlnet applies to diffusion pipelines (SD 1.x/2.x, SDXL) only")
    if request.without_t5:
        raise SourceError("--no-t5 applies to SD3/SD3.5 pipelines only")
    if request.streaming:
        raise SourceError("--streaming applies to diffusion pipelines only")
    if request.component_formats:
        raise SourceError("--component applies to diffusion pipelines (a classifier is one component)")
    quantized = request.mode not in (None, "fp32")
    quantize = request.quantize_options("image-classification") if quantized else None
    if not quantized and (request.awq or request.scale_estimation or request.dataset):
        raise OptionError("--awq, --scale-estimation and --dataset apply to --weight-format int4 (-b openvino)")

    def export(folder: Path) -> Manifest:
        return export_classifier(spec, folder, ExportOptions(opset=request.opset, seed=request.seed,
                                                             token_merge=request.token_merge, **request.budget()),
                                 random_weights=request.random_weights, weights=request.weights,
                                 revision=request.revision, overwrite=request.overwrite, on_step=on_step)

    return export(Path(out_dir)) if quantize is None else _export_then_quantize(export, out_dir, quantize, on_step)


def _quantizes_to_own_format(backend: str | None) -> bool:
    from enginekit.registry import backend_class

    return backend is not None and backend_class(backend).entry_format != "onnx"


def _export_then_quantize(export: Callable[[Path], Manifest], out_dir: str | Path, options: Any,
                          on_step: Callable[[str], None]) -> Manifest:
    """``export`` into a scratch folder beside ``out_dir``, then the ``quantize`` stage (gated
    against that float export, as ``enginekit quantize`` is) into ``out_dir``; the scratch
    folder is removed either way."""
    from enginekit.stages import quantize

    out = Path(out_dir)
    if out.exists() and not options.overwrite:  # before minutes of export, as the quantize stage would after
        raise ArtifactError(f"{out} already exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.float-", dir=out.parent))
    try:
        export(scratch / "onnx")
        on_step(f"quantizing the weights: {options.method} ({options.backend or 'onnxruntime'})")
        return quantize(scratch / "onnx", out, options, on_step=on_step)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
