"""ControlNet at run time, as diffusers' ``StableDiffusion(XL)ControlNetPipeline`` runs it, without torch.

A pipeline exported with ``--controlnet`` holds each ControlNet as a component and a UNet that
takes the down- and mid-block residuals as inputs. Per step, each ControlNet whose guidance
window covers the step runs on the step's scaled latents, the prompt and its control image, and
its residuals, times its ``controlnet_conditioning_scale``, are summed into the UNet's. A call
without a control image feeds zeros: the plain UNet's image.

The control image is given ready-made (edges, pose, depth map) and prepared as diffusers'
``control_image_processor`` does: RGB, resized to the output size with Lanczos, in [0, 1];
without ``height``/``width`` (and no init image), the first control image's size, rounded down
to the pipeline's multiple, is the output's. ``control_guidance_start``/``_end`` (fractions of
the steps) switch a ControlNet on and off as diffusers' ``controlnet_keep`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from enginekit.errors import InputError

__all__ = ["ControlArgs", "Control", "check_control", "MAX_CONDITIONING_SCALE"]

#: ``controlnet_conditioning_scale`` is taken in [-MAX, MAX] (A1111's weights run 0-2).
MAX_CONDITIONING_SCALE = 10.0


@dataclass(frozen=True)
class ControlArgs:
    """One call's checked ControlNet arguments: per ControlNet its image (1, 3, H, W in [0, 1]),
    scale and guidance window."""

    images: tuple[Any, ...]
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]


def _per_net(name: str, value: Any, count: int) -> list[float]:
    from enginekit.runtimes.tasks.call_args import float_in

    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise InputError(f"{name} has {len(values)} values for {count} ControlNet(s)")
    low = -MAX_CONDITIONING_SCALE if name == "controlnet_conditioning_scale" else 0.0
    high = MAX_CONDITIONING_SCALE if name == "controlnet_conditioning_scale" else 1.0
    return [float_in(name, v, low, high) for v in values]


def control_images(control_image: Any, nets: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The caller's control image(s) as PIL images, one per ControlNet."""
    from enginekit.errors import ImageError
    from enginekit.runtimes.images import load_images

    items = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if not nets:
        raise InputError("control_image: this pipeline has no ControlNet (export it with --controlnet)")
    if len(items) != len(nets):
        raise InputError(f"control_image: {len(items)} image(s) for {len(nets)} ControlNet(s); give one each")
    try:
        return [im.convert("RGB") for im in load_images(items)]
    except ImageError as exc:
        raise InputError(f"control_image: {exc}") from None


def check_control(cfg: Any, control_image: Any, scale: Any, start: Any, end: Any) -> list[Any] | None:
    """The control images (PIL, one per ControlNet) after the other arguments are checked, or
    None for a call without one; arguments that need an image without one are refused."""
    nets = cfg.extra.get("controlnets") or []
    given = {"controlnet_conditioning_scale": scale != 1.0, "control_guidance_start": start != 0.0,
             "control_guidance_end": end != 1.0}
    if control_image is None:
        asked = [k for k, v in given.items() if v]
        if asked:
            raise InputError(f"{asked[0]} steers a ControlNet: give a control_image too")
        return None
    images = control_images(control_image, nets)
    starts, ends = _per_net("control_guidance_start", start, len(nets)), _per_net("control_guidance_end", end, len(nets))
    _per_net("controlnet_conditioning_scale", scale, len(nets))
    for s, e in zip(starts, ends):
        if s >= e:
            raise InputError(f"control_guidance_start ({s}) must be below control_guidance_end ({e})")
    return images


def control_args(images: Sequence[Any], nets: Sequence[Any], height: int, width: int, scale: Any, start: Any,
                 end: Any) -> ControlArgs:
    """The control images at the call's size (diffusers' control_image_processor) and the per-net values."""
    from PIL import Image

    arrays = []
    for im in images:
        im = im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS)
        arrays.append((np.asarray(im, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None])
    n = len(nets)
    return ControlArgs(tuple(arrays), tuple(_per_net("controlnet_conditioning_scale", scale, n)),
                       tuple(_per_net("control_guidance_start", start, n)), tuple(_per_net("control_guidance_end", end, n)))


class Control:
    """One call's ControlNet residuals: zeros without a control image, else each ControlNet's
    output per step, scaled and summed."""

    def __init__(self, pipe: Any, args: ControlArgs | None, batch: int, two_pass: bool) -> None:
        extra = pipe.config.extra
        self.pipe = pipe
        self.nets = [n["component"] for n in extra.get("controlnets") or []]
        self.layout = [(r["name"], int(r["channels"]), int(r["factor"])) for r in extra["controlnet_residuals"]]
        self.args = args
        rows = batch * (2 if two_pass else 1)
        # The image repeated per image of the batch, then for CFG's two halves (diffusers' prepare_image).
        self.images = [np.concatenate([np.repeat(a, batch, axis=0)] * (2 if two_pass else 1)).astype(np.float32)
                       for a in args.images] if args is not None else []
        self.rows = rows
        self._idle: dict[str, np.ndarray] | None = None

    def zeros(self, height: int, width: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((self.rows, ch, -(-height // f), -(-width // f)), np.float32)
                for name, ch, f in self.layout}

    def residuals(self, i: int, steps: int, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The UNet's residual inputs for step ``i`` of ``steps`` (``feeds``: the UNet's other inputs)."""
        h, w = feeds["sample"].shape[-2:]
        if self.args is None:  # no control image: the same zeros every step, made once
            if self._idle is None:
                self._idle = self.zeros(h, w)
            return self._idle
        out = self.zeros(h, w)
        for net, image, scale, start, end in zip(self.nets, self.images, self.args.scales, self.args.starts,
                                                 self.args.ends):
            keep = 1.0 - float(i / steps < start or (i + 1) / steps > end)
            if keep * scale == 0.0:
                continue
            got = self.pipe.run_component(net, {**feeds, "controlnet_cond": image})
            for name in out:
                out[name] += np.float32(scale * keep) * got[name].astype(np.float32)
        return out
