"""CLIP-style pipelines: SD 1.x/2.x (one CLIP encoder) and SDXL (two, side by side, with
the second's pooled output and the size ids), LCM-distilled UNets (guidance embedding)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from enginekit.runtimes.tasks.layouts.base import Layout, register_layout

if TYPE_CHECKING:  # pragma: no cover
    from enginekit.runtimes.tasks.text_to_image import TextToImage


@register_layout
class ClipLayout(Layout):
    """diffusers' StableDiffusion(XL)Pipeline: hidden states of every CLIP encoder side by
    side, a UNet over unpacked latents, CFG as one batched pass."""

    name = "clip"

    def encode(self, pipe: TextToImage, prompts: list[str], negatives: list[str] | None, per_prompt: int,
               two_pass: bool, max_sequence_length: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        cfg = self.config
        # SDXL: an absent negative prompt is zeros, not the embedding of "".
        zero_negative = two_pass and negatives is None and cfg.force_zeros_for_empty_prompt
        texts = list(prompts)
        if two_pass and not zero_negative:
            texts = (negatives or [""] * len(prompts)) + texts
        hidden_parts, pooled = [], None
        for enc in cfg.text_encoders:
            _, out = self.run_encoder(pipe, enc, texts, None, warn=enc is cfg.text_encoders[0])
            key = "last_hidden_state" if enc.hidden_state == "last" else "penultimate_hidden_state"
            hidden_parts.append(out[key].astype(np.float32))
            if enc.use_pooled:
                pooled = out["pooled"].astype(np.float32)
        hidden = np.concatenate(hidden_parts, axis=-1)
        if zero_negative:
            hidden = np.concatenate([np.zeros_like(hidden), hidden])
            if pooled is not None:
                pooled = np.concatenate([np.zeros_like(pooled), pooled])
        # Each prompt's rows repeated per image, keeping the [negatives; prompts] halves.
        hidden = np.repeat(hidden, per_prompt, axis=0)
        pooled = np.repeat(pooled, per_prompt, axis=0) if pooled is not None else None
        return hidden, pooled
