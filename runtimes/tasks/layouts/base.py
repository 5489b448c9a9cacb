"""What every prompt/denoiser layout shares: the registry, the guidance plan, the denoiser's
name-driven extra inputs and the latent helpers. Torch-free."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from enginekit.errors import InputError, ManifestError

if TYPE_CHECKING:  # pragma: no cover
    from enginekit.runtimes.tasks.pipeline_config import PipelineConfig, TextEncoderSpec
    from enginekit.runtimes.tasks.text_to_image import TextToImage

__all__ = ["Layout", "Guidance", "register_layout", "get_layout", "layout_names", "layout_for",
           "pack_latents", "unpack_latents", "guidance_scale_embedding", "rescale_noise_cfg"]

_LAYOUTS: dict[str, type[Layout]] = {}


def register_layout(cls: type[Layout]) -> type[Layout]:
    """Class decorator: register a layout under its ``name`` (twice is an error)."""
    if cls.name in _LAYOUTS:
        raise ValueError(f"layout {cls.name!r} is registered twice")
    _LAYOUTS[cls.name] = cls
    return cls


def layout_names() -> tuple[str, ...]:
    return tuple(_LAYOUTS)


def get_layout(name: str) -> type[Layout]:
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise ManifestError(f"unknown pipeline layout {name!r}; this enginekit runs {', '.join(_LAYOUTS)} "
                            "(an artifact from a newer enginekit?)") from None


def layout_for(config: PipelineConfig) -> Layout:
    """The layout the manifest names (``layout``, or an older manifest's ``prompt_layout``)."""
    return get_layout(config.layout)(config)


@dataclass(frozen=True)
class Guidance:
    """How a call guides: ``two_pass`` runs the denoiser on negative and positive rows in one
    batched call and mixes them with ``scale``; ``embedded`` is the guidance a denoiser takes
    as an input (LCM's embedding, FLUX dev's distilled guidance)."""

    two_pass: bool
    scale: float
    embedded: float


class Layout:
    """One prompt/denoiser shape. Subclasses set the class flags and override what differs."""

    name: ClassVar[str] = ""
    #: Latents travel packed (FLUX: 2x2 patches per token); sides are then multiples of 2x the VAE factor.
    packs_latents: ClassVar[bool] = False
    #: CFG is one batched pass of [negative; positive] rows, steered by ``guidance_scale`` (a negative
    #: prompt is taken); False for a guidance-distilled model.
    batched_cfg: ClassVar[bool] = True
    #: The prompt holds T5 token positions: ``max_sequence_length`` applies.
    uses_t5: ClassVar[bool] = False
    #: The guidance a parity check or calibration run uses (None: the caller's CFG guidance).
    reference_guidance: ClassVar[float | None] = None
    #: The transformer takes sigma (t / 1000), not the scheduler's timestep.
    timestep_scale: ClassVar[float] = 1.0

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config

    @property
    def takes_negative_prompt(self) -> bool:
        """guidance_scale alone steers away from a negative prompt."""
        return self.batched_cfg

    # ------------------------------------------------------------------ sizes and latents

    @property
    def size_multiple(self) -> int:
        """The multiple of pixels an image side must be, as diffusers' pipeline of this shape
        checks it: twice the VAE factor when latents travel packed (one token per 2x2 patch),
        else the VAE factor and 8 (diffusers' SD and SDXL pipelines test ``% 8`` whatever the VAE)."""
        f = self.config.vae_scale_factor
        return f * 2 if self.packs_latents else math.lcm(8, f)

    def unpacked_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        f = self.config.vae_scale_factor
        return (batch, self.config.latent_channels, height // f, width // f)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The latents' shape as callers pass them (diffusers' layout for this model)."""
        return self.unpacked_shape(batch, height, width)

    def pack(self, latents: np.ndarray) -> np.ndarray:
        return latents

    def unpack(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        return latents

    # ------------------------------------------------------------------ guidance and timesteps

    def guidance(self, guidance_scale: float, true_cfg_scale: float, has_negative: bool) -> Guidance:
        """The call's guidance plan (inputs checked here: a layout refuses what it cannot use)."""
        if true_cfg_scale != 1.0:
            raise InputError("true_cfg_scale applies to FLUX pipelines only (the others take guidance_scale)")
        # LCM-distilled UNets take the guidance as an embedding and run no unconditional pass.
        two_pass = guidance_scale > 1.0 and self.config.time_cond_proj_dim is None
        return Guidance(two_pass=two_pass, scale=guidance_scale, embedded=guidance_scale)

    def set_timesteps(self, sched: Any, steps: int, height: int, width: int) -> float | None:
        """Set ``sched``'s timesteps as the pipeline does; the shift ``mu`` used, if any."""
        sched.set_timesteps(steps)
        return None

    # ------------------------------------------------------------------ prompts

    def prompt_length(self, max_sequence_length: int | None = None) -> int:
        """Tokens of the denoiser's ``encoder_hidden_states``."""
        return self.clip_length()

    def clip_length(self) -> int:
        cfg = self.config
        return min(int(cfg.tokenizers[e.tokenizer].get("max_length", 77)) for e in cfg.text_encoders
                   if cfg.tokenizers[e.tokenizer].get("kind", "clip") == "clip")

    def encode(self, pipe: TextToImage, prompts: list[str], negatives: list[str] | None, per_prompt: int,
               two_pass: bool, max_sequence_length: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt embeddings (negative rows first when ``two_pass``) and the pooled embedding."""
        raise NotImplementedError

    def run_encoder(self, pipe: TextToImage, enc: TextEncoderSpec, texts: list[str], seq_len: int | None,
                    warn: bool, release: bool = True) -> tuple[bool, dict[str, np.ndarray]]:
        """Tokenize ``texts`` for ``enc`` (T5 to ``seq_len`` tokens, CLIP to its window), warn
        about truncation (always for T5, for CLIP when ``warn``) and run the encoder. A
        low-memory pipeline then closes the encoder unless ``release`` is False (it runs again
        in this call), so one text encoder is open at a time."""
        tok = pipe.tokenizer(enc.tokenizer)
        is_t5 = tok.kind == "t5"
        encoded = tok.encode(texts, max_length=seq_len if is_t5 else None)
        dropped = max(encoded.dropped)
        if dropped and (is_t5 or warn):
            window = f"max_sequence_length of {seq_len}" if is_t5 else f"CLIP window of {tok.max_length}"
            warnings.warn(f"prompt longer than the {window} tokens: {dropped} tokens were dropped",
                          UserWarning, stacklevel=5)
        vocab = (self.config.extra.get("text_encoder_vocab_sizes") or {}).get(enc.component)
        if vocab is not None and tok.vocab_size > int(vocab):
            raise ManifestError(f"tokenizer {enc.tokenizer!r} has {tok.vocab_size} tokens but text encoder "
                                f"{enc.component!r} embeds {vocab}: they do not belong together")
        runner = pipe.components[enc.component]
        out = pipe.run_component(enc.component, {runner.inputs[0].name: encoded.input_ids})
        if release:
            pipe.release(enc.component)
        return is_t5, out

    def check_sequence(self, pipe: TextToImage, seq_len: int) -> None:
        """A static-shape denoiser takes one prompt length: refuse another before any engine runs."""
        # The denoiser's specs, not the denoiser: a low-memory pipeline opens it after the text encoders close.
        spec = next((s for s in pipe.input_specs(self.config.denoiser) if s.name == "encoder_hidden_states"), None)
        fixed = spec.shape[1] if spec is not None and len(spec.shape) > 1 else None
        want = self.prompt_length(seq_len)
        if isinstance(fixed, int) and fixed > 0 and fixed != want:
            other = want - seq_len
            raise InputError(f"this engine was compiled for max_sequence_length {fixed - other} "
                             f"({fixed} prompt tokens), not {seq_len}; recompile without static shapes or pass "
                             f"max_sequence_length={fixed - other}")

    # ------------------------------------------------------------------ the denoiser

    def denoiser_inputs(self, pipe: TextToImage, embeds: np.ndarray, pooled: np.ndarray | None, batch: int,
                        height: int, width: int, guidance: Guidance) -> dict[str, np.ndarray]:
        """The denoiser's inputs beyond sample, timestep and prompt, by the names its engine takes:
        pooled projections (SD3, FLUX), SDXL's text embeds and size ids, LCM's guidance embedding,
        and the layout's own (:meth:`extra_inputs`)."""
        cfg = self.config
        denoiser = pipe.components[cfg.denoiser]
        specs = {s.name: s for s in denoiser.inputs}
        rows = batch * (2 if guidance.two_pass else 1)
        extra: dict[str, np.ndarray] = {}
        for name in ("pooled_projections", "text_embeds"):
            if name in specs:
                if pooled is None:
                    raise ManifestError(f"the denoiser takes {name} but no text encoder gives a pooled output")
                extra[name] = pooled
        if "time_ids" in specs:
            if cfg.requires_aesthetics_score:
                pos, neg = [height, width, 0, 0, 6.0], [height, width, 0, 0, 2.5]
            else:
                pos = neg = [height, width, 0, 0, height, width]
            extra["time_ids"] = np.array([neg] * batch + [pos] * batch if guidance.two_pass else [pos] * batch,
                                         dtype=np.float32)
        if "timestep_cond" in specs:
            dim = cfg.time_cond_proj_dim or int(specs["timestep_cond"].shape[-1])
            w = np.full((rows,), guidance.embedded - 1.0, dtype=np.float32)
            extra["timestep_cond"] = guidance_scale_embedding(w, dim)
        extra.update(self.extra_inputs(pipe, embeds.shape[1], height, width, rows, guidance.embedded))
        return extra

    def extra_inputs(self, pipe: TextToImage, prompt_tokens: int, height: int, width: int, rows: int,
                     guidance: float) -> dict[str, np.ndarray]:
        """Inputs only this layout's denoiser takes (FLUX's rotary ids and guidance)."""
        return {}

    def timestep(self, t: float, rows: int) -> np.ndarray:
        return np.full((rows,), np.float32(t) / np.float32(self.timestep_scale), dtype=np.float32)

    def static_dims(self, height: int, width: int, batch: int) -> dict[str, int]:
        """The denoiser's dims for a static-shape compile at this size and batch: CFG's two
        passes in one call (such an engine needs ``guidance_scale > 1``)."""
        f = self.config.vae_scale_factor
        return {"batch": (2 if self.batched_cfg else 1) * batch, "sequence": self.prompt_length(),
                "latent_height": height // f, "latent_width": width // f}


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """diffusers' FluxPipeline._pack_latents: (N, C, H, W) -> (N, (H/2)(W/2), 4C)."""
    n, c, h, w = latents.shape
    x = latents.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(n, (h // 2) * (w // 2), c * 4))


def unpack_latents(latents: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """diffusers' FluxPipeline._unpack_latents: (N, h*w, 4C) -> (N, C, 2h, 2w)."""
    n, _, channels = latents.shape
    x = latents.reshape(n, grid_h, grid_w, channels // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(x.reshape(n, channels // 4, grid_h * 2, grid_w * 2))


def guidance_scale_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """diffusers' ``get_guidance_scale_embedding``: sinusoids of ``w * 1000`` (LCM)."""
    w = w.astype(np.float32) * 1000.0
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_text: np.ndarray, rescale: float) -> np.ndarray:
    """diffusers' ``rescale_noise_cfg`` (Lin et al. 2023, section 3.4)."""
    axes = tuple(range(1, noise_text.ndim))
    std_text = noise_text.std(axis=axes, keepdims=True)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return (rescale * rescaled + (1 - rescale) * noise_cfg).astype(np.float32)
