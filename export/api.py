"""One entry point for ``enginekit export``: a classifier or a diffusion pipeline,
told apart by the source itself (or ``task=`` / ``family=`` where it cannot tell)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from enginekit.errors import SourceError
from enginekit.manifest import Manifest

__all__ = ["TASKS", "source_task", "export_model"]

TASKS = ("image-classification", "text-to-image")


def source_task(spec: str, family: str | None = None, task: str | None = None) -> str:
    """Which task ``spec`` exports to: ``text-to-image`` for a pipeline (a built-in or
    seeded pipeline name, a folder holding ``model_index.json``, a ``.safetensors``
    checkpoint, or anything with a diffusion ``family``), else ``image-classification``.
    A hub id cannot be told apart offline: it is a classifier unless ``task`` or
    ``family`` says otherwise."""
    from enginekit.export.diffusion.sources import ARCHITECTURES, BUILTINS, FAMILIES

    if task is not None and task not in TASKS:
        raise SourceError(f"unknown task {task!r}; enginekit exports: {', '.join(TASKS)}")
    if family is not None and family not in FAMILIES:
        raise SourceError(f"unknown family {family!r}; the diffusion families are {', '.join(FAMILIES)} "
                          "(classifiers need no --family)")
    path = Path(spec).expanduser()
    looks_pipeline = (
        spec in BUILTINS
        or spec in ARCHITECTURES
        or (path.is_dir() and (path / "model_index.json").is_file())
        or (path.suffix == ".safetensors" and not path.is_dir())
        or family is not None
    )
    found = "text-to-image" if looks_pipeline else "image-classification"
    # Only a hub id can be either: timm names, the built-in model and folders tell.
    could_be_pipeline = not path.exists() and not spec.startswith("timm:") and spec != "default"
    if task is not None and task != found and not (task == "text-to-image" and could_be_pipeline):
        raise SourceError(f"{spec!r} is a {found} source, not {task}")
    return task or found


def export_model(
    spec: str,
    out_dir: str | Path,
    *,
    family: str | None = None,
    task: str | None = None,
    random_weights: bool = False,
    weights: str | Path | None = None,
    revision: str | None = None,
    seed: int = 0,
    opset: int = 18,
    atol: float | None = None,
    rtol: float | None = None,
    image_check: bool = True,
    loras: tuple[str, ...] = (),
    lora_scale: float = 1.0,
    without_t5: bool = False,
    overwrite: bool = False,
    on_step: Callable[[str], None] = lambda msg: None,
) -> Manifest:
    """Export ``spec`` to an ONNX artifact at ``out_dir``, parity-checked against PyTorch."""
    kind = source_task(spec, family, task)
    if kind == "text-to-image":
        from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

        if weights is not None:
            raise SourceError("--weights is for timm classifiers; give a pipeline's .safetensors file as MODEL")
        from enginekit.export.diffusion.lora import parse_lora

        budget: dict[str, Any] = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
        specs = tuple(parse_lora(text, lora_scale) for text in loras)
        return export_pipeline(spec, out_dir, PipelineExportOptions(opset=opset, seed=seed, image_check=image_check,
                                                                    loras=specs, without_t5=without_t5, **budget),
                               family=family, random_weights=random_weights, revision=revision,
                               overwrite=overwrite, on_step=on_step)
    if loras:
        raise SourceError("--lora applies to diffusion pipelines only")
    if without_t5:
        raise SourceError("--no-t5 applies to SD3/SD3.5 pipelines only")
    from enginekit.export.vit import ExportOptions, export_classifier

    budget = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
    return export_classifier(spec, out_dir, ExportOptions(opset=opset, seed=seed, **budget),
                             random_weights=random_weights, weights=weights, revision=revision,
                             overwrite=overwrite, on_step=on_step)
