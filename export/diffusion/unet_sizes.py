"""Make an exported UNet take every latent size diffusers' UNet takes.

diffusers' ``UNet2DConditionModel.forward`` upsamples by a fixed factor of 2 when both latent
sides are multiples of ``2 ** num_upsamplers``; otherwise it hands each up block the size of
the skip connection it is about to meet (``down_block_res_samples[-1].shape[2:]``) and
``Upsample2D`` interpolates to that size instead. The choice is a Python ``if`` on the traced
shape, so an export traced at an even size keeps the factor-2 path (and the exporter even
narrows the symbolic sides to multiples): an odd latent side, such as 72x64 pixels at SD's
factor 8, then fails inside the engine with a Concat shape error.

:func:`carry_skip_sizes` makes the UNet always take the sized path, so the graph resizes each
upsampled tensor to its skip tensor's runtime shape. At sizes that are multiples, the skip
size is exactly twice the input, and nearest interpolation to twice the size gives the very
same numbers as ``scale_factor=2``: nothing changes for the sizes that worked before.
"""

from __future__ import annotations

from typing import Any

__all__ = ["carry_skip_sizes"]

_MARK = "_enginekit_carries_skip_sizes"


def carry_skip_sizes(unet: Any) -> bool:
    """Patch ``unet`` (in place, idempotent) so every upsampler gets its skip connection's size.

    Each downsampler's input size is recorded on the way down (those are the skip tensors'
    sizes, one per level); each upsampler takes the matching one on the way up (last in, first
    out) when diffusers passes none. ``num_upsamplers`` is set to 0 so diffusers' own test,
    ``side % 2**num_upsamplers``, is ``side % 1``: always 0, never a guard on the traced shape.

    Returns False, changing nothing, for a UNet whose down and up paths do not pair one
    downsampler with one interpolating upsampler per level (it then keeps diffusers' paths).
    """
    if getattr(unet, _MARK, False):
        return True
    downs = [m for block in getattr(unet, "down_blocks", ()) for m in (getattr(block, "downsamplers", None) or ())]
    ups = [m for block in getattr(unet, "up_blocks", ()) for m in (getattr(block, "upsamplers", None) or ())]
    if not downs or len(downs) != len(ups) or len(ups) != getattr(unet, "num_upsamplers", None):
        return False
    if any(type(m).__name__ != "Upsample2D" or not getattr(m, "interpolate", False)
           or getattr(m, "use_conv_transpose", False) for m in ups):
        return False
    sizes: list[Any] = []

    def start(_module: Any, _args: Any) -> None:
        sizes.clear()

    def record(_module: Any, args: tuple[Any, ...]) -> None:
        sizes.append(args[0].shape[2:])

    def resize_to_skip(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        size = sizes.pop()
        if len(args) > 1 and args[1] is not None or kwargs.get("output_size") is not None:
            return None  # diffusers passed the size itself (the same one)
        return (args[0], size, *args[2:]), kwargs

    unet.register_forward_pre_hook(start)
    for m in downs:
        m.register_forward_pre_hook(record)
    for m in ups:
        m.register_forward_pre_hook(resize_to_skip, with_kwargs=True)
    unet.num_upsamplers = 0
    setattr(unet, _MARK, True)
    return True
