"""Checks of a pipeline call's arguments: each wrong value is a one-line :class:`InputError`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from enginekit.errors import InputError
from enginekit.runtimes.schedulers import SCHEDULERS
from enginekit.runtimes.tasks.controlnet import check_control, control_args
from enginekit.runtimes.tasks.layouts import Guidance
from enginekit.runtimes.tasks.sizes import check_size, init_image_size, size_rule
from enginekit.runtimes.tasks.step_cache import StepCache, parse_cache

#: Parameter ranges: wide enough for any real use, narrow enough that a typo cannot
#: ask for hours of work or gigabytes of latents.
MAX_STEPS = 1000
MAX_IMAGES = 16
MAX_SIDE = 4096
#: T5 prompt tokens at most (diffusers' SD3 pipeline refuses more than 512).
MAX_SEQUENCE_LENGTH = 512

__all__ = ["CallArgs", "Call", "check_call", "default_strength", "is_inpainting", "IMG2IMG_STRENGTH",
           "INPAINT_STRENGTH", "init_image", "or_default", "as_prompts", "int_in", "float_in", "check_latents"]


@dataclass(frozen=True)
class CallArgs:
    """A pipeline call's arguments as given (unchecked; None: the manifest's default), under
    the names of ``TextToImage.__call__``'s keywords."""

    prompt: Any
    negative_prompt: Any = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    seed: int | None = None
    latents: np.ndarray | None = None
    image: Any = None
    strength: float | None = None
    scheduler: str | None = None
    guidance_rescale: float = 0.0
    output_type: str = "pil"
    generator: np.random.Generator | None = None
    max_sequence_length: int | None = None
    true_cfg_scale: float = 1.0
    cache: str | None = None
    mask_image: Any = None
    padding_mask_crop: int | None = None
    control_image: Any = None
    controlnet_conditioning_scale: Any = 1.0
    control_guidance_start: Any = 0.0
    control_guidance_end: Any = 1.0
    #: LoRA files (path or bytes) -> scale, for this call only (runtimes/tasks/lora.py checks them).
    loras: Any = None


#: ``strength`` when a call leaves it unset: diffusers' image-to-image default, and its
#: inpainting one (everything under the mask repainted from noise).
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0


def default_strength(inpainting: bool) -> float:
    """The strength a call with an init image runs at when it names none."""
    return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH


def is_inpainting(cfg: Any, mask_image: Any) -> bool:
    """A call repaints under a mask: it gives one, or the model is an inpainting model."""
    return mask_image is not None or bool(cfg.extra.get("inpainting"))


def or_default(value: Any, default: Any) -> Any:
    """``value``, or ``default`` where the caller left it unset (None; 0 is a value)."""
    return default if value is None else value


def as_prompts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise InputError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")


def int_in(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def float_in(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {value}")
    return value


def check_latents(latents: np.ndarray | None, shape: tuple[int, ...], height: int, width: int) -> np.ndarray | None:
    """The caller's initial latents, which must have ``shape`` and be finite."""
    if latents is None:
        return None
    latents = np.asarray(latents)
    if latents.shape != shape:
        raise InputError(f"latents must have shape {shape} for {shape[0]} image(s) at {height}x{width}, "
                         f"got {tuple(latents.shape)}")
    if not np.isfinite(latents).all():
        raise InputError("latents hold NaN or infinite values")
    return latents


@dataclass
class Call:
    """One call's checked arguments."""

    prompts: list[str]
    negatives: list[str] | None
    per_prompt: int
    steps: int
    guidance: Guidance
    rescale: float
    height: int
    width: int
    scheduler: str
    seq_len: int | None
    init: np.ndarray | None
    strength: float
    latents: np.ndarray | None
    seed: int | None
    generator: np.random.Generator
    output_type: str
    cache: StepCache | None = None
    #: Inpainting: the init image and mask (None: no mask, or no image on an inpainting model).
    masked: Any = None
    #: The call repaints under a mask (a mask was given, or the model is an inpainting model).
    inpaint: bool = False
    #: ControlNet: the control images at the call's size, scales and windows (None: no control image).
    control: Any = None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.per_prompt


def check_call(args: CallArgs, cfg: Any, layout: Any, components: Mapping[str, Any]) -> Call:
    """``args`` checked against the pipeline (its config, layout and components): the call to run,
    or a one-line :class:`InputError` naming the first wrong value."""
    prompts = as_prompts(args.prompt, "prompt")
    negatives = as_prompts(args.negative_prompt, "negative_prompt") if args.negative_prompt is not None else None
    if negatives is not None and len(negatives) not in (1, len(prompts)):
        raise InputError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
    if negatives is not None and len(negatives) == 1:
        negatives = negatives * len(prompts)
    steps = int_in("num_inference_steps", or_default(args.num_inference_steps, cfg.default_steps), 1, MAX_STEPS)
    per_prompt = int_in("num_images_per_prompt", args.num_images_per_prompt, 1, MAX_IMAGES)
    if len(prompts) * per_prompt > MAX_IMAGES:
        raise InputError(f"{len(prompts)} prompts x {per_prompt} images is more than {MAX_IMAGES} images in one call")
    scale = float_in("guidance_scale", or_default(args.guidance_scale, cfg.default_guidance_scale), 0.0, 100.0)
    rescale = float_in("guidance_rescale", args.guidance_rescale, 0.0, 1.0)
    if args.output_type not in ("pil", "np", "latent"):
        raise InputError(f"output_type must be 'pil', 'np' or 'latent', got {args.output_type!r}")
    guidance = layout.guidance(scale, float_in("true_cfg_scale", args.true_cfg_scale, 0.0, 100.0),
                               negatives is not None)
    # Sizes as diffusers takes them (sizes.py); a static-shape engine takes its own only.
    rule = size_rule(cfg, components, MAX_SIDE)
    height, width = args.height, args.width
    inpaint = is_inpainting(cfg, args.mask_image)
    if args.image is None:
        if args.mask_image is not None:
            raise InputError("mask_image needs an image (--init-image): the picture whose masked part is repainted")
        if args.padding_mask_crop is not None:
            raise InputError("padding_mask_crop needs an image and a mask_image")
        if args.strength is not None:
            raise InputError(f"strength {args.strength} is for image-to-image: give an image (--init-image) or drop it")
    if args.padding_mask_crop is not None and args.mask_image is None:
        raise InputError("padding_mask_crop crops around the mask: give a mask_image too")
    controls = check_control(cfg, args.control_image, args.controlnet_conditioning_scale,
                             args.control_guidance_start, args.control_guidance_end)
    if controls is not None and args.image is None:  # no size asked: the control image's own (diffusers')
        height, width = init_image_size(rule, controls[0].size, height, width)
    masked = None
    if args.image is not None and inpaint:
        from enginekit.runtimes.tasks.inpaint import prepare_masked_image

        masked = prepare_masked_image(args.image, args.mask_image, height, width, rule, args.padding_mask_crop)
        init = masked.init
    else:
        init = init_image(args.image, height, width, rule) if args.image is not None else None
    strength = default_strength(inpaint)
    if init is not None:
        height, width = init.shape[-2:]
        strength = float_in("strength", or_default(args.strength, strength), 0.0, 1.0)
        if strength <= 0:
            raise InputError("strength must be above 0 (0 would return the image unchanged)")
    default_h, default_w = rule.fixed or (cfg.default_size, cfg.default_size)
    height, width = check_size(rule, or_default(height, default_h), or_default(width, default_w))
    name = args.scheduler or cfg.default_scheduler
    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if cfg.is_flow != (name == "flow-euler"):
        raise InputError(f"scheduler {name!r} does not fit this {cfg.prediction_type}-prediction model; "
                         f"use {'flow-euler' if cfg.is_flow else 'any but flow-euler'}")
    seq_len = None
    if args.max_sequence_length is not None:
        if not layout.uses_t5:
            raise InputError("max_sequence_length applies to SD3 and FLUX pipelines (T5 prompts) only")
        seq_len = int_in("max_sequence_length", args.max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
    latents = check_latents(args.latents, layout.latent_shape(len(prompts) * per_prompt, height, width),
                            height, width)
    seed, generator = args.seed, args.generator
    if seed is not None:
        int_in("seed", seed, 0, 2**63 - 1)
    if generator is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else seed
        generator = np.random.default_rng(seed)
    cache = parse_cache(args.cache, cfg, components)
    control = control_args(controls, cfg.extra["controlnets"], height, width, args.controlnet_conditioning_scale,
                           args.control_guidance_start, args.control_guidance_end) if controls is not None else None
    return Call(prompts, negatives, per_prompt, steps, guidance, rescale, height, width, name, seq_len, init,
                strength, latents, seed, generator, args.output_type, cache, masked, inpaint, control)


def init_image(image: Any, height: int | None, width: int | None, rule: Any) -> np.ndarray:
    """diffusers' VaeImageProcessor.preprocess: resize (lanczos) to the size asked for, or the
    image's own rounded down to the allowed multiple; scale to [-1, 1]; (1, 3, H, W)."""
    from enginekit.runtimes.images import load_init_image, vae_preprocess

    pil = load_init_image(image)
    h, w = check_size(rule, *init_image_size(rule, pil.size, height, width))
    return vae_preprocess(pil, h, w)
