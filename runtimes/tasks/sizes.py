"""Which image sizes a text-to-image engine takes, decided before any engine runs (torch-free).

The sizes are diffusers' own, per pipeline:

- SD 1.x/2.x and SDXL (a UNet): a side is a multiple of 8 (``check_inputs`` tests ``% 8``) and
  of the VAE factor; the latent side ``side / 8`` may be odd (the exported UNet carries each
  skip connection's size into its upsampler, as diffusers' UNet does).
- SD3 (an MMDiT over 2x2 patches): a multiple of ``vae_scale_factor * patch_size``, else
  diffusers raises; at most ``pos_embed_max_size`` patches a side (its position crop raises
  beyond). We refuse what it refuses.
- FLUX (2x2 latent patches packed into tokens): a multiple of ``vae_scale_factor * 2``.
  diffusers *rounds* other sides down with a logged warning and makes the smaller image; we
  refuse them instead (an error that names the rounded-down size, which gives diffusers'
  image), since a size silently changed in a server is worse than a clear 422.

A static-shape engine (OpenVINO compiled with ``--height``/``--width``) takes its one size.

An init image with no size asked for is resized, as diffusers' ``VaeImageProcessor``
(``get_default_height_width``) does, to its own size rounded down to the allowed multiple
(lanczos, diffusers' default resample), so an ordinary 640x427 photo runs at 640x424.
diffusers' SD3 and FLUX image-to-image pipelines default instead to the model's square size;
we keep the photo's aspect (pass ``height``/``width`` for diffusers' default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from enginekit.errors import InputError

__all__ = ["SizeRule", "size_rule", "allowed_multiple", "static_size", "check_size", "init_image_size"]



@dataclass(frozen=True)
class SizeRule:
    """The image sizes one engine takes: sides a multiple of ``multiple`` from ``minimum`` to
    ``maximum`` pixels, or only ``fixed`` (height, width) for a static-shape engine."""

    multiple: int
    minimum: int
    maximum: int
    fixed: tuple[int, int] | None = None

    def describe(self) -> str:
        """The sizes taken, in words (for error messages)."""
        if self.fixed is not None:
            return f"only {self.fixed[0]}x{self.fixed[1]} (height x width; compiled with static shapes)"
        return f"sides that are multiples of {self.multiple} from {self.minimum} to {self.maximum}"


def allowed_multiple(config: Any) -> int:
    """The multiple of pixels a side must be for ``config`` (a ``PipelineConfig``): its layout's."""
    from enginekit.runtimes.tasks.layouts import layout_for

    return layout_for(config).size_multiple


def static_size(config: Any, components: Mapping[str, Any]) -> tuple[int, int] | None:
    """The (height, width) a static-shape engine was compiled for, or None for dynamic shapes.

    Read from the VAE decoder's latent input (every layout decodes (N, C, H/f, W/f) latents),
    so FLUX's packed token count need not be unpicked; ``components`` maps names to manifest
    components (anything with ``inputs`` of specs with a ``shape``).
    """
    decoder = components.get("vae_decoder")
    if decoder is None or not decoder.inputs:
        return None
    shape = tuple(decoder.inputs[0].shape)
    if len(shape) != 4:
        return None
    lh, lw = shape[2], shape[3]
    if isinstance(lh, int) and isinstance(lw, int) and lh > 0 and lw > 0:
        f = int(config.vae_scale_factor)
        return lh * f, lw * f
    return None


def size_rule(config: Any, components: Mapping[str, Any] | None = None, max_side: int = 4096) -> SizeRule:
    """The sizes an engine takes: diffusers' rule for its pipeline (sides from one multiple up
    to ``max_side``, SD3 also up to its position crop), narrowed to the one size a
    static-shape engine was compiled for (``components``: the manifest's, when known)."""
    multiple = allowed_multiple(config)
    maximum = max_side
    patches = config.extra.get("pos_embed_max_size")
    if patches and config.extra.get("patch_size"):  # SD3: the position embedding's crop
        maximum = min(maximum, int(patches) * multiple)
    maximum = maximum // multiple * multiple
    fixed = static_size(config, components) if components is not None else None
    return SizeRule(multiple=multiple, minimum=multiple, maximum=maximum, fixed=fixed)


def check_size(rule: SizeRule, height: Any, width: Any) -> tuple[int, int]:
    """(height, width) as ints, or a one-line :class:`InputError` naming the sizes ``rule`` takes."""
    m = rule.multiple
    sides = []
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)):
            raise InputError(f"{name} must be an integer, got {side!r}")
        side = int(side)
        if not rule.minimum <= side <= rule.maximum:
            raise InputError(f"{name} must be between {rule.minimum} and {rule.maximum}, got {side}; "
                             f"this pipeline takes {rule.describe()}")
        if side % m:
            raise InputError(f"{name} must be a multiple of {m}, got {side} (try {side // m * m}); "
                             f"this pipeline takes {rule.describe()}")
        sides.append(side)
    h, w = sides
    if rule.fixed is not None and (h, w) != rule.fixed:
        raise InputError(f"this engine was compiled with static shapes for height {rule.fixed[0]} and width "
                         f"{rule.fixed[1]} and takes no other size, got {h}x{w}; compile it without "
                         "--height/--width to take any size")
    return h, w


def init_image_size(rule: SizeRule, image_size: tuple[int, int], height: int | None = None,
                    width: int | None = None) -> tuple[int, int]:
    """The (height, width) an init image of ``image_size`` (width, height, as PIL gives it) is
    resized to: the size asked for, else (per side) a static engine's size, else the image's
    own rounded down to the allowed multiple (diffusers' ``get_default_height_width``)."""
    iw, ih = image_size
    if rule.fixed is not None:
        height = rule.fixed[0] if height is None else height
        width = rule.fixed[1] if width is None else width
    m = rule.multiple
    h = ih // m * m if height is None else height
    w = iw // m * m if width is None else width
    if h < rule.minimum or w < rule.minimum:
        raise InputError(f"the init image is {iw}x{ih} (width x height), smaller than the smallest size this "
                         f"pipeline takes ({rule.minimum}x{rule.minimum}); pass height and width to enlarge it")
    return h, w

