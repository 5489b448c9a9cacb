"""diffusers' PyTorch pipeline of an exported artifact's own weights: the reference that
quantization's image gate and the pipeline bench compare engines with."""

from __future__ import annotations

import inspect
import sys
from typing import Any

from enginekit.errors import SourceError
from enginekit.manifest import Manifest

__all__ = ["reference_pipeline", "WholeImageInpaint"]


def reference_pipeline(manifest: Manifest) -> Any:
    """diffusers' pipeline of the artifact's weights, from its provenance; changed local weights are an error."""
    from enginekit.export.diffusion.sources import resolve_pipeline

    prov = manifest.provenance
    spec = prov.get("source")
    if not spec:
        raise SourceError("the artifact's manifest records no source pipeline (provenance.source)")
    seeded = prov.get("kind") in ("builtin", "random")
    src = resolve_pipeline(str(spec), random_weights=prov.get("kind") == "random",
                           seed=int(prov.get("seed") or 0), family=prov.get("family") if not seeded else None,
                           revision=prov.get("revision") if prov.get("kind") == "hub" else None,
                           without_t5=bool(prov.get("without_t5")))
    recorded, now = prov.get("weights_sha256"), src.provenance.get("weights_sha256")
    if recorded and now is not None and now != recorded:
        raise SourceError(f"{spec}: the weights changed since the artifact was exported "
                          "(their sha256 differs from the manifest's); re-export it to bench against them")
    return WholeImageInpaint(src.pipeline) if manifest.task_config.get("inpainting") else src.pipeline


class WholeImageInpaint:
    """diffusers' inpainting pipeline called as text-to-image, as enginekit runs an inpainting
    model called without an image: a white mask over a blank image, whose latents are the VAE
    posterior's mean (``masked_image_latents``), at strength 1. Everything else (its modules,
    ``scheduler``, ``set_progress_bar_config``) is the pipeline's own."""

    def __init__(self, pipe: Any) -> None:
        object.__setattr__(self, "_pipe", pipe)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._pipe, name, value)

    def __call__(self, prompt: Any, *, height: int | None = None, width: int | None = None, latents: Any = None,
                 **kwargs: Any) -> Any:
        import torch
        from PIL import Image

        pipe = self._pipe
        f = pipe.vae_scale_factor
        if latents is not None:
            height, width = latents.shape[-2] * f, latents.shape[-1] * f
        height = height or pipe.unet.config.sample_size * f
        width = width or pipe.unet.config.sample_size * f
        with torch.no_grad():
            blank = torch.zeros(1, 3, height, width, dtype=pipe.vae.dtype)
            masked = pipe.vae.encode(blank).latent_dist.mean * pipe.vae.config.scaling_factor
        call = dict(image=Image.new("RGB", (width, height)), mask_image=Image.new("L", (width, height), 255),
                    height=height, width=width, latents=latents, strength=1.0, **kwargs)
        if "masked_image_latents" in inspect.signature(pipe.__call__).parameters:
            return pipe(prompt, masked_image_latents=masked, **call)
        # diffusers' ControlNet inpainting pipelines encode the masked image themselves: their draw
        # from its posterior is made the mean for this call, as the runtime's is
        module = sys.modules[type(pipe).__module__]
        drawn = module.retrieve_latents
        module.retrieve_latents = lambda output, generator=None, sample_mode="sample": output.latent_dist.mode()
        try:
            return pipe(prompt, **call)
        finally:
            module.retrieve_latents = drawn
