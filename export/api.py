"""One entry point for ``enginekit export``: a classifier or a diffusion pipeline,
told apart by the source itself (or ``task=`` / ``family=`` where it cannot tell)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from enginekit.errors import SourceError
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
    #: Pipelines: the denoiser's weight format (a WeightFormat or fp32/fp16/int8/int4) and per-component overrides.
    weight_format: Any = None
    component_formats: Mapping[str, Any] | None = None
    #: Classifiers (ViTs): token pairs each block merges (ToMe; 0 none), an approximation gated downstream.
    token_merge: int = 0
    overwrite: bool = False

    def budget(self) -> dict[str, Any]:
        return {k: v for k, v in (("atol", self.atol), ("rtol", self.rtol)) if v is not None}


def export_pipeline_source(spec: str, out_dir: str | Path, request: ExportRequest, *,
                           on_step: Callable[[str], None] = lambda msg: None) -> Manifest:
    """``export`` of a diffusion pipeline (the task registry routes text-to-image sources here)."""
    from enginekit.export.diffusion.lora import parse_lora
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    if request.weights is not None:
        raise SourceError("--weights is for timm classifiers; give a pipeline's .safetensors file as MODEL")
    if request.token_merge:
        raise SourceError("--token-merge applies to ViT classifiers; pipelines cache steps instead (--cache)")
    specs = tuple(parse_lora(text, request.lora_scale) for text in request.loras)
    options = PipelineExportOptions(opset=request.opset, seed=request.seed, image_check=request.image_check,
                                    loras=specs, without_t5=request.without_t5, streaming=request.streaming,
                                    controlnets=tuple(str(c) for c in request.controlnets),
                                    weight_format=request.weight_format,
                                    component_formats=request.component_formats, **request.budget())
    return export_pipeline(spec, out_dir, options, family=request.family, random_weights=request.random_weights,
                           revision=request.revision, overwrite=request.overwrite, on_step=on_step)


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
    if request.weight_format is not None or request.component_formats:
        raise SourceError("--weight-format applies to diffusion pipelines; quantize a classifier with "
                          "`enginekit quantize`")
    options = ExportOptions(opset=request.opset, seed=request.seed, token_merge=request.token_merge, **request.budget())
    return export_classifier(spec, out_dir, options,
                             random_weights=request.random_weights, weights=request.weights,
                             revision=request.revision, overwrite=request.overwrite, on_step=on_step)
