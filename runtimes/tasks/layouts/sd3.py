"""SD3-style pipelines (SD 3 / 3.5): CLIP-L + CLIP-G + T5 into an MMDiT transformer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from enginekit.errors import ManifestError
from enginekit.runtimes.tasks.layouts.base import Layout, register_layout

if TYPE_CHECKING:  # pragma: no cover
    from enginekit.runtimes.tasks.text_to_image import TextToImage


@register_layout
class SD3Layout(Layout):
    """diffusers' StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate states
    side by side, zero-padded to the joint width, then T5's last state (zeros without T5)
    along the sequence; the pooled outputs of both CLIP encoders side by side."""

    name = "sd3"
    uses_t5 = True

    @property
    def size_multiple(self) -> int:
        """The VAE factor times the MMDiT's patch size (diffusers' SD3 pipeline raises otherwise)."""
        return self.config.vae_scale_factor * int(self.config.extra.get("patch_size") or 2)

    def prompt_length(self, max_sequence_length: int | None = None) -> int:
        return self.clip_length() + (max_sequence_length or self.config.max_sequence_length)

    def encode(self, pipe: TextToImage, prompts: list[str], negatives: list[str] | None, per_prompt: int,
               two_pass: bool, max_sequence_length: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        cfg = self.config
        texts = ((negatives or [""] * len(prompts)) + list(prompts)) if two_pass else list(prompts)
        seq_len = max_sequence_length or cfg.max_sequence_length
        self.check_sequence(pipe, seq_len)
        joint = int(cfg.extra.get("joint_attention_dim", 0))
        clip_parts, pooled_parts, t5 = [], [], None
        for enc in cfg.text_encoders:
            is_t5, out = self.run_encoder(pipe, enc, texts, seq_len, warn=enc is cfg.text_encoders[0])
            if is_t5:
                t5 = out["last_hidden_state"].astype(np.float32)
                continue
            key = "last_hidden_state" if enc.hidden_state == "last" else "penultimate_hidden_state"
            clip_parts.append(out[key].astype(np.float32))
            pooled_parts.append(out["pooled"].astype(np.float32))
        clip = np.concatenate(clip_parts, axis=-1)
        if t5 is None:
            t5 = np.zeros((len(texts), seq_len, joint or clip.shape[-1]), dtype=np.float32)
        if clip.shape[-1] > t5.shape[-1]:
            raise ManifestError(f"the CLIP states are {clip.shape[-1]} wide, more than T5's {t5.shape[-1]}")
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        hidden = np.concatenate([clip, t5], axis=1)
        pooled = np.concatenate(pooled_parts, axis=-1)
        return np.repeat(hidden, per_prompt, axis=0), np.repeat(pooled, per_prompt, axis=0)
