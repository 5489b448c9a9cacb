"""The text-to-image task: a diffusers-style pipeline over loaded engines, without torch.

``TextToImage`` runs the diffusion artifacts enginekit exports (text encoders, a UNet or
transformer denoiser and the VAE as components) with numpy, Pillow, the Rust ``tokenizers``
library and the backend. Its ``__call__`` reads as diffusers' pipelines do, in numbered
steps: check inputs → encode the prompt → prepare timesteps → prepare latents → denoise →
decode. What differs between model shapes (prompt encoding, latent packing, the denoiser's
extra inputs, guidance, timesteps) is the manifest's layout
(:mod:`enginekit.runtimes.tasks.layouts`); the defaults are the manifest's.

Seeds drive numpy's ``default_rng`` (PCG64), not torch's generator, so the same
seed gives different noise than diffusers; pass ``latents=`` (diffusers'
layout, ``(N, C, H/8, W/8)``) to compare images with diffusers exactly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from enginekit.errors import EngineKitError, InputError, ManifestError
from enginekit.manifest import Manifest, TensorSpec
from enginekit.memory import StagePeaks
from enginekit.runtimes.base import Runner
from enginekit.runtimes.schedulers import make_scheduler
from enginekit.runtimes.tasks.call_args import Call, CallArgs, check_call
from enginekit.runtimes.tasks.controlnet import Control
from enginekit.runtimes.tasks.inpaint import Inpainting
from enginekit.runtimes.tasks.lora import LoraSwitch
from enginekit.runtimes.tasks.layouts import (Layout, guidance_scale_embedding, layout_for,
                                              pack_latents, rescale_noise_cfg, unpack_latents)
from enginekit.runtimes.tasks.pipeline_config import PipelineConfig, TextEncoderSpec, default_scheduler_name
from enginekit.runtimes.tasks.step_cache import DEEPCACHE_CUT, Forecast
from enginekit.runtimes.tasks.tokenizers import PromptTokenizer

__all__ = ["TextToImage", "PipelineConfig", "PipelineOutput", "GenerationCancelled", "default_scheduler_name",
           "TextEncoderSpec", "pack_latents", "unpack_latents", "guidance_scale_embedding"]

log = logging.getLogger("enginekit")

Callback = Callable[[int, float, np.ndarray], Any]


class GenerationCancelled(EngineKitError):
    """A generation was stopped by its callback or its ``cancel`` event.

    It carries what was made: ``latents`` after the last finished step (diffusers' layout,
    unpacked for FLUX, so ``pipe.decode(exc.latents)`` shows them as images; None when the
    stop came before the first step), ``step`` (steps finished) and ``steps`` (steps planned);
    both None when the stop came while decoding, after every step.
    """

    def __init__(self, message: str, latents: np.ndarray | None = None, step: int | None = None,
                 steps: int | None = None) -> None:
        super().__init__(message)
        self.latents = latents
        self.step = step
        self.steps = steps


@dataclass
class PipelineOutput:
    """What a call returns: ``images`` as PIL images, an (N, H, W, 3) float array in
    [0, 1] (``output_type="np"``) or the final latents (``output_type="latent"``)."""

    images: Any
    #: Seed used for the noise (None when latents were given and nothing else was drawn).
    seed: int | None = None
    timesteps: tuple[float, ...] = ()
    #: The step cache the call ran with ("none", "deepcache:3", "taylorseer:2": the caller's, or the manifest's default).
    cache: str = "none"
    #: The LoRA files the call applied (name, sha256, short_hash, scale, format, layers).
    loras: tuple[dict[str, Any], ...] = ()


class TextToImage:
    """A diffusion pipeline over an artifact's components (SD 1.x/2.x/XL, SD3/3.5, FLUX.1).

    Called like a diffusers pipeline::

        pipe = enginekit.load("out/sd-ov")
        out = pipe("a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=20,
                   guidance_scale=7.5, height=512, width=512, seed=42)
        out.images[0].save("lighthouse.png")

    Components load when first used: text-to-image never opens the VAE encoder.
    Loaded with ``low_memory=True`` (``enginekit.load(path, low_memory=True)``), each call
    opens a component for the step that needs it and closes it right after: every text
    encoder once it has run (T5 freed before the denoiser opens), the denoiser after the
    last step, before the VAE decoder opens. The images are the same; calls run one at a time.
    """

    task = "text-to-image"

    def __init__(self, components: Mapping[str, Runner], manifest: Manifest, path: Path) -> None:
        self.components = components
        self.manifest = manifest
        self.path = Path(path)
        self.config = PipelineConfig.from_section(manifest.task_config)
        self.layout: Layout = layout_for(self.config)
        needed = [e.component for e in self.config.text_encoders] + [self.config.denoiser, "vae_decoder"]
        missing = [n for n in needed if n not in manifest.components]
        if missing:
            raise ManifestError(f"{self.path}: the pipeline needs component {missing[0]!r}, which the artifact lacks "
                                f"(it has: {', '.join(manifest.components)})")
        self._tokenizers: dict[str, PromptTokenizer] = {}
        #: Open each component for its step and release it after (see the class docstring).
        self.low_memory = bool(getattr(components, "low_memory", False))
        # A low-memory call releases what another would be running: one call at a time.
        self._call_lock = threading.RLock() if self.low_memory else None
        #: When set, each step's peak resident memory is recorded here ("text encoding",
        #: "image encoding", "denoising", "decode"): what ``generate -v`` prints.
        self.stages: StagePeaks | None = None
        #: ``recorder(component, feeds)`` sees every engine call's typed feeds (quantization
        #: records the denoiser's real inputs this way); None costs one attribute check.
        self.recorder: Callable[[str, Mapping[str, np.ndarray]], None] | None = None
        self.lora_switch = LoraSwitch(self)

    @classmethod
    def from_artifact(cls, components: Mapping[str, Runner], manifest: Manifest, path: Path) -> TextToImage:
        return cls(components, manifest, path)

    @staticmethod
    def compile_options(manifest: Manifest, backend: str, precision: str = "fp32", height: int | None = None,
                        width: int | None = None, batch: int | None = None) -> dict[str, Any]:
        """Backend options for compiling this pipeline (:func:`.pipeline_compile.compile_options`)."""
        from enginekit.runtimes.tasks.pipeline_compile import compile_options

        return compile_options(manifest, backend, precision, height, width, batch)

    @staticmethod
    def shape_buckets(manifest: Manifest) -> dict[str, Any]:
        """A shape-profile backend's (TensorRT's) default buckets (:func:`.pipeline_compile.shape_buckets`)."""
        from enginekit.runtimes.tasks.pipeline_compile import shape_buckets

        return shape_buckets(manifest)

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

    def input_specs(self, component: str) -> tuple[TensorSpec, ...]:
        """A component's inputs, without opening it in a low-memory pipeline (the manifest's
        record, which the compile wrote from the engine); else the open engine's."""
        if self.low_memory and component not in getattr(self.components, "loaded", ()):
            return tuple(self.manifest.component(component).inputs)
        return tuple(self.components[component].inputs)

    def release(self, *components: str) -> None:
        """Close these components now in a low-memory pipeline (their memory goes back; the
        next use opens them again); nothing otherwise."""
        release = getattr(self.components, "release", None)
        if self.low_memory and release is not None:
            release(*components)

    def _stage(self, name: str) -> Any:
        return self.stages.stage(name) if self.stages is not None else contextlib.nullcontext()

    def _one_call(self) -> Any:
        return self._call_lock if self._call_lock is not None else contextlib.nullcontext()

    def run_component(self, component: str, feeds: Mapping[str, np.ndarray],
                      runner: Runner | None = None) -> dict[str, np.ndarray]:
        """Run one engine (``runner``, else ``component``'s), its feeds cast to what it declares
        (an fp16 graph may take float16; a timestep may be int64); the recorder sees them."""
        name = component if runner is None else (runner.component or component)  # a cut: "unet#deepcache"
        runner = runner if runner is not None else self.components[component]
        typed = {}
        for spec in runner.inputs:
            value = feeds[spec.name]
            typed[spec.name] = value.astype(spec.dtype, copy=False) if spec.dtype != "bfloat16" else value
        if self.recorder is not None:
            self.recorder(name, typed)
        return runner.run(typed)

    _run = run_component

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
        strength: float | None = None,
        scheduler: str | None = None,
        guidance_rescale: float = 0.0,
        output_type: str = "pil",
        callback: Callback | None = None,
        cancel: threading.Event | None = None,
        generator: np.random.Generator | None = None,
        max_sequence_length: int | None = None,
        true_cfg_scale: float = 1.0,
        cache: str | None = None,
        mask_image: Any = None,
        padding_mask_crop: int | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | Sequence[float] = 1.0,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        loras: Mapping[Any, float] | None = None,
    ) -> PipelineOutput:
        """Generate images for ``prompt``.

        ``negative_prompt``: what to steer away from (CFG needs ``guidance_scale > 1``).
        ``latents``: initial noise in diffusers' layout (N, C, H/8, W/8; FLUX packed,
        N, H/16 * W/16, 4C), float32, before scaling by the scheduler's ``init_noise_sigma``
        (as diffusers takes them).
        ``image`` + ``strength``: image-to-image through the VAE encoder (default strength 0.8);
        ``latents`` is then the noise added to the encoded image.
        ``mask_image`` (white: repaint) with ``image``: inpainting (default strength 1.0), on an
        inpainting model (9-channel UNet) as diffusers' inpainting pipelines run it, on any other
        as their masked image-to-image; ``padding_mask_crop`` (pixels) generates on the mask's
        padded bounding box only and pastes it back. See :mod:`enginekit.runtimes.tasks.inpaint`.
        ``control_image`` (one per ControlNet the artifact holds) with ``controlnet_conditioning_scale``
        and ``control_guidance_start``/``_end`` (each one value or one per ControlNet): ControlNet,
        as diffusers' ControlNet pipelines run it (:mod:`enginekit.runtimes.tasks.controlnet`).
        ``scheduler``: one of :data:`SCHEDULERS`; default the manifest's (the pipeline's own
        where ported; a flow-matching model, SD3 or FLUX, takes ``flow-euler`` only).
        ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``: default the
        manifest's, which the export wrote from the model family (FLUX schnell: 4 steps,
        guidance 0; dev: 28, 3.5; the others 50, 7.5); older manifests 50 and 7.5.
        ``max_sequence_length``: SD3's and FLUX's T5 prompt tokens (default the manifest's:
        256, FLUX dev 512; at most 512).
        ``true_cfg_scale``: FLUX only. Above 1, with a ``negative_prompt``, a second transformer
        pass on the negative prompt steers away from it (diffusers' "true CFG"); FLUX's own
        ``guidance_scale`` stays the distilled guidance embedding.
        ``callback(step, timestep, latents)`` runs after every step; returning ``False`` stops the
        generation, and so does setting ``cancel`` (a ``threading.Event``, from any thread: it is
        checked before and after every step and between VAE decoder calls). A stopped generation
        raises :class:`GenerationCancelled`, which carries the latents of the last finished step
        (``exc.latents``, ``exc.step`` of ``exc.steps``; ``pipe.decode(exc.latents)`` makes them
        images). Anything else a callback returns (``None``, ``True``) goes on: the opposite of
        OpenVINO GenAI's ``Text2ImagePipeline``, whose callback stops the generation by returning
        ``True``.
        ``cache``: step caching, ``"deepcache:N"`` (a UNet pipeline: every N-th step runs the whole
        UNet, the steps between only its outer layers on the deep features it gave; faster, and
        the image moves), ``"taylorseer:N"`` (any denoiser: after 3 full steps, one step in N
        runs it and the others forecast its output; ``taylorseer:N,before=B,after=A,order=K``)
        or ``"none"``; default the manifest's (what ``optimize`` judged and picked), else none.
        See :mod:`enginekit.runtimes.tasks.step_cache`.
        ``loras``: LoRA files (paths or bytes) and their scales, applied for this call only
        (:mod:`enginekit.runtimes.tasks.lora`); none runs the base weights.
        """
        args = CallArgs(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                        num_images_per_prompt, seed, latents, image, strength, scheduler, guidance_rescale,
                        output_type, generator, max_sequence_length, true_cfg_scale, cache, mask_image,
                        padding_mask_crop, control_image, controlnet_conditioning_scale, control_guidance_start,
                        control_guidance_end, loras)
        with self._one_call(), self.lora_switch.applied(args.loras) as applied:
            try:
                return replace(self._call(args, callback, cancel), loras=tuple(applied))
            finally:
                # A low-memory pipeline holds nothing between calls, whatever stopped this one.
                self.release(*self.manifest.components)

    def _call(self, args: CallArgs, callback: Callback | None, cancel: threading.Event | None) -> PipelineOutput:
        # 1. Check inputs: everything a user can get wrong fails here, before any engine runs.
        call = check_call(args, self.config, self.layout, self.manifest.components)

        # 2. Encode the prompt (and the negative prompt) with every text encoder.
        with self._stage("text encoding"):
            embeds, pooled = self.encode_prompt(call.prompts, call.negatives, call.per_prompt,
                                                call.guidance.two_pass, max_sequence_length=call.seq_len)

        # 3. Prepare timesteps (image-to-image starts part-way down the schedule).
        sched, timesteps = self._prepare_timesteps(call)

        # 4. Prepare latents: seeded noise, the caller's, or the encoded image with noise added
        #    (inpainting: also the mask and the masked image's latents).
        inpaint = Inpainting(self, call, call.masked, self.denoiser_channels()) if call.inpaint else None
        with self._stage("image encoding") if call.init is not None or inpaint else contextlib.nullcontext():
            latents = inpaint.start(sched, timesteps) if inpaint else self._prepare_latents(call, sched, timesteps)

        # 5. Denoise (a low-memory pipeline then closes the denoiser before the VAE decoder opens).
        with self._stage("denoising"):
            extra = self.layout.denoiser_inputs(self, embeds, pooled, call.batch, call.height, call.width,
                                                call.guidance)
            latents = self._denoise(call, sched, timesteps, latents, embeds, extra, callback, cancel, inpaint)
            self.release(self.config.denoiser, *(n["component"] for n in self.config.extra.get("controlnets") or []))

        # 6. Decode.
        steps_run = tuple(float(t) for t in timesteps)
        if call.output_type == "latent":
            return PipelineOutput(images=latents, seed=call.seed, timesteps=steps_run, cache=str(call.cache or "none"))
        with self._stage("decode"):
            pixels = self.decode(self.layout.unpack(latents, call.height, call.width), cancel=cancel)
        if call.output_type == "np" and not (inpaint and call.masked is not None and call.masked.crop):
            images: Any = pixels
        else:
            from PIL import Image

            images = [Image.fromarray(x) for x in (pixels * 255).round().astype(np.uint8)]
            images = inpaint.finish(images) if inpaint else images  # a crop pasted back into the original
            if call.output_type == "np":
                images = np.stack([np.asarray(x, dtype=np.float32) / 255.0 for x in images])
        return PipelineOutput(images=images, seed=call.seed, timesteps=steps_run, cache=str(call.cache or "none"))

    # ------------------------------------------------------------------ the steps

    def encode_prompt(
        self, prompts: list[str], negatives: list[str] | None, per_prompt: int, do_cfg: bool,
        max_sequence_length: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt embeddings (negative rows first when ``do_cfg``, the call's two passes) and
        the pooled embedding the SDXL, SD3 and FLUX denoisers also take (None for SD 1.x/2.x).
        A low-memory pipeline has closed every text encoder when this returns."""
        with self._one_call():
            try:
                return self.layout.encode(self, prompts, negatives, per_prompt, do_cfg, max_sequence_length)
            finally:
                self.release(*(e.component for e in self.config.text_encoders))

    def _prepare_timesteps(self, call: Call) -> tuple[Any, np.ndarray]:
        sched = make_scheduler(call.scheduler, self.config.scheduler)
        self.layout.set_timesteps(sched, call.steps, call.height, call.width)
        timesteps = np.asarray(sched.timesteps)
        if call.init is not None:
            steps, strength = call.steps, call.strength
            # diffusers' get_timesteps: SD3's img2img rounds the skipped steps down, SD's the kept ones.
            start = int(max(steps - steps * strength, 0)) if self.config.is_flow else steps - min(int(steps * strength), steps)
            timesteps = timesteps[start * sched.order:]
            if len(timesteps) == 0:
                raise InputError(f"strength {strength} with {steps} steps leaves no step to run; raise either")
            sched.set_begin_index(start * sched.order)
        return sched, timesteps

    def _prepare_latents(self, call: Call, sched: Any, timesteps: np.ndarray) -> np.ndarray:
        layout, latents = self.layout, call.latents
        if call.init is not None:
            noise = layout.unpack(latents, call.height, call.width) if latents is not None else None
            image_latents = self._image_latents(call.init, call.batch, timesteps[:1], sched, call.generator, noise)
            self.release("vae_encoder")
            return layout.pack(image_latents)
        if latents is None:
            shape = layout.unpacked_shape(call.batch, call.height, call.width)
            latents = layout.pack(call.generator.standard_normal(shape, dtype=np.float32))
        return (latents.astype(np.float32) * np.float32(sched.init_noise_sigma)).astype(np.float32)

    def _denoise(self, call: Call, sched: Any, timesteps: np.ndarray, latents: np.ndarray, embeds: np.ndarray,
                 extra: Mapping[str, np.ndarray], callback: Callback | None,
                 cancel: threading.Event | None, inpaint: Inpainting | None = None) -> np.ndarray:
        two_pass, scale = call.guidance.two_pass, np.float32(call.guidance.scale)

        def stopped(message: str, done: int) -> GenerationCancelled:
            made = self.layout.unpack(latents, call.height, call.width) if done else None
            return GenerationCancelled(message, latents=made, step=done, steps=len(timesteps))

        denoiser, cache, deep = self.config.denoiser, call.cache, None
        forecast = Forecast(cache.order) if cache is not None and cache.kind == "taylorseer" else None
        control = Control(self, call.control, call.batch, two_pass) if "controlnet_residuals" in self.config.extra \
            else None
        for i, t in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                raise stopped(f"generation cancelled before step {i + 1} of {len(timesteps)}", i)
            model_in = np.concatenate([latents, latents]) if two_pass else latents
            model_in = latent_in = sched.scale_model_input(model_in, t)
            model_in = inpaint.model_input(model_in) if inpaint else model_in
            feeds = {"sample": model_in.astype(np.float32), "timestep": self.layout.timestep(t, model_in.shape[0]),
                     "encoder_hidden_states": embeds, **extra}
            if control is not None:  # ControlNets see the latents alone (an inpainting UNet also gets the mask)
                feeds.update(control.residuals(i, len(timesteps), {**feeds, "sample": latent_in.astype(np.float32)}))
            if cache is None or cache.full(i, len(timesteps)):
                noise_pred = self.run_component(denoiser, feeds)
                deep = noise_pred.get(DEEPCACHE_CUT.inputs[0]) if cache is not None else None
                noise_pred = noise_pred["out_sample"].astype(np.float32)
                if forecast is not None:
                    forecast.update(i, noise_pred)
            elif forecast is not None:  # TaylorSeer: the output forecast from the last full steps
                noise_pred = forecast.predict(i)
            else:  # DeepCache: the UNet's outer layers on the last full step's deep features
                noise_pred = self.run_component(denoiser, {**feeds, DEEPCACHE_CUT.inputs[0]: deep},
                                                runner=self.components.cut(denoiser, DEEPCACHE_CUT))["out_sample"]
                noise_pred = noise_pred.astype(np.float32)
            if two_pass:
                uncond, text = np.split(noise_pred, 2)
                noise_pred = uncond + scale * (text - uncond)
                if call.rescale > 0:
                    noise_pred = rescale_noise_cfg(noise_pred, text, call.rescale)
            noise = call.generator.standard_normal(latents.shape, dtype=np.float32) if sched.stochastic else None
            latents = sched.step(noise_pred, t, latents, noise=noise)
            latents = inpaint.after_step(latents, i, timesteps, sched) if inpaint else latents
            if callback is not None and callback(i, float(t), latents) is False:
                raise stopped(f"generation cancelled by the callback after step {i + 1}", i + 1)
            if cancel is not None and cancel.is_set() and i + 1 < len(timesteps):
                raise stopped(f"generation cancelled after step {i + 1} of {len(timesteps)}", i + 1)
        return latents

    def _image_latents(self, init: np.ndarray, batch: int, t0: np.ndarray, sched: Any,
                       generator: np.random.Generator, noise: np.ndarray | None) -> np.ndarray:
        """Encode ``init`` (1, 3, H, W in [-1, 1]), sample the latent, scale it and noise it to ``t0``."""
        init_latents = np.repeat(self.encode_image(init, generator), batch, axis=0)
        if noise is None:
            noise = generator.standard_normal(init_latents.shape, dtype=np.float32)
        return sched.add_noise(init_latents, noise.astype(np.float32), t0).astype(np.float32)

    def encode_image(self, image: np.ndarray, generator: np.random.Generator | None) -> np.ndarray:
        """Images (N, 3, H, W in [-1, 1]) to scaled latents: the VAE encoder's posterior sampled
        with ``generator`` (diffusers' ``retrieve_latents``; None: its mean), shifted and scaled
        as the denoiser takes them."""
        cfg = self.config
        params = self.run_component("vae_encoder", {"sample": image.astype(np.float32)})["latent_parameters"]
        mean, logvar = np.split(params.astype(np.float32), 2, axis=1)
        sample = mean if generator is None else \
            mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * generator.standard_normal(mean.shape, np.float32)
        if cfg.vae_shift_factor is not None:
            sample = sample - np.float32(cfg.vae_shift_factor)
        return (sample * np.float32(cfg.vae_scaling_factor)).astype(np.float32)

    def denoiser_channels(self) -> int:
        """Latent channels the denoiser's ``sample`` takes (unpacked: FLUX's 64 are 16 channels):
        the latents', or an inpainting model's latents + mask + masked-image latents."""
        spec = next(s for s in self.input_specs(self.config.denoiser) if s.name == "sample")
        channels = spec.shape[-1] if self.layout.packs_latents else spec.shape[1]
        return int(channels) // 4 if self.layout.packs_latents else int(channels)

    def decode(self, latents: np.ndarray, cancel: threading.Event | None = None) -> np.ndarray:
        """Latents to images: (N, H, W, 3) float32 in [0, 1]. ``cancel``, when set, stops a
        decoder that runs in several calls (a static-batch engine) between them. A low-memory
        pipeline closes the VAE decoder when this returns."""
        with self._one_call():
            try:
                return self._decode(latents, cancel)
            finally:
                self.release("vae_decoder")

    def _decode(self, latents: np.ndarray, cancel: threading.Event | None) -> np.ndarray:
        cfg = self.config
        scaled = latents / np.float32(cfg.vae_scaling_factor)
        if cfg.vae_shift_factor is not None:
            scaled = scaled + np.float32(cfg.vae_shift_factor)
        decoder = self.components["vae_decoder"]
        fixed = decoder.inputs[0].shape[0]
        if isinstance(fixed, int) and fixed > 0 and fixed != len(scaled):  # a static-batch decoder: one at a time
            parts = []
            for i in range(0, len(scaled), fixed):
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled(f"generation cancelled while decoding (image {i + 1} of {len(scaled)})",
                                              latents=latents)
                parts.append(self.run_component("vae_decoder", {"latent_sample": scaled[i:i + fixed]})["sample"])
            sample = np.concatenate(parts)
        else:
            sample = self.run_component("vae_decoder", {"latent_sample": scaled.astype(np.float32)})["sample"]
        return np.clip(sample.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    # ------------------------------------------------------------------ bookkeeping

    def close(self) -> None:
        self.lora_switch.close()
        close = getattr(self.components, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TextToImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TextToImage({str(self.path)!r}, {self.manifest.family}, backend={self.backend!r})"
