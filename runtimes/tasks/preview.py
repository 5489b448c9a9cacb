"""A cheap look at a generation in progress: the denoiser's latents turned into RGB by one
linear map per latent channel (no VAE call), the "latent2RGB" previews of ComfyUI
(``comfy/latent_formats.py``, ``latent_rgb_factors``) and A1111's "Approx cheap".

The map belongs to a VAE's latent space, which its channel count and scaling factor name;
a VAE we have no factors for gets no preview (None). What is previewed is the current
latents: noise at the first steps, the picture emerging as the steps go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LatentRGB", "latent_rgb", "preview_rgb"]


@dataclass(frozen=True)
class LatentRGB:
    """One latent space's linear map to RGB in [-1, 1]: ``rgb = latents . factors + bias``."""

    name: str
    channels: int
    scaling_factor: float
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)


# ComfyUI's published factors (comfy/latent_formats.py), keyed by the VAE that made the latents.
_SPACES = (
    LatentRGB("sd1", 4, 0.18215, ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350),
                                  (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))),
    LatentRGB("sdxl", 4, 0.13025, ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068),
                                   (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
              (0.1084, -0.0175, -0.0011)),
    LatentRGB("sd3", 16, 1.5305, (
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189)), (0.2394, 0.2135, 0.1925)),
    LatentRGB("flux", 16, 0.3611, (
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778)), (-0.0329, -0.0718, -0.0851)),
)


def latent_rgb(channels: int, scaling_factor: float) -> LatentRGB | None:
    """The map for latents of ``channels`` channels from a VAE with this scaling factor; for
    4-channel latents of another VAE, SD 1.x's (the SD 2.x VAE is the same); None otherwise."""
    for space in _SPACES:
        if space.channels == channels and math.isclose(space.scaling_factor, scaling_factor, rel_tol=1e-3):
            return space
    return _SPACES[0] if channels == 4 else None


def _grid(tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """Packed latents' token grid (rows, columns): the factor pair of ``tokens`` nearest the
    aspect ratio asked for (the sides the pipeline ran may be rounded from it)."""
    pairs = [(r, tokens // r) for r in range(1, tokens + 1) if tokens % r == 0]
    if not pairs:
        return None
    aspect = height / max(width, 1)
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(aspect)))


def preview_rgb(pipe: Any, latents: np.ndarray, height: int, width: int, index: int = 0) -> np.ndarray | None:
    """Image ``index`` of ``latents`` (as a pipeline's step callback gets them) as a uint8
    H x W x 3 array at the image's size (each latent pixel repeated, nearest); None when the
    pipeline's VAE has no known map. ``height`` x ``width``: the size asked for (packed
    latents are unpacked to the nearest grid of that shape)."""
    config, layout = pipe.config, pipe.layout
    space = latent_rgb(config.latent_channels, config.vae_scaling_factor)
    if space is None or latents is None:
        return None
    one = np.asarray(latents[index:index + 1], dtype=np.float32)
    if layout.packs_latents:
        grid = _grid(one.shape[1], height, width)
        if grid is None:
            return None
        step = layout.size_multiple
        one = layout.unpack(one, grid[0] * step, grid[1] * step)
    if one.ndim != 4 or one.shape[1] != space.channels:
        return None
    rgb = np.einsum("chw,cr->hwr", one[0], np.asarray(space.factors, np.float32)) + np.asarray(space.bias, np.float32)
    pixels = np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8)
    f = config.vae_scale_factor
    return np.repeat(np.repeat(pixels, f, axis=0), f, axis=1)
