"""Backend options for compiling a text-to-image pipeline: the family's precision exceptions
and, given a size, the static shapes of every component. Torch-free."""

from __future__ import annotations

from typing import Any, Sequence

from enginekit.errors import InputError
from enginekit.manifest import Manifest
from enginekit.runtimes.tasks.call_args import MAX_IMAGES, MAX_SIDE
from enginekit.runtimes.tasks.call_args import int_in as _int_in
from enginekit.runtimes.tasks.layouts import layout_for
from enginekit.runtimes.tasks.pipeline_config import PipelineConfig
from enginekit.runtimes.tasks.sizes import check_size, size_rule

__all__ = ["compile_options", "shape_buckets"]


def _takes(backend: str, option: str) -> bool:
    """Whether ``backend``'s typed compile options have ``option``."""
    from dataclasses import fields

    from enginekit.registry import backend_class

    return option in {f.name for f in fields(backend_class(backend).Options)}


def _shape_profiles(backend: str) -> bool:
    from enginekit.registry import backend_class

    return bool(getattr(backend_class(backend), "shape_profiles", False))


def compile_options(manifest: Manifest, backend: str, precision: str = "fp32", height: int | None = None,
                    width: int | None = None, batch: int | None = None) -> dict[str, Any]:
    """Backend options for compiling this pipeline: the family's precision exceptions
    (a VAE that overflows in fp16 stays fp32) and, given a size, static shapes.

    Static shapes fix the denoiser at the layout's rows (CFG's two passes in one call for a
    CLIP or SD3 pipeline: such an engine needs ``guidance_scale > 1``), the VAE decoder at
    ``batch``, the VAE encoder at one init image, and every prompt at the tokenizer's
    length; the text encoders keep a free batch. A backend built from shape profiles
    (TensorRT) gets the size and batch as one static bucket instead (:func:`shape_buckets`).
    """
    cfg = PipelineConfig.from_section(manifest.task_config)
    extra: dict[str, Any] = {}
    if precision != "fp32":
        extra["precision"] = precision
        if cfg.extra.get("vae_precision") == "fp32" and _takes(backend, "keep_fp32"):
            extra["keep_fp32"] = [n for n in ("vae_decoder", "vae_encoder") if n in manifest.components]
    if height is None and width is None and batch is None:
        return extra
    if _shape_profiles(backend):
        size = cfg.default_size
        extra["dim_ranges"] = shape_buckets(manifest, sizes=[(height or size, width or size)], batch=batch or 1,
                                            static=True)
        return extra
    if not _takes(backend, "dims"):
        from enginekit.registry import backend_names

        takes = [b for b in backend_names() if _takes(b, "dims") or _shape_profiles(b)]
        raise InputError(f"static shapes (--height/--width/--batch) are not an option of the {backend} backend; "
                         f"{' and '.join(takes)} take them")
    height = cfg.default_size if height is None else height
    width = cfg.default_size if width is None else width
    batch = 1 if batch is None else _int_in("batch", batch, 1, MAX_IMAGES)
    extra["dims"] = _dims_at(manifest, height, width, batch)
    return extra


def _dims_at(manifest: Manifest, height: int, width: int, batch: int) -> dict[str, dict[str, int]]:
    """Every component's symbolic dimensions at one image size and batch."""
    cfg = PipelineConfig.from_section(manifest.task_config)
    layout = layout_for(cfg)
    f = cfg.vae_scale_factor
    height, width = check_size(size_rule(cfg, max_side=MAX_SIDE), height, width)
    latent = {"latent_height": height // f, "latent_width": width // f}
    dims: dict[str, dict[str, int]] = {
        e.component: {"sequence": int(cfg.tokenizers[e.tokenizer].get("max_length", 77))} for e in cfg.text_encoders}
    dims[cfg.denoiser] = layout.static_dims(height, width, batch)
    residuals = cfg.extra.get("controlnet_residuals") or []
    for factor in sorted({int(r["factor"]) for r in residuals if int(r["factor"]) > 1}):  # a ControlNet's grids
        dims[cfg.denoiser].update({f"latent_height_{factor}": -(-(height // f) // factor),
                                   f"latent_width_{factor}": -(-(width // f) // factor)})
    for net in cfg.extra.get("controlnets") or []:
        dims[net["component"]] = {**dims[cfg.denoiser], "height": height, "width": width}
    dims["vae_decoder"] = {"batch": batch, **latent}
    if "vae_encoder" in manifest.components:
        dims["vae_encoder"] = {"batch": 1, "height": height, "width": width}
    return dims


#: The default bucket of a shape-profile backend: sizes from half to twice the model's default
#: side (256..1024 for SD 1.5's 512), up to this many images per call.
DEFAULT_MAX_BATCH = 4


def shape_buckets(manifest: Manifest, sizes: Sequence[tuple[int, int]] = (), batch: int = DEFAULT_MAX_BATCH,
                  static: bool = False) -> dict[str, list[dict[str, list[int]]]]:
    """Dimension ranges per component for a backend built from shape profiles (TensorRT): one
    profile per (height, width) in ``sizes``, static at that size and ``batch`` when ``static``;
    with no sizes, one dynamic profile from half to twice the default side (opt: the default)
    and batch 1..``batch``. Every batch-like dimension's minimum is 1 (a call without CFG runs
    one row; text encoders see one prompt)."""
    cfg = PipelineConfig.from_section(manifest.task_config)
    batch = _int_in("batch", batch, 1, MAX_IMAGES)
    side = cfg.default_size
    rule = size_rule(cfg, max_side=MAX_SIDE)
    multiple = rule.multiple
    if sizes:
        points = [(_dims_at(manifest, h, w, batch if static else 1), _dims_at(manifest, h, w, batch if static else 1),
                   _dims_at(manifest, h, w, batch)) for h, w in sizes]
    else:
        lo = max(multiple, (side // 2) // multiple * multiple)
        hi = min(rule.maximum, side * 2)
        points = [(_dims_at(manifest, lo, lo, 1), _dims_at(manifest, side, side, 1), _dims_at(manifest, hi, hi, batch))]
    out: dict[str, list[dict[str, list[int]]]] = {}
    for low, opt, high in points:
        for comp in high:
            ranges = {}
            for dim in high[comp]:
                a, b, c = low[comp][dim], opt[comp][dim], high[comp][dim]
                if dim == "batch" and not static:
                    a = 1
                if comp in {e.component for e in cfg.text_encoders} and dim != "sequence":
                    a, b, c = 1, b, max(c, 2 * batch)  # prompts and negative prompts, each a row
                ranges[dim] = [min(a, b), b, max(b, c)]
            out.setdefault(comp, []).append(ranges)
    # Text encoders take a free batch even in a static bucket: give them one.
    for enc in cfg.text_encoders:
        for ranges in out.get(enc.component, []):
            ranges.setdefault("batch", [1, 1, 2 * batch])
    return out
