"""A1111's inpainting fields of ``/sdapi/v1/img2img`` mapped onto the pipeline's inpainting.

- ``mask`` (base64): white is repainted; ``inpainting_mask_invert: 1`` swaps the two.
- ``mask_blur`` (pixels, A1111's default 4): the mask is blurred (Gaussian) before use, so the
  repainted region blends into the picture where it is pasted back.
- ``inpaint_full_res`` (A1111's default true, "only masked") with ``inpaint_full_res_padding``:
  only the mask's box grown by the padding is generated, at the request's size, and pasted back
  (the pipeline's ``padding_mask_crop``); false: the whole picture is generated.
- ``inpainting_fill``: 1 "original" starts from the picture as it is; 0 "fill" (A1111's
  default) first paints the masked part with the blurred colours around it, as A1111's
  ``masking.fill`` does; 2 "latent noise" and 3 "latent nothing" change only the starting latents
  under the mask, which a denoising strength of 1 ignores: they run at strength 1 (as 1) and are
  refused below it, where they would differ.
"""

from __future__ import annotations

from typing import Any

from enginekit.serve.errors import ApiError

__all__ = ["INPAINT_FIELDS", "fill", "prepare_inpainting"]

#: The A1111 img2img fields this module reads.
INPAINT_FIELDS = ("mask", "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                  "inpainting_mask_invert")
_FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def fill(image: Any, mask: Any) -> Any:
    """A1111's ``masking.fill``: the masked part painted with ever finer blurs of what is around it."""
    from PIL import Image, ImageFilter, ImageOps

    out = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def prepare_inpainting(body: Any, init: Any, mask: Any) -> tuple[Any, Any, int | None]:
    """(init image, mask, padding_mask_crop) for the pipeline from the request's A1111 fields;
    ``mask`` is the decoded upload."""
    from PIL import ImageFilter, ImageOps

    mask = mask.convert("L")
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur = 4 if body.mask_blur is None else body.mask_blur
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    if body.inpainting_fill in (2, 3) and body.denoising_strength < 1.0:
        raise ApiError(422, f"inpainting_fill: {body.inpainting_fill} ({_FILLS[body.inpainting_fill]}) runs at "
                            "denoising_strength 1 only here; use 0 (fill) or 1 (original) below it")
    if body.inpainting_fill == 0:
        init = fill(init.convert("RGB"), mask if mask.size == init.size else mask.resize(init.size))
    padding = body.inpaint_full_res_padding if body.inpaint_full_res else None
    return init, mask, padding
