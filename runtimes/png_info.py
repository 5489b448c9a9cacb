"""AUTOMATIC1111's generation parameters ("infotext"), written into the images we make and
read back from any image: the de-facto format that A1111's PNG Info tab, its forks and the
tools written for them parse.

The text is A1111's ``create_infotext`` (``modules/processing.py``)::

    a lighthouse at dusk
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e,
    Model: sd, enginekit: 0.1.0

(the parameters on one line in the text itself).

A PNG carries it as its ``parameters`` text chunk (tEXt; iTXt when the text is not
Latin-1, as Pillow and A1111 write it); a JPEG or WebP as its EXIF UserComment ("UNICODE"
and UTF-16 big-endian, as A1111's piexif writes it). :func:`parse_infotext` is A1111's
``parse_generation_parameters`` without the UI's defaults. Torch-free: the server and the
CLI both use it.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, replace
from typing import IO, Any, Mapping

__all__ = ["GenerationParams", "A1111_SAMPLERS", "sampler_label", "format_infotext", "parse_infotext",
           "save_image", "image_bytes", "read_image_info", "lora_hashes"]

#: A1111 sampler names -> our schedulers (what ``/sdapi/v1/samplers`` lists and txt2img takes).
A1111_SAMPLERS = {"Euler": "euler", "Euler a": "euler-a", "DDIM": "ddim", "DPM++ 2M": "dpm++2m",
                  "DPM++ 2M Karras": "dpm++2m-karras", "LCM": "lcm"}

#: Our schedulers -> the infotext's (Sampler, Schedule type), as A1111 1.9+ writes them; flow
#: matching's Euler is written as Forge writes it for SD3 and FLUX.
_LABELS = {"euler": ("Euler", None), "euler-a": ("Euler a", None), "ddim": ("DDIM", None),
           "dpm++2m": ("DPM++ 2M", None), "dpm++2m-karras": ("DPM++ 2M", "Karras"), "lcm": ("LCM", None),
           "flow-euler": ("Euler", None)}

_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_UNICODE = b"UNICODE\0"
# A1111's re_param: `Key: value` or `Key: "quoted, value"`, comma separated; without its
# leading \s* and with keys of at most 81 characters (A1111's are short): the same pairs in
# linear time, where A1111's own takes seconds on 40 KB of spaces or of words without a colon.
_PARAM = re.compile(r'(\w[\w \-/]{0,80}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
#: Image.info keys that are not text chunks (A1111's read_info_from_image drops the same).
_NOT_TEXT = frozenset({"exif", "jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "loop", "background",
                       "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
                       "photoshop", "transparency", "gamma", "aspect", "srgb", "xmp"})


def sampler_label(scheduler: str) -> tuple[str, str | None]:
    """A1111's (Sampler, Schedule type) for one of our schedulers (its own name when unknown)."""
    return _LABELS.get(scheduler, (scheduler, None))


@dataclass(frozen=True)
class GenerationParams:
    """What made one image, as the values actually used (the model's defaults where the caller
    left a value unset)."""

    prompt: str
    negative_prompt: str | None
    steps: int
    scheduler: str
    cfg_scale: float
    seed: int | None
    width: int
    height: int
    model: str
    model_hash: str | None = None
    #: Image-to-image only: how much of the init image was repainted.
    denoising_strength: float | None = None
    #: Several images from one seed: how many, and which this one is (A1111's older keys).
    batch_size: int = 1
    batch_pos: int = 0
    version: str | None = None
    #: A1111's ``Lora hashes``: "name: shorthash, ..." of the LoRA files applied (:func:`lora_hashes`).
    lora_hashes: str | None = None

    def at(self, position: int) -> GenerationParams:
        """The same for image ``position`` of the batch."""
        return replace(self, batch_pos=position)

    def infotext(self) -> str:
        sampler, schedule = sampler_label(self.scheduler)
        params: dict[str, Any] = {
            "Steps": self.steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": self.cfg_scale,
            "Seed": self.seed, "Size": f"{self.width}x{self.height}", "Model hash": self.model_hash,
            "Model": self.model, "Batch size": self.batch_size if self.batch_size > 1 else None,
            "Batch pos": self.batch_pos if self.batch_size > 1 else None,
            "Denoising strength": self.denoising_strength, "Lora hashes": self.lora_hashes or None,
            "enginekit": self.version or _version()}
        return format_infotext(self.prompt, self.negative_prompt, params)


def lora_hashes(applied: Any) -> str | None:
    """A1111's ``Lora hashes`` value for the LoRA files a call applied (``PipelineOutput.loras``):
    ``name: shorthash`` joined by ", ", the name without A1111's removed symbols (":" and ",");
    the short hash is A1111's, the first 12 hex digits of the file's sha256 past its header."""
    parts = [f"{str(r['name']).translate({ord(':'): None, ord(','): None})}: {r['short_hash']}"
             for r in applied or () if r.get("short_hash")]
    return ", ".join(parts) or None


def _version() -> str:
    from enginekit import __version__

    return __version__


def _quote(value: Any) -> str:
    """A1111's quote(): JSON for a value holding ',', ':' or a newline, else as is."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def format_infotext(prompt: str, negative_prompt: str | None, params: Mapping[str, Any]) -> str:
    """The prompt, a ``Negative prompt:`` line when there is one, then ``Key: value, ...``
    (None values left out), exactly as A1111's ``create_infotext`` joins them."""
    line = ", ".join(k if k == v else f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's ``parse_generation_parameters``: ``Prompt``, ``Negative prompt`` and each
    ``Key: value`` of the last line as strings (``Size`` also split into ``Size-1`` and
    ``Size-2``). A last line holding fewer than three parameters is part of the prompt."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
        size = _SIZE.match(value)
        if size is not None:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
    return out


def save_image(image: Any, file: IO[bytes], fmt: str = "PNG", infotext: str | None = None) -> None:
    """Save a PIL ``image`` as ``fmt`` carrying ``infotext``: a PNG's ``parameters`` text chunk,
    a JPEG's or WebP's EXIF UserComment; other formats without it."""
    fmt = fmt.upper()
    if infotext is None:
        image.save(file, format=fmt)
    elif fmt == "PNG":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)  # iTXt when the text is not Latin-1
        image.save(file, format=fmt, pnginfo=info)
    elif fmt in ("JPEG", "WEBP"):
        from PIL import Image

        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE + infotext.encode("utf-16-be")
        image.save(file, format=fmt, exif=exif.tobytes())
    else:
        image.save(file, format=fmt)


def image_bytes(image: Any, infotext: str | None = None, fmt: str = "PNG") -> bytes:
    """:func:`save_image` into bytes."""
    buf = io.BytesIO()
    save_image(image, buf, fmt, infotext)
    return buf.getvalue()


def read_image_info(image: Any) -> tuple[str | None, dict[str, str]]:
    """An opened PIL image's generation parameters (its ``parameters`` text chunk, else its
    EXIF UserComment; None when it has neither) and its other text chunks."""
    items = {k: v for k, v in (image.info or {}).items()
             if isinstance(k, str) and isinstance(v, str) and k.lower() not in _NOT_TEXT}
    text = items.pop("parameters", None)
    if text is None:
        comment = _user_comment(image)
        if comment:
            text = comment
    return text, items


def _user_comment(image: Any) -> str | None:
    try:
        raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # a damaged EXIF block is no parameters, not an error
        return None
    if isinstance(raw, str):
        return raw or None
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    prefix, body = raw[:8], raw[8:]
    try:
        if prefix == _UNICODE:
            return body.decode("utf-16-be").rstrip("\0") or None
        return body.decode("ascii" if prefix.startswith(b"ASCII") else "utf-8").rstrip("\0") or None
    except UnicodeDecodeError:
        return None
