"""Backend options for compiling a text-to-image pipeline: the family's precision exceptions
and, given a size, the static shapes of every component. Torch-free."""

from __future__ import annotations

from typing import Any

from enginekit.errors import InputError
from enginekit.manifest import Manifest
from enginekit.runtimes.tasks.call_args import MAX_IMAGES, MAX_SIDE
from enginekit.runtimes.tasks.call_args import int_in as _int_in
from enginekit.runtimes.tasks.layouts import layout_for
from enginekit.runtimes.tasks.pipeline_config import PipelineConfig
from enginekit.runtimes.tasks.sizes import check_size, size_rule

__all__ = ["compile_options"]


def compile_options(manifest: Manifest, backend: str, precision: str = "fp32", height: int | None = None,
                    width: int | None = None, batch: int | None = None) -> dict[str, Any]:
    """Backend options for compiling this pipeline: the family's precision exceptions
    (a VAE that overflows in fp16 stays fp32) and, given a size, static shapes.

    Static shapes fix the denoiser at the layout's rows (CFG's two passes in one call for a
    CLIP or SD3 pipeline: such an engine needs ``guidance_scale > 1``), the VAE decoder at
    ``batch``, the VAE encoder at one init image, and every prompt at the tokenizer's
    length; the text encoders keep a free batch.
    """
    cfg = PipelineConfig.from_section(manifest.task_config)
    layout = layout_for(cfg)
    extra: dict[str, Any] = {}
    if precision != "fp32":
        extra["precision"] = precision
        if backend == "openvino" and cfg.extra.get("vae_precision") == "fp32":
            extra["keep_fp32"] = [n for n in ("vae_decoder", "vae_encoder") if n in manifest.components]
    if height is None and width is None and batch is None:
        return extra
    if backend != "openvino":
        raise InputError(f"static shapes (--height/--width/--batch) are an OpenVINO option, not {backend}'s")
    height = cfg.default_size if height is None else height
    width = cfg.default_size if width is None else width
    batch = 1 if batch is None else _int_in("batch", batch, 1, MAX_IMAGES)
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
    extra["dims"] = dims
    return extra
