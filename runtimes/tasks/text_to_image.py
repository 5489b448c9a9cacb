"""The text-to-image task: a diffusers-style pipeline over loaded engines, without torch.

``TextToImage`` runs Stable Diffusion 1.x/2.x, SDXL and SD3 artifacts (their text
encoders, UNet or MMDiT transformer and VAE exported as components) with numpy, Pillow, the Rust
``tokenizers`` library and the backend. Its ``__call__`` reads as diffusers'
pipelines do, in numbered steps: check inputs → encode the prompt → prepare
timesteps → prepare latents → denoise → decode.

Seeds drive numpy's ``default_rng`` (PCG64), not torch's generator, so the same
seed gives different noise than diffusers; pass ``latents=`` (diffusers'
layout, ``(N, C, H/8, W/8)``) to compare images with diffusers exactly.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from enginekit.errors import EngineKitError, InputError, ManifestError
from enginekit.manifest import Manifest
from enginekit.runtimes.base import Runner
from enginekit.runtimes.schedulers import SCHEDULERS, make_scheduler
from enginekit.runtimes.tasks.sizes import check_size, init_image_size, size_rule
from enginekit.runtimes.tasks.tokenizers import PromptTokenizer

__all__ = ["TextToImage", "PipelineConfig", "PipelineOutput", "GenerationCancelled", "default_scheduler_name"]

log = logging.getLogger("enginekit")

#: Parameter ranges: wide enough for any real use, narrow enough that a typo cannot
#: ask for hours of work or gigabytes of latents.
MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_SIDE = 4096
#: T5 prompt tokens at most (diffusers' SD3 pipeline refuses more than 512).
MAX_SEQUENCE_LENGTH = 512

#: diffusers' scheduler classes -> our ports; a pipeline keeps its own unless told.
_PORTED = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-a",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpm++2m",
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "flow-euler",
}

Callback = Callable[[int, float, np.ndarray], Any]


class GenerationCancelled(EngineKitError):
    """A generation was stopped by its callback or its ``cancel`` event."""


def default_scheduler_name(config: Mapping[str, Any]) -> str:
    """The port of the pipeline's own scheduler, or Euler when it has none (SD 1.5 ships PNDM)."""
    name = _PORTED.get(str(config.get("_class_name", "")), "euler")
    if name == "dpm++2m" and config.get("use_karras_sigmas"):
        return "dpm++2m-karras"
    return name


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str
    tokenizer: str
    #: "last" (SD 1.x/2.x) or "penultimate" (SDXL) hidden state as the prompt embedding.
    hidden_state: str = "last"
    #: Whether this encoder's pooled output conditions the denoiser (SDXL's second encoder).
    use_pooled: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    """The ``text-to-image`` section of a manifest, checked when the pipeline opens."""

    pipeline: str
    text_encoders: tuple[TextEncoderSpec, ...]
    tokenizers: Mapping[str, Mapping[str, Any]]
    scheduler: Mapping[str, Any]
    latent_channels: int
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float | None = None
    prediction_type: str = "epsilon"
    sample_size: int = 64
    denoiser: str = "unet"
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False
    time_cond_proj_dim: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> PipelineConfig:
        where = "manifest.json section 'text-to-image'"
        required = ("pipeline", "text_encoders", "tokenizers", "scheduler", "latent_channels",
                    "vae_scale_factor", "vae_scaling_factor")
        missing = [k for k in required if k not in section]
        if missing:
            raise ManifestError(f"{where} has no {missing[0]!r} field (not a text-to-image artifact, or a damaged one)")
        try:
            encoders = tuple(
                TextEncoderSpec(component=str(e["component"]), tokenizer=str(e["tokenizer"]),
                                hidden_state=str(e.get("hidden_state", "last")), use_pooled=bool(e.get("use_pooled")))
                for e in section["text_encoders"]
            )
            proj = section.get("time_cond_proj_dim")
            shift = section.get("vae_shift_factor")
            known = {f for f in cls.__dataclass_fields__ if f not in ("text_encoders", "extra")}
            config = cls(
                pipeline=str(section["pipeline"]),
                text_encoders=encoders,
                tokenizers=dict(section["tokenizers"]),
                scheduler=dict(section["scheduler"]),
                latent_channels=int(section["latent_channels"]),
                vae_scale_factor=int(section["vae_scale_factor"]),
                vae_scaling_factor=float(section["vae_scaling_factor"]),
                vae_shift_factor=float(shift) if shift is not None else None,
                prediction_type=str(section.get("prediction_type", "epsilon")),
                sample_size=int(section.get("sample_size", 64)),
                denoiser=str(section.get("denoiser", "unet")),
                force_zeros_for_empty_prompt=bool(section.get("force_zeros_for_empty_prompt", False)),
                requires_aesthetics_score=bool(section.get("requires_aesthetics_score", False)),
                time_cond_proj_dim=int(proj) if proj is not None else None,
                extra={k: v for k, v in section.items() if k not in known and k != "text_encoders"},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where} is malformed: {exc!r}") from None
        if not encoders:
            raise ManifestError(f"{where} lists no text encoders")
        for enc in encoders:
            if enc.hidden_state not in ("last", "penultimate"):
                raise ManifestError(f"{where}: hidden_state must be 'last' or 'penultimate', got {enc.hidden_state!r}")
            if enc.tokenizer not in config.tokenizers:
                raise ManifestError(f"{where}: text encoder {enc.component!r} names tokenizer {enc.tokenizer!r}, "
                                    "which the section does not describe")
        if config.vae_scale_factor < 1 or config.latent_channels < 1:
            raise ManifestError(f"{where}: vae_scale_factor and latent_channels must be positive")
        return config

    @property
    def default_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def is_xl(self) -> bool:
        return any(e.use_pooled for e in self.text_encoders)

    @property
    def prompt_layout(self) -> str:
        """How the encoders' outputs become the denoiser's prompt: "clip" (SD 1.x/2.x/XL: hidden
        states side by side) or "sd3" (CLIP states padded to the joint width, then T5's tokens)."""
        return str(self.extra.get("prompt_layout", "clip"))

    @property
    def is_flow(self) -> bool:
        """A rectified-flow model (SD3): sampled with flow-matching Euler only."""
        return self.prediction_type == "flow"

    def prompt_length(self, max_sequence_length: int | None = None) -> int:
        """Tokens of the denoiser's ``encoder_hidden_states``: CLIP's window, plus T5's for SD3."""
        clip = min(int(self.tokenizers[e.tokenizer].get("max_length", 77)) for e in self.text_encoders
                   if self.tokenizers[e.tokenizer].get("kind", "clip") == "clip")
        if self.prompt_layout == "flux":
            return max_sequence_length or self.max_sequence_length
        if self.prompt_layout != "sd3":
            return clip
        return clip + (max_sequence_length or self.max_sequence_length)

    @property
    def max_sequence_length(self) -> int:
        return int(self.extra.get("max_sequence_length", 256))

    @property
    def default_steps(self) -> int:
        """Steps when the caller names none: the model's own (FLUX schnell 4, dev 28), else 50."""
        return int(self.extra.get("default_steps", 50))

    @property
    def default_guidance_scale(self) -> float:
        """Guidance when the caller names none: the model's own (FLUX schnell 0, dev 3.5), else 7.5."""
        return float(self.extra.get("default_guidance_scale", 7.5))


@dataclass
class PipelineOutput:
    """What a call returns: ``images`` as PIL images, an (N, H, W, 3) float array in
    [0, 1] (``output_type="np"``) or the final latents (``output_type="latent"``)."""

    images: Any
    #: Seed used for the noise (None when latents were given and nothing else was drawn).
    seed: int | None = None
    timesteps: tuple[float, ...] = ()


class TextToImage:
    """A Stable Diffusion pipeline (1.x, 2.x, XL, 3) over an artifact's components.

    Called like a diffusers pipeline::

        pipe = enginekit.load("out/sd-ov")
        out = pipe("a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=20,
                   guidance_scale=7.5, height=512, width=512, seed=42)
        out.images[0].save("lighthouse.png")

    Components load when first used: text-to-image never opens the VAE encoder.
    """

    task = "text-to-image"

    def __init__(self, components: Mapping[str, Runner], manifest: Manifest, path: Path) -> None:
        self.components = components
        self.manifest = manifest
        self.path = Path(path)
        self.config = PipelineConfig.from_section(manifest.task_config)
        needed = [e.component for e in self.config.text_encoders] + [self.config.denoiser, "vae_decoder"]
        missing = [n for n in needed if n not in manifest.components]
        if missing:
            raise ManifestError(f"{self.path}: the pipeline needs component {missing[0]!r}, which the artifact lacks "
                                f"(it has: {', '.join(manifest.components)})")
        self._tokenizers: dict[str, PromptTokenizer] = {}
        self._lock = threading.Lock()
        #: ``recorder(component, feeds)`` sees every engine call's typed feeds (quantization
        #: records the denoiser's real inputs this way); None costs one attribute check.
        self.recorder: Callable[[str, Mapping[str, np.ndarray]], None] | None = None

    @classmethod
    def from_artifact(cls, components: Mapping[str, Runner], manifest: Manifest, path: Path) -> TextToImage:
        return cls(components, manifest, path)

    @staticmethod
    def compile_options(manifest: Manifest, backend: str, precision: str = "fp32", height: int | None = None,
                        width: int | None = None, batch: int | None = None) -> dict[str, Any]:
        """Backend options for compiling this pipeline: the family's precision exceptions
        (a VAE that overflows in fp16 stays fp32) and, given a size, static shapes.

        Static shapes fix the UNet at ``2 * batch`` rows (classifier-free guidance runs
        both passes in one call: such an engine needs ``guidance_scale > 1``), the VAE
        decoder at ``batch``, the VAE encoder at one init image, and every prompt at the
        tokenizer's length; the text encoders keep a free batch.
        """
        cfg = PipelineConfig.from_section(manifest.task_config)
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
        flux = cfg.prompt_layout == "flux"
        step = f * (2 if flux else 1)
        height, width = check_size(size_rule(cfg, max_side=MAX_SIDE), height, width)
        latent = {"latent_height": height // f, "latent_width": width // f}
        dims: dict[str, dict[str, int]] = {
            e.component: {"sequence": int(cfg.tokenizers[e.tokenizer].get("max_length", 77))} for e in cfg.text_encoders}
        if flux:  # no unconditional pass; packed tokens
            dims[cfg.denoiser] = {"batch": batch, "sequence": cfg.prompt_length(),
                                  "image_sequence": (height // step) * (width // step)}
        else:
            dims[cfg.denoiser] = {"batch": 2 * batch, "sequence": cfg.prompt_length(), **latent}
        dims["vae_decoder"] = {"batch": batch, **latent}
        if "vae_encoder" in manifest.components:
            dims["vae_encoder"] = {"batch": 1, "height": height, "width": width}
        extra["dims"] = dims
        return extra

    # ------------------------------------------------------------------ helpers

    @property
    def backend(self) -> str:
        return getattr(self.components, "backend").name if hasattr(self.components, "backend") else "?"

    @property
    def device(self) -> str:
        return str(getattr(self.components, "device", "?"))

    def tokenizer(self, name: str) -> PromptTokenizer:
        if name not in self._tokenizers:
            tok = PromptTokenizer.from_config(self.path, self.config.tokenizers[name])
            self._tokenizers[name] = tok
        return self._tokenizers[name]

    def _run(self, component: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        runner = self.components[component]
        # Cast to what the engine declares (an fp16 graph may take float16; a timestep may be int64).
        typed = {}
        for spec in runner.inputs:
            value = feeds[spec.name]
            typed[spec.name] = value.astype(spec.dtype, copy=False) if spec.dtype != "bfloat16" else value
        if self.recorder is not None:
            self.recorder(component, typed)
        return runner.run(typed)

    # ------------------------------------------------------------------ the call

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        image: Any = None,
        strength: float = 0.8,
        scheduler: str | None = None,
        guidance_rescale: float = 0.0,
        output_type: str = "pil",
        callback: Callback | None = None,
        cancel: threading.Event | None = None,
        generator: np.random.Generator | None = None,
        max_sequence_length: int | None = None,
        true_cfg_scale: float = 1.0,
    ) -> PipelineOutput:
        """Generate images for ``prompt``.

        ``negative_prompt``: what to steer away from (CFG needs ``guidance_scale > 1``).
        ``latents``: initial noise in diffusers' layout (N, C, H/8, W/8; FLUX packed,
        N, H/16 * W/16, 4C), float32, before scaling by the scheduler's ``init_noise_sigma``
        (as diffusers takes them).
        ``image`` + ``strength``: image-to-image through the VAE encoder; ``latents`` is then
        the noise added to the encoded image.
        ``scheduler``: one of :data:`SCHEDULERS`; default the pipeline's own where ported
        (a flow-matching model, SD3, takes ``flow-euler`` only).
        ``num_inference_steps``, ``guidance_scale``: default the model's own where its export
        records them (FLUX schnell: 4 steps, guidance 0; dev: 28, 3.5), else 50 and 7.5.
        ``max_sequence_length``: SD3's and FLUX's T5 prompt tokens (default 256; FLUX dev 512; at most 512).
        ``true_cfg_scale``: FLUX only. Above 1, with a ``negative_prompt``, a second transformer
        pass on the negative prompt steers away from it (diffusers' "true CFG"); FLUX's own
        ``guidance_scale`` stays the distilled guidance embedding.
        ``callback(step, timestep, latents)`` runs after every step; returning ``False``
        (or setting ``cancel``) stops the generation with :class:`GenerationCancelled`.
        """
        cfg = self.config
        # 1. Check inputs: everything a user can get wrong fails here, before any engine runs.
        prompts = _as_prompts(prompt, "prompt")
        negatives = _as_prompts(negative_prompt, "negative_prompt") if negative_prompt is not None else None
        if negatives is not None and len(negatives) not in (1, len(prompts)):
            raise InputError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        if negatives is not None and len(negatives) == 1:
            negatives = negatives * len(prompts)
        if num_inference_steps is None:
            num_inference_steps = cfg.default_steps
        if guidance_scale is None:
            guidance_scale = cfg.default_guidance_scale
        steps = _int_in("num_inference_steps", num_inference_steps, 1, MAX_STEPS)
        per_prompt = _int_in("num_images_per_prompt", num_images_per_prompt, 1, MAX_IMAGES)
        if len(prompts) * per_prompt > MAX_IMAGES:
            raise InputError(f"{len(prompts)} prompts x {per_prompt} images is more than {MAX_IMAGES} images in one call")
        guidance = _float_in("guidance_scale", guidance_scale, 0.0, 100.0)
        rescale = _float_in("guidance_rescale", guidance_rescale, 0.0, 1.0)
        if output_type not in ("pil", "np", "latent"):
            raise InputError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        flux = cfg.prompt_layout == "flux"
        true_cfg = _float_in("true_cfg_scale", true_cfg_scale, 0.0, 100.0)
        if true_cfg != 1.0 and not flux:
            raise InputError("true_cfg_scale applies to FLUX pipelines only (the others take guidance_scale)")
        if flux and negatives is not None and true_cfg <= 1.0:
            raise InputError("FLUX is guidance-distilled: a negative prompt needs true_cfg_scale above 1 "
                             "(a second pass on it); guidance_scale alone takes none")
        # FLUX packs 2x2 latent patches into one token: sides are multiples of twice the VAE factor.
        factor = cfg.vae_scale_factor * (2 if flux else 1)
        # Sizes as diffusers takes them (sizes.py); a static-shape engine takes its own only.
        rule = size_rule(cfg, self.manifest.components, MAX_SIDE)
        init = _init_image(image, height, width, rule) if image is not None else None
        if init is not None:
            height, width = init.shape[-2:]
            strength = _float_in("strength", strength, 0.0, 1.0)
            if strength <= 0:
                raise InputError("strength must be above 0 (0 would return the image unchanged)")
        default_h, default_w = rule.fixed or (cfg.default_size, cfg.default_size)
        height, width = check_size(rule, default_h if height is None else height,
                                   default_w if width is None else width)
        name = scheduler or default_scheduler_name(cfg.scheduler)
        if name not in SCHEDULERS:
            raise InputError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
        if cfg.is_flow != (name == "flow-euler"):
            raise InputError(f"scheduler {name!r} does not fit this {cfg.prediction_type}-prediction model; "
                             f"use {'flow-euler' if cfg.is_flow else 'any but flow-euler'}")
        seq_len = None
        if max_sequence_length is not None:
            if cfg.prompt_layout not in ("sd3", "flux"):
                raise InputError("max_sequence_length applies to SD3 and FLUX pipelines (T5 prompts) only")
            seq_len = _int_in("max_sequence_length", max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
        batch = len(prompts) * per_prompt
        shape = (batch, cfg.latent_channels, height // cfg.vae_scale_factor, width // cfg.vae_scale_factor)
        grid = (height // factor, width // factor)
        if flux:  # diffusers' packed layout: (N, (H/16)(W/16), 4C)
            shape = (batch, grid[0] * grid[1], cfg.latent_channels * 4)
        if latents is not None:
            latents = np.asarray(latents)
            if latents.shape != shape:
                raise InputError(f"latents must have shape {shape} for {batch} image(s) at {height}x{width}, "
                                 f"got {tuple(latents.shape)}")
            if not np.isfinite(latents).all():
                raise InputError("latents hold NaN or infinite values")
        if seed is not None:
            _int_in("seed", seed, 0, 2**63 - 1)
        if generator is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else seed
            generator = np.random.default_rng(seed)
        # LCM-distilled UNets take the guidance as an embedding and run no unconditional pass;
        # FLUX runs a negative pass only for true CFG.
        do_cfg = guidance > 1.0 and cfg.time_cond_proj_dim is None and not flux
        true_pass = flux and negatives is not None and true_cfg > 1.0
        two_pass, scale = (True, true_cfg) if true_pass else (do_cfg, guidance)

        # 2. Encode the prompt (and the negative prompt) with every text encoder.
        embeds, pooled = self.encode_prompt(prompts, negatives, per_prompt, do_cfg, max_sequence_length=seq_len)
        if true_pass:  # negative rows first, as CFG's
            assert negatives is not None and pooled is not None
            neg_embeds, neg_pooled = self._encode_flux(negatives, per_prompt, seq_len)
            embeds, pooled = np.concatenate([neg_embeds, embeds]), np.concatenate([neg_pooled, pooled])

        # 3. Prepare timesteps (image-to-image starts part-way down the schedule).
        sched = make_scheduler(name, cfg.scheduler)
        if flux:  # diffusers' FluxPipeline: a 1 -> 1/n ramp, shifted by mu from the image's token count
            # schnell's schedule has a fixed shift and takes no mu (diffusers ignores the one it is given).
            mu = sched.mu_for(grid[0] * grid[1]) if sched.config.use_dynamic_shifting else None
            sched.set_timesteps(steps, mu=mu,
                                sigmas=np.linspace(1.0, 1.0 / steps, steps))
        else:
            sched.set_timesteps(steps)
        timesteps = np.asarray(sched.timesteps)
        if init is not None:
            # diffusers' get_timesteps: SD3's img2img rounds the skipped steps down, SD's the kept ones.
            start = int(max(steps - steps * strength, 0)) if cfg.is_flow else steps - min(int(steps * strength), steps)
            timesteps = timesteps[start * sched.order:]
            if len(timesteps) == 0:
                raise InputError(f"strength {strength} with {steps} steps leaves no step to run; raise either")
            sched.set_begin_index(start * sched.order)

        # 4. Prepare latents: seeded noise, the caller's, or the encoded image with noise added.
        if init is not None:
            noise = unpack_latents(latents, *grid) if flux and latents is not None else latents
            latents = self._image_latents(init, batch, timesteps[:1], sched, generator, noise)
            if flux:
                latents = pack_latents(latents)
        else:
            if latents is None and flux:
                noise = generator.standard_normal((batch, cfg.latent_channels, 2 * grid[0], 2 * grid[1]),
                                                  dtype=np.float32)
                latents = pack_latents(noise)
            elif latents is None:
                latents = generator.standard_normal(shape, dtype=np.float32)
            latents = (latents.astype(np.float32) * np.float32(sched.init_noise_sigma)).astype(np.float32)

        # 5. Denoise.
        extra = self._added_conditions(pooled, batch, height, width, do_cfg, guidance)
        if flux:
            extra.update(self._flux_conditions(embeds, grid, batch * (2 if two_pass else 1), guidance))
        t_scale = np.float32(1000.0 if flux else 1.0)  # FLUX's transformer takes sigma, not sigma x 1000
        for i, t in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(f"generation cancelled before step {i + 1} of {len(timesteps)}")
            model_in = np.concatenate([latents, latents]) if two_pass else latents
            model_in = sched.scale_model_input(model_in, t)
            feeds = {"sample": model_in.astype(np.float32),
                     "timestep": np.full((model_in.shape[0],), np.float32(t) / t_scale, dtype=np.float32),
                     "encoder_hidden_states": embeds, **extra}
            noise_pred = self._run(cfg.denoiser, feeds)["out_sample"].astype(np.float32)
            if two_pass:
                uncond, text = np.split(noise_pred, 2)
                noise_pred = uncond + np.float32(scale) * (text - uncond)
                if rescale > 0:
                    noise_pred = _rescale_noise_cfg(noise_pred, text, rescale)
            noise = generator.standard_normal(latents.shape, dtype=np.float32) if sched.stochastic else None
            latents = sched.step(noise_pred, t, latents, noise=noise)
            if callback is not None and callback(i, float(t), latents) is False:
                raise GenerationCancelled(f"generation cancelled by the callback after step {i + 1}")
            if cancel is not None and cancel.is_set() and i + 1 < len(timesteps):
                raise GenerationCancelled(f"generation cancelled after step {i + 1} of {len(timesteps)}")

        # 6. Decode.
        if output_type == "latent":
            return PipelineOutput(images=latents, seed=seed, timesteps=tuple(float(t) for t in timesteps))
        pixels = self.decode(unpack_latents(latents, *grid) if flux else latents)
        if output_type == "np":
            images: Any = pixels
        else:
            from PIL import Image

            images = [Image.fromarray(x) for x in (pixels * 255).round().astype(np.uint8)]
        return PipelineOutput(images=images, seed=seed, timesteps=tuple(float(t) for t in timesteps))

    # ------------------------------------------------------------------ the steps

    def encode_prompt(
        self, prompts: list[str], negatives: list[str] | None, per_prompt: int, do_cfg: bool,
        max_sequence_length: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt embeddings (unconditional rows first when ``do_cfg``) and the pooled
        embedding the SDXL and SD3 denoisers also take (None for SD 1.x/2.x)."""
        cfg = self.config
        if cfg.prompt_layout == "sd3":
            return self._encode_sd3(prompts, negatives, per_prompt, do_cfg, max_sequence_length)
        if cfg.prompt_layout == "flux":
            return self._encode_flux(prompts, per_prompt, max_sequence_length)
        zero_negative = do_cfg and negatives is None and cfg.force_zeros_for_empty_prompt
        texts = list(prompts)
        if do_cfg and not zero_negative:
            texts = (negatives or [""] * len(prompts)) + texts
        hidden_parts, pooled = [], None
        for enc in cfg.text_encoders:
            tok = self.tokenizer(enc.tokenizer)
            encoded = tok.encode(texts)
            dropped = max(encoded.dropped)
            if dropped and enc is cfg.text_encoders[0]:
                warnings.warn(f"prompt longer than the text encoder's {tok.max_length} tokens: "
                              f"{dropped} tokens were dropped", UserWarning, stacklevel=3)
            runner = self.components[enc.component]
            ids_spec = runner.inputs[0]
            self._check_vocab(enc, tok)
            out = self._run(enc.component, {ids_spec.name: encoded.input_ids})
            key = "last_hidden_state" if enc.hidden_state == "last" else "penultimate_hidden_state"
            hidden_parts.append(out[key].astype(np.float32))
            if enc.use_pooled:
                pooled = out["pooled"].astype(np.float32)
        hidden = np.concatenate(hidden_parts, axis=-1)
        if zero_negative:  # SDXL: an absent negative prompt is zeros, not the embedding of ""
            hidden = np.concatenate([np.zeros_like(hidden), hidden])
            if pooled is not None:
                pooled = np.concatenate([np.zeros_like(pooled), pooled])
        # Each prompt's rows repeated per image, keeping the [negatives; prompts] halves.
        hidden = np.repeat(hidden, per_prompt, axis=0)
        pooled = np.repeat(pooled, per_prompt, axis=0) if pooled is not None else None
        return hidden, pooled

    def _encode_sd3(self, prompts: list[str], negatives: list[str] | None, per_prompt: int, do_cfg: bool,
                    max_sequence_length: int | None) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate states
        side by side, zero-padded to the joint width, then T5's last state (zeros without T5)
        along the sequence; the pooled outputs of both CLIP encoders side by side."""
        cfg = self.config
        texts = ((negatives or [""] * len(prompts)) + list(prompts)) if do_cfg else list(prompts)
        seq_len = max_sequence_length or cfg.max_sequence_length
        joint = int(cfg.extra.get("joint_attention_dim", 0))
        fixed, want = self._denoiser_sequence(), cfg.prompt_length(seq_len)
        if fixed is not None and fixed != want:
            clip_len = cfg.prompt_length(seq_len) - seq_len
            raise InputError(f"this engine was compiled for max_sequence_length {fixed - clip_len} "
                             f"({fixed} prompt tokens), not {seq_len}; recompile without static shapes or pass "
                             f"max_sequence_length={fixed - clip_len}")
        clip_parts, pooled_parts, t5 = [], [], None
        for enc in cfg.text_encoders:
            is_t5, out = self._run_encoder(enc, texts, seq_len, warn=enc is cfg.text_encoders[0])
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

    def _encode_flux(self, prompts: list[str], per_prompt: int,
                     max_sequence_length: int | None) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' FluxPipeline.encode_prompt: T5's last state is the prompt, CLIP's pooled
        output the pooled projection."""
        cfg = self.config
        seq_len = max_sequence_length or cfg.max_sequence_length
        fixed = self._denoiser_sequence()
        if fixed is not None and fixed != seq_len:
            raise InputError(f"this engine was compiled for max_sequence_length {fixed}, not {seq_len}; "
                             f"recompile without static shapes or pass max_sequence_length={fixed}")
        hidden = pooled = None
        for enc in cfg.text_encoders:
            is_t5, out = self._run_encoder(enc, prompts, seq_len, warn=True)
            if is_t5:
                hidden = out["last_hidden_state"].astype(np.float32)
            else:
                pooled = out["pooled"].astype(np.float32)
        if hidden is None or pooled is None:
            raise ManifestError("a FLUX pipeline needs a CLIP and a T5 text encoder")
        return np.repeat(hidden, per_prompt, axis=0), np.repeat(pooled, per_prompt, axis=0)

    def _flux_conditions(self, embeds: np.ndarray, grid: tuple[int, int], batch: int,
                         guidance: float) -> dict[str, np.ndarray]:
        """The rotary ids of FLUX's text tokens (zeros) and image tokens (row, column), and
        the distilled guidance for a dev transformer."""
        h, w = grid
        img_ids = np.zeros((h, w, 3), dtype=np.float32)
        img_ids[..., 1] += np.arange(h, dtype=np.float32)[:, None]
        img_ids[..., 2] += np.arange(w, dtype=np.float32)[None, :]
        extra = {"txt_ids": np.zeros((embeds.shape[1], 3), dtype=np.float32), "img_ids": img_ids.reshape(h * w, 3)}
        if "guidance" in {s.name for s in self.components[self.config.denoiser].inputs}:
            extra["guidance"] = np.full((batch,), guidance, dtype=np.float32)
        return extra

    def _run_encoder(self, enc: TextEncoderSpec, texts: list[str], seq_len: int,
                     warn: bool) -> tuple[bool, dict[str, np.ndarray]]:
        """Tokenize ``texts`` for ``enc`` (T5 to ``seq_len`` tokens, CLIP to its window), warn
        about truncation (always for T5, for CLIP when ``warn``) and run the encoder."""
        tok = self.tokenizer(enc.tokenizer)
        is_t5 = tok.kind == "t5"
        encoded = tok.encode(texts, max_length=seq_len if is_t5 else None)
        dropped = max(encoded.dropped)
        if dropped and (is_t5 or warn):
            window = f"max_sequence_length of {seq_len}" if is_t5 else f"CLIP window of {tok.max_length}"
            warnings.warn(f"prompt longer than the {window} tokens: {dropped} tokens were dropped",
                          UserWarning, stacklevel=5)
        self._check_vocab(enc, tok)
        runner = self.components[enc.component]
        return is_t5, self._run(enc.component, {runner.inputs[0].name: encoded.input_ids})

    def _denoiser_sequence(self) -> int | None:
        spec = next((s for s in self.components[self.config.denoiser].inputs if s.name == "encoder_hidden_states"), None)
        dim = spec.shape[1] if spec is not None and len(spec.shape) > 1 else None
        return dim if isinstance(dim, int) and dim > 0 else None

    def _check_vocab(self, enc: TextEncoderSpec, tok: PromptTokenizer) -> None:
        vocab = _vocab_of(self.config, enc.component)
        if vocab is not None and tok.vocab_size > vocab:
            raise ManifestError(f"tokenizer {enc.tokenizer!r} has {tok.vocab_size} tokens but text encoder "
                                f"{enc.component!r} embeds {vocab}: they do not belong together")

    def _added_conditions(self, pooled: np.ndarray | None, batch: int, height: int, width: int,
                          do_cfg: bool, guidance: float) -> dict[str, np.ndarray]:
        """The denoiser's extra inputs: SDXL's pooled text embedding and size ids; LCM's guidance embedding."""
        cfg = self.config
        denoiser = self.components[cfg.denoiser]
        names = {s.name for s in denoiser.inputs}
        rows = batch * (2 if do_cfg else 1)
        extra: dict[str, np.ndarray] = {}
        if "pooled_projections" in names:
            if pooled is None:
                raise ManifestError("the denoiser takes pooled_projections but no text encoder gives a pooled output")
            extra["pooled_projections"] = pooled
        if "text_embeds" in names:
            if pooled is None:
                raise ManifestError("the denoiser takes text_embeds but no text encoder gives a pooled output")
            extra["text_embeds"] = pooled
        if "time_ids" in names:
            if cfg.requires_aesthetics_score:
                pos, neg = [height, width, 0, 0, 6.0], [height, width, 0, 0, 2.5]
            else:
                pos = neg = [height, width, 0, 0, height, width]
            ids = np.array([neg] * batch + [pos] * batch if do_cfg else [pos] * batch, dtype=np.float32)
            extra["time_ids"] = ids
        if "timestep_cond" in names:
            dim = cfg.time_cond_proj_dim or int(denoiser.inputs[[s.name for s in denoiser.inputs].index(
                "timestep_cond")].shape[-1])
            w = np.full((rows,), guidance - 1.0, dtype=np.float32)
            extra["timestep_cond"] = guidance_scale_embedding(w, dim)
        return extra

    def _image_latents(self, init: np.ndarray, batch: int, t0: np.ndarray, sched: Any,
                       generator: np.random.Generator, noise: np.ndarray | None) -> np.ndarray:
        """Encode ``init`` (1, 3, H, W in [-1, 1]), sample the latent, scale it and noise it to ``t0``."""
        cfg = self.config
        params = self._run("vae_encoder", {"sample": init.astype(np.float32)})["latent_parameters"]
        mean, logvar = np.split(params.astype(np.float32), 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        sample = mean + std * generator.standard_normal(mean.shape, dtype=np.float32)
        if cfg.vae_shift_factor is not None:
            sample = sample - np.float32(cfg.vae_shift_factor)
        init_latents = np.repeat(sample * np.float32(cfg.vae_scaling_factor), batch, axis=0)
        if noise is None:
            noise = generator.standard_normal(init_latents.shape, dtype=np.float32)
        return sched.add_noise(init_latents, noise.astype(np.float32), t0).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents to images: (N, H, W, 3) float32 in [0, 1]."""
        cfg = self.config
        scaled = latents / np.float32(cfg.vae_scaling_factor)
        if cfg.vae_shift_factor is not None:
            scaled = scaled + np.float32(cfg.vae_shift_factor)
        decoder = self.components["vae_decoder"]
        fixed = decoder.inputs[0].shape[0]
        if isinstance(fixed, int) and fixed > 0 and fixed != len(scaled):  # a static-batch decoder: one at a time
            parts = [self._run("vae_decoder", {"latent_sample": scaled[i:i + fixed]})["sample"]
                     for i in range(0, len(scaled), fixed)]
            sample = np.concatenate(parts)
        else:
            sample = self._run("vae_decoder", {"latent_sample": scaled.astype(np.float32)})["sample"]
        return np.clip(sample.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    # ------------------------------------------------------------------ bookkeeping

    def close(self) -> None:
        close = getattr(self.components, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TextToImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TextToImage({str(self.path)!r}, {self.manifest.family}, backend={self.backend!r})"


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


def _rescale_noise_cfg(noise_cfg: np.ndarray, noise_text: np.ndarray, rescale: float) -> np.ndarray:
    """diffusers' ``rescale_noise_cfg`` (Lin et al. 2023, section 3.4)."""
    axes = tuple(range(1, noise_text.ndim))
    std_text = noise_text.std(axis=axes, keepdims=True)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return (rescale * rescaled + (1 - rescale) * noise_cfg).astype(np.float32)


def _vocab_of(config: PipelineConfig, component: str) -> int | None:
    sizes = config.extra.get("text_encoder_vocab_sizes") or {}
    value = sizes.get(component) if isinstance(sizes, Mapping) else None
    return int(value) if value is not None else None


def _as_prompts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise InputError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")


def _int_in(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def _float_in(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {value}")
    return value


def _init_image(image: Any, height: int | None, width: int | None, rule: Any) -> np.ndarray:
    """diffusers' VaeImageProcessor.preprocess: resize (lanczos) to the size asked for, or the
    image's own rounded down to the allowed multiple; scale to [-1, 1]; (1, 3, H, W)."""
    from enginekit.runtimes.images import load_init_image, vae_preprocess

    pil = load_init_image(image)
    h, w = check_size(rule, *init_image_size(rule, pil.size, height, width))
    return vae_preprocess(pil, h, w)
