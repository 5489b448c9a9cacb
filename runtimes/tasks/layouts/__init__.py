"""Runtime layouts: one class per prompt/denoiser shape, chosen by the manifest's ``layout``
(or, in manifests written before it, ``prompt_layout``). Torch-free.

- :class:`ClipLayout` (``clip``): SD 1.x/2.x/XL, LCM.
- :class:`SD3Layout` (``sd3``): CLIP-L + CLIP-G + T5, MMDiT.
- :class:`FluxLayout` (``flux``): packed latents, rotary ids, distilled guidance, true CFG.

A new shape is one ``@register_layout`` class; :class:`TextToImage` names none of them.
"""

from __future__ import annotations

from enginekit.runtimes.tasks.layouts.base import (Guidance, Layout, get_layout, guidance_scale_embedding,
                                                   layout_for, layout_names, pack_latents, register_layout,
                                                   rescale_noise_cfg, unpack_latents)
from enginekit.runtimes.tasks.layouts.clip import ClipLayout
from enginekit.runtimes.tasks.layouts.flux import FluxLayout
from enginekit.runtimes.tasks.layouts.sd3 import SD3Layout

__all__ = ["Layout", "Guidance", "ClipLayout", "SD3Layout", "FluxLayout", "register_layout", "get_layout",
           "layout_names", "layout_for", "pack_latents", "unpack_latents", "guidance_scale_embedding", "rescale_noise_cfg"]
