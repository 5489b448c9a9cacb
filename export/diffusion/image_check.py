"""The whole-image parity check of a pipeline export: the exported graphs, run by the
torch-free :class:`TextToImage` on ONNX Runtime, against diffusers' own pipeline on
the same prompt, initial latents, scheduler and steps. Judged by PSNR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from enginekit.fidelity import psnr
from enginekit.manifest import Manifest

__all__ = ["PROMPT", "NEGATIVE", "image_parity"]

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


def image_parity(pipe: Any, root: Path, manifest: Manifest, *, steps: int = 3, size: int | None = None,
                 seed: int = 0, guidance: float = 7.5) -> dict[str, Any]:
    """PSNR (dB) of the exported pipeline's image against diffusers' at ``size`` (default:
    the model's own), with Euler, ``steps`` steps, CFG ``guidance`` and seeded latents."""
    import diffusers
    import torch

    from enginekit.api import Components
    from enginekit.registry import get_backend
    from enginekit.runtimes.tasks.text_to_image import TextToImage

    ours = TextToImage(Components(root, manifest, get_backend("onnxruntime"), "cpu"), manifest, root)
    control: dict[str, Any] = {}  # diffusers' arguments for the control image
    ours_control: dict[str, Any] = {}
    nets = manifest.task_config.get("controlnets") or []
    if nets:  # a ControlNet pipeline: the same control image (a seeded pattern) on both sides
        from PIL import Image

        size_ = size or ours.config.default_size
        rng = np.random.default_rng(seed + 1)
        edges = Image.fromarray((rng.random((size_, size_, 3)) > 0.8).astype(np.uint8) * 255)
        ours_control = {"control_image": [edges] * len(nets) if len(nets) > 1 else edges}
        control = {"image": ours_control["control_image"]}
    if manifest.task_config.get("inpainting"):  # the whole image repainted, as the runtime runs it without an image
        # diffusers' ControlNet inpainting pipelines take the init image as image, the control as
        # control_image, and default controlnet_conditioning_scale to 0.5 (enginekit: 1.0 everywhere)
        if control:
            control = {**ours_control, "controlnet_conditioning_scale": 1.0}
        from enginekit.export.diffusion.reference import WholeImageInpaint

        pipe = pipe if isinstance(pipe, WholeImageInpaint) else WholeImageInpaint(pipe)
    size = size or ours.config.default_size
    layout = ours.layout
    latents = layout.pack(np.random.default_rng(seed).standard_normal(
        layout.unpacked_shape(1, size, size), dtype=np.float32))
    # A guidance-distilled model (FLUX) takes no negative prompt and its own reference guidance.
    negative = NEGATIVE if layout.takes_negative_prompt else None
    guidance = layout.reference_guidance if layout.reference_guidance is not None else guidance
    # Euler for both: diffusers' discrete Euler for the UNet families, flow-matching Euler for SD3.
    flow = ours.config.is_flow
    scheduler = "flow-euler" if flow else "euler"
    original = pipe.scheduler
    cls = diffusers.FlowMatchEulerDiscreteScheduler if flow else diffusers.EulerDiscreteScheduler
    pipe.scheduler = cls.from_config(original.config)
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.inference_mode():
            ref = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                       height=size, width=size, latents=torch.from_numpy(latents), output_type="np", **control).images
    finally:
        pipe.scheduler = original
    try:
        got = ours(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   height=size, width=size, latents=latents, scheduler=scheduler, output_type="np",
                   **ours_control).images
    finally:
        ours.close()
    return {"psnr_db": psnr(ref, got), "reference": "diffusers", "runtime": "onnxruntime-cpu",
            "prompt": PROMPT, "negative_prompt": negative, "scheduler": scheduler, "steps": steps,
            "guidance_scale": guidance, "height": size, "width": size, "latents": f"numpy default_rng({seed})",
            "max_abs": float(np.abs(ref.astype(np.float64) - got).max()),
            **({"control_image": "seeded random edges"} if control else {})}
