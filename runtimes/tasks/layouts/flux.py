"""FLUX-style pipelines (FLUX.1 dev and schnell): CLIP's pooled output and T5's tokens into
a flow transformer over packed latents, with rotary ids and distilled guidance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from enginekit.errors import InputError, ManifestError
from enginekit.runtimes.tasks.layouts.base import (Guidance, Layout, pack_latents, register_layout,
                                                   unpack_latents)

if TYPE_CHECKING:  # pragma: no cover
    from enginekit.runtimes.tasks.text_to_image import TextToImage


@register_layout
class FluxLayout(Layout):
    """diffusers' FluxPipeline: 2x2 latent patches packed into tokens, no unconditional pass
    (``guidance_scale`` is dev's embedded guidance), "true CFG" as a second pass on the negative
    prompt when ``true_cfg_scale > 1``, and a sigma ramp shifted by the image's token count."""

    name = "flux"
    packs_latents = True
    batched_cfg = False
    uses_t5 = True
    reference_guidance = 3.5
    timestep_scale = 1000.0  # the transformer takes sigma, not sigma x 1000

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        s = self.size_multiple
        return (batch, (height // s) * (width // s), self.config.latent_channels * 4)

    def pack(self, latents: np.ndarray) -> np.ndarray:
        return pack_latents(latents)

    def unpack(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        return unpack_latents(latents, height // self.size_multiple, width // self.size_multiple)

    def guidance(self, guidance_scale: float, true_cfg_scale: float, has_negative: bool) -> Guidance:
        if has_negative and true_cfg_scale <= 1.0:
            raise InputError("FLUX is guidance-distilled: a negative prompt needs true_cfg_scale above 1 "
                             "(a second pass on it); guidance_scale alone takes none")
        two_pass = has_negative and true_cfg_scale > 1.0
        return Guidance(two_pass=two_pass, scale=true_cfg_scale, embedded=guidance_scale)

    def set_timesteps(self, sched: Any, steps: int, height: int, width: int) -> float | None:
        # A 1 -> 1/n ramp, shifted by mu from the image's token count; schnell's schedule has a
        # fixed shift and takes no mu (diffusers ignores the one it is given).
        s = self.size_multiple
        mu = sched.mu_for((height // s) * (width // s)) if sched.config.use_dynamic_shifting else None
        sched.set_timesteps(steps, mu=mu, sigmas=np.linspace(1.0, 1.0 / steps, steps))
        return mu

    def prompt_length(self, max_sequence_length: int | None = None) -> int:
        return max_sequence_length or self.config.max_sequence_length

    def encode(self, pipe: TextToImage, prompts: list[str], negatives: list[str] | None, per_prompt: int,
               two_pass: bool, max_sequence_length: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        seq_len = max_sequence_length or self.config.max_sequence_length
        self.check_sequence(pipe, seq_len)
        again = two_pass and negatives is not None  # the encoders run a second time, on the negatives
        embeds, pooled = self._encode(pipe, prompts, per_prompt, seq_len, release=not again)
        if again:  # negative rows first, as CFG's
            neg_embeds, neg_pooled = self._encode(pipe, negatives, per_prompt, seq_len)
            embeds, pooled = np.concatenate([neg_embeds, embeds]), np.concatenate([neg_pooled, pooled])
        return embeds, pooled

    def _encode(self, pipe: TextToImage, prompts: list[str], per_prompt: int,
                seq_len: int, release: bool = True) -> tuple[np.ndarray, np.ndarray]:
        hidden = pooled = None
        for enc in self.config.text_encoders:
            is_t5, out = self.run_encoder(pipe, enc, prompts, seq_len, warn=True, release=release)
            if is_t5:
                hidden = out["last_hidden_state"].astype(np.float32)
            else:
                pooled = out["pooled"].astype(np.float32)
        if hidden is None or pooled is None:
            raise ManifestError("a FLUX pipeline needs a CLIP and a T5 text encoder")
        return np.repeat(hidden, per_prompt, axis=0), np.repeat(pooled, per_prompt, axis=0)

    def extra_inputs(self, pipe: TextToImage, prompt_tokens: int, height: int, width: int, rows: int,
                     guidance: float) -> dict[str, np.ndarray]:
        """The rotary ids of the text tokens (zeros) and image tokens (row, column), and the
        distilled guidance for a dev transformer."""
        s = self.size_multiple
        h, w = height // s, width // s
        img_ids = np.zeros((h, w, 3), dtype=np.float32)
        img_ids[..., 1] += np.arange(h, dtype=np.float32)[:, None]
        img_ids[..., 2] += np.arange(w, dtype=np.float32)[None, :]
        extra = {"txt_ids": np.zeros((prompt_tokens, 3), dtype=np.float32), "img_ids": img_ids.reshape(h * w, 3)}
        if "guidance" in {s.name for s in pipe.components[self.config.denoiser].inputs}:
            extra["guidance"] = np.full((rows,), guidance, dtype=np.float32)
        return extra

    def static_dims(self, height: int, width: int, batch: int) -> dict[str, int]:
        s = self.size_multiple
        return {"batch": batch, "sequence": self.prompt_length(), "image_sequence": (height // s) * (width // s)}
