"""Inpainting: repaint the masked part of an image, as diffusers' ``StableDiffusionInpaintPipeline``
(and its XL, SD3 and FLUX siblings) does, without torch.

Two kinds of denoiser take a mask:

- an **inpainting UNet** (SD 1.5/2 and SDXL inpainting: 9 input channels, the latents, the
  mask at the latent grid and the masked image's latents), for which the mask and the masked
  image's latents join the latents on the channel axis every step;
- an **ordinary denoiser** (4 or 16 channels): masked image-to-image, diffusers' legacy way —
  after every step the unmasked region is put back as the init image's latents noised to the
  next step's level, so it comes out as it went in.

The mask is white (255) where the image is repainted. It is prepared as diffusers'
``mask_processor`` prepares it: resized to the image's size (lanczos), grayscale, scaled to
[0, 1] and binarized at 0.5; at the latent grid it is taken nearest. ``padding_mask_crop``
crops the image and mask to the mask's bounding box (padded, widened to the output's aspect
ratio), generates there and pastes the result back over the original image.

A call on an inpainting model without an image repaints everything (an all-white mask over a
blank image, whose latents are the VAE posterior's mean): text-to-image, as diffusers'
inpainting pipeline gives with a white mask and those ``masked_image_latents``. With an image
and no mask, the whole image is repainted from it (image-to-image through the inpainting model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from enginekit.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = ["MaskedImage", "Inpainting", "prepare_masked_image", "crop_region", "apply_overlay", "load_mask"]


@dataclass
class MaskedImage:
    """An inpainting call's image side: ``init`` (1, 3, H, W) in [-1, 1], ``mask`` (1, 1, H, W)
    in {0, 1} (1 = repaint), and for ``padding_mask_crop`` the crop box in the original image
    with the original image and mask to paste the result back onto."""

    init: np.ndarray
    mask: np.ndarray
    crop: tuple[int, int, int, int] | None = None
    original: Any = None
    original_mask: Any = None


def load_mask(mask: Any) -> Image.Image:
    """The caller's mask (a path, bytes, PIL image or array) as a PIL image; not an image is a
    one-line error naming ``mask_image``."""
    from enginekit.errors import ImageError
    from enginekit.runtimes.images import load_images

    if isinstance(mask, (list, tuple)):
        if len(mask) != 1:
            raise InputError(f"mask_image: inpainting takes one mask, got {len(mask)}")
        mask = mask[0]
    try:
        return load_images([mask])[0]
    except ImageError as exc:
        raise InputError(f"mask_image: {str(exc).removeprefix('item 0: ')}") from None


def crop_region(mask: Image.Image, width: int, height: int, pad: int = 0) -> tuple[int, int, int, int]:
    """diffusers' ``VaeImageProcessor.get_crop_region``: the box (x1, y1, x2, y2) around the
    mask's non-zero pixels, padded by ``pad`` and widened to ``width``/``height``'s aspect ratio."""
    m = np.asarray(mask.convert("L"))
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if len(cols) == 0:  # an empty mask: diffusers' loops run off the edges the same way
        left, right, top, bottom = w, w, h, h
    else:
        left, right, top, bottom = int(cols[0]), w - 1 - int(cols[-1]), int(rows[0]), h - 1 - int(rows[-1])
    x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
    x2, y2 = int(min(w - right + pad, w)), int(min(h - bottom + pad, h))
    if x2 <= x1 or y2 <= y1:
        raise InputError("mask_image is all black: nothing to repaint (white marks what is repainted)")
    if (x2 - x1) / (y2 - y1) > width / height:
        diff = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= mask.height:
            y1, y2 = y1 - (y2 - mask.height), mask.height
        if y1 < 0:
            y1, y2 = 0, y2 - y1
        y2 = min(y2, mask.height)
    else:
        diff = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= mask.width:
            x1, x2 = x1 - (x2 - mask.width), mask.width
        if x1 < 0:
            x1, x2 = 0, x2 - x1
        x2 = min(x2, mask.width)
    return x1, y1, x2, y2


def _resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' ``_resize_and_fill``: fit inside, centred, the margins stretched from the edges."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                      box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill + src_w, 0))
    return out


def _resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' ``_resize_and_crop``: cover, centred, the excess cut."""
    from PIL import Image

    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def prepare_masked_image(image: Any, mask_image: Any, height: int | None, width: int | None, rule: Any,
                         padding_mask_crop: int | None = None) -> MaskedImage:
    """The init image and mask of an inpainting call at the size it runs (the one asked for,
    else the image's own rounded down to the pipeline's multiple, as image-to-image takes it);
    ``mask_image`` None is all white (repaint everything)."""
    from PIL import Image

    from enginekit.runtimes.images import load_init_image, vae_preprocess
    from enginekit.runtimes.tasks.sizes import check_size, init_image_size

    pil = load_init_image(image)
    mask = load_mask(mask_image) if mask_image is not None else Image.new("L", pil.size, 255)
    h, w = check_size(rule, *init_image_size(rule, pil.size, height, width))
    crop = None
    if padding_mask_crop is not None:
        if isinstance(padding_mask_crop, bool) or not isinstance(padding_mask_crop, (int, np.integer)) \
                or not 0 <= int(padding_mask_crop) <= 16384:
            raise InputError(f"padding_mask_crop must be a number of pixels from 0 to 16384, got {padding_mask_crop!r}")
        if mask.size != pil.size:  # the box is found on the mask and cut from the image: one size for both
            mask = mask.resize(pil.size, Image.LANCZOS)
        crop = crop_region(mask, w, h, int(padding_mask_crop))
        init_pil = _resize_fill(pil.crop(crop), w, h)
        mask_pil = _resize_fill(mask.crop(crop), w, h)
    else:
        init_pil = pil  # vae_preprocess resizes it as image-to-image does
        mask_pil = mask if mask.size == (w, h) else mask.resize((w, h), Image.LANCZOS)
    init = vae_preprocess(init_pil.convert("RGB"), h, w)
    m = np.asarray(mask_pil.convert("L"), dtype=np.float32) / 255.0
    binary = (m >= 0.5).astype(np.float32)[None, None]
    return MaskedImage(init=np.ascontiguousarray(init), mask=binary, crop=crop,
                       original=pil if crop is not None else None, original_mask=mask if crop is not None else None)


def apply_overlay(mask: Image.Image, original: Image.Image, image: Image.Image,
                  crop: tuple[int, int, int, int]) -> Image.Image:
    """diffusers' ``apply_overlay``: the generated crop pasted back into the original image,
    the original kept wherever the mask is black."""
    from PIL import Image, ImageOps

    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBA")
    x, y, x2, y2 = crop
    base = Image.new("RGBA", (width, height))
    base.paste(_resize_crop(image, x2 - x, y2 - y), (x, y))
    out = base.convert("RGB").convert("RGBA")
    out.alpha_composite(kept)
    return out.convert("RGB")


def _nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's ``interpolate(mode="nearest")`` of (N, 1, H, W) to (N, 1, height, width)."""
    h, w = mask.shape[-2:]
    rows = np.minimum(np.floor(np.arange(height) * (h / height)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(width) * (w / width)).astype(int), w - 1)
    return mask[:, :, rows][:, :, :, cols]


class Inpainting:
    """One call's inpainting state: prepares the starting latents and, per step, the denoiser's
    extra channels (an inpainting UNet) or the blend that keeps the unmasked region (any other)."""

    def __init__(self, pipe: Any, call: Any, masked: MaskedImage | None, channels_in: int) -> None:
        cfg = pipe.config
        self.pipe, self.call = pipe, call
        self.latent_channels = cfg.latent_channels
        #: The denoiser takes the mask and the masked image's latents (9 channels for SD's 4).
        self.concat = channels_in == 2 * cfg.latent_channels + 1
        if not self.concat and channels_in != cfg.latent_channels:
            raise InputError(f"the denoiser takes {channels_in} latent channels: neither the latents' "
                             f"{cfg.latent_channels} nor an inpainting model's {2 * cfg.latent_channels + 1}")
        if masked is None:  # an inpainting model called without an image: repaint all of a blank one
            shape = (1, 3, call.height, call.width)
            masked = MaskedImage(init=np.zeros(shape, np.float32), mask=np.ones((1, 1, *shape[2:]), np.float32))
        self.masked = masked
        self.image_latents: np.ndarray | None = None
        self.noise: np.ndarray | None = None
        self.extra: np.ndarray | None = None
        self.blend_mask: np.ndarray | None = None

    @property
    def whole_image(self) -> bool:
        """No init image was given: nothing is kept, nothing encoded but the blank masked image."""
        return self.call.init is None

    def start(self, sched: Any, timesteps: np.ndarray) -> np.ndarray:
        """The starting latents (packed as the layout runs them) and the per-step inputs."""
        pipe, call, layout = self.pipe, self.call, self.pipe.layout
        batch, f = call.batch, pipe.config.vae_scale_factor
        grid = (call.height // f, call.width // f)
        strength_max = call.strength >= 1.0
        if not self.whole_image and (not self.concat or not strength_max):
            image = pipe.encode_image(self.masked.init, call.generator)
            self.image_latents = np.repeat(image, batch, axis=0)
        shape = layout.unpacked_shape(batch, call.height, call.width)
        noise = layout.unpack(call.latents, call.height, call.width) if call.latents is not None else \
            call.generator.standard_normal(shape, dtype=np.float32)
        self.noise = noise.astype(np.float32)
        if strength_max or self.image_latents is None:
            latents = self.noise * np.float32(sched.init_noise_sigma)
        else:
            latents = sched.add_noise(self.image_latents, self.noise, timesteps[:1])
        mask = _nearest(self.masked.mask, *grid)
        rows = 2 if call.guidance.two_pass else 1
        if self.concat:
            masked = self.masked.init * (self.masked.mask < 0.5)
            # A blank image has nothing to sample: its posterior mean (so the whole-image call is deterministic).
            draw = None if self.whole_image else call.generator
            masked_latents = np.repeat(pipe.encode_image(masked.astype(np.float32), draw), batch, axis=0)
            extra = np.concatenate([np.repeat(mask, batch, axis=0), masked_latents], axis=1)
            self.extra = np.concatenate([extra] * rows).astype(np.float32)
        else:
            full = np.broadcast_to(mask, (batch, self.latent_channels, *grid)).astype(np.float32)
            self.blend_mask = layout.pack(np.ascontiguousarray(full))
        pipe.release("vae_encoder")
        return layout.pack(latents.astype(np.float32))

    def model_input(self, model_in: np.ndarray) -> np.ndarray:
        """The denoiser's ``sample``: the scaled latents, then the mask and masked-image latents."""
        if self.extra is None:
            return model_in
        return np.concatenate([model_in.astype(np.float32), self.extra], axis=1)

    def after_step(self, latents: np.ndarray, i: int, timesteps: np.ndarray, sched: Any) -> np.ndarray:
        """An ordinary denoiser: the unmasked region back to the init image, noised to the next step's level."""
        if self.blend_mask is None or self.image_latents is None:
            return latents
        layout = self.pipe.layout
        kept = self.image_latents
        if i < len(timesteps) - 1:
            kept = sched.add_noise(kept, self.noise, timesteps[i + 1:i + 2])
        kept = layout.pack(kept.astype(np.float32))
        return ((1.0 - self.blend_mask) * kept + self.blend_mask * latents).astype(np.float32)

    def finish(self, images: list[Any]) -> list[Any]:
        """``padding_mask_crop``: each generated crop pasted back into the original image."""
        m = self.masked
        if m.crop is None:
            return images
        return [apply_overlay(m.original_mask, m.original, image, m.crop) for image in images]
