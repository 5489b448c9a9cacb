"""Read a model's eval preprocessing from timm or transformers into a :class:`Preprocessing`.

The result goes into the artifact's manifest, and the runtime replays it with
:func:`enginekit.runtimes.preprocess.preprocess`. Anything the runtime cannot
reproduce exactly is a :class:`SourceError` here, at export time, rather than a
quiet accuracy loss on the edge box.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from enginekit.errors import SourceError
from enginekit.runtimes.preprocess import INTERPOLATIONS, Preprocessing

__all__ = ["config_backend", "from_timm", "from_timm_data_config", "from_transformers", "from_transformers_config"]

# timm.data.constants; repeated so that translating a stored data config needs no timm.
_TIMM_DEFAULT_CROP_PCT = 0.875
_TIMM_DEFAULT_CROP_MODE = "center"

# PIL.Image.Resampling values, as transformers stores them in preprocessor_config.json.
_PIL_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# Class defaults of transformers' ViTImageProcessor, used for keys a ViT config leaves out.
_VIT_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 2,
    "do_center_crop": None,
    "crop_size": None,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5),
    "do_pad": None,
    "default_to_square": True,
}
_VIT_TYPES = {"ViTImageProcessor", "ViTImageProcessorPil", "ViTImageProcessorFast", "ViTFeatureExtractor"}
# Keys that carry no preprocessing semantics (or that we handle: see from_transformers_config).
_IGNORED_KEYS = {
    "image_processor_type", "feature_extractor_type", "processor_class", "_processor_class",
    "do_convert_rgb", "data_format", "input_data_format", "return_tensors", "device",
    "disable_grouping", "image_seq_length", "pad_size", "backend", "use_fast",
}  # fmt: skip
# Methods whose transformers base implementation the translation assumes.
_BACKEND_METHODS = (
    "_preprocess", "resize", "center_crop", "rescale", "normalize",
    "rescale_and_normalize", "process_image", "convert_to_rgb",
)  # fmt: skip


def from_timm(model: Any) -> Preprocessing:
    """The eval preprocessing timm's ``create_transform(**data_config)`` applies for ``model``."""
    from timm.data import resolve_model_data_config

    return from_timm_data_config(resolve_model_data_config(model))


def from_timm_data_config(data_config: Mapping[str, Any]) -> Preprocessing:
    """Translate a timm data config (``input_size``, ``interpolation``, ``mean``,
    ``std``, ``crop_pct``, ``crop_mode``) the way ``transforms_imagenet_eval`` reads it."""
    try:
        channels, height, width = (int(v) for v in data_config["input_size"])
        interpolation = str(data_config["interpolation"])
        mean = tuple(float(v) for v in data_config["mean"])
        std = tuple(float(v) for v in data_config["std"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(f"timm data config is incomplete or malformed ({exc!r})") from exc
    if channels != 3 or len(mean) != 3 or len(std) != 3:
        raise SourceError(f"timm model takes {channels} channels; only RGB (3) models are supported")
    if interpolation not in INTERPOLATIONS:
        raise SourceError(f"timm interpolation {interpolation!r} is not supported (one of {tuple(INTERPOLATIONS)})")
    crop_pct = data_config.get("crop_pct") or _TIMM_DEFAULT_CROP_PCT
    crop_mode = data_config.get("crop_mode") or _TIMM_DEFAULT_CROP_MODE
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    common = dict(
        size=(height, width),
        interpolation=interpolation,
        center_crop=True,
        crop_offset="round",  # torchvision CenterCrop
        rescale_factor=1 / 255,
        mean=mean,
        std=std,
        source="timm",
    )
    if crop_mode == "squash":
        return Preprocessing(resize="exact", resize_size=scale, **common)
    if crop_mode == "border":
        # ResizeKeepRatio(longest=1) then CenterCropOrPad, padding with the mean colour.
        fill = tuple(round(255 * v) for v in mean)
        return Preprocessing(resize="keep_ratio", resize_size=scale, resize_longest=1.0, pad_fill=fill, **common)
    if crop_mode != "center":
        raise SourceError(f"timm crop_mode {crop_mode!r} is not supported (center, squash or border)")
    if scale[0] == scale[1]:
        return Preprocessing(resize="shortest_edge", resize_size=(scale[0],), **common)
    return Preprocessing(resize="keep_ratio", resize_size=scale, resize_longest=0.0, **common)


def from_transformers(processor: Any) -> Preprocessing:
    """The preprocessing a transformers image processor applies (ViT-style processors).

    The PIL backend (``ViTImageProcessorPil``) resizes with Pillow; the torchvision
    backend (``ViTImageProcessor``, what ``AutoImageProcessor`` returns by default in
    transformers 5) resizes uint8 tensors with torchvision's antialiased kernels, a
    uint8 level from Pillow's in places: the result's ``resize_kernel`` says which,
    and the runtime replays either bit for bit (bilinear and bicubic).
    """
    try:
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
    except ImportError as exc:  # transformers 4.x has no backends module
        raise SourceError(f"transformers image processors need transformers 5 here ({exc})") from exc
    name = type(processor).__name__
    base = next((b for b in (PilBackend, TorchvisionBackend) if isinstance(processor, b)), None)
    if base is None:
        raise SourceError(f"{name}: not a transformers PIL or torchvision image processor")
    for method in _BACKEND_METHODS:
        ours, theirs = getattr(type(processor), method, None), getattr(base, method, None)
        if ours is not theirs:
            raise SourceError(f"{name}: overrides {method}(), a custom preprocessing enginekit cannot replay")
    config: dict[str, Any] = {"image_processor_type": name}
    kernel = "pil" if base is PilBackend else "torchvision"
    keys = set(_VIT_DEFAULTS) | set(getattr(type(processor), "valid_kwargs", object).__annotations__)
    for key in sorted(keys):
        value = getattr(processor, key, None)
        if value is not None and key in ("size", "crop_size", "pad_size"):
            # A SizeDict lists every key it knows, most of them None.
            value = {k: v for k, v in dict(value).items() if v is not None}
        if value is not None:
            config[key] = value
    return _translate(config, name, kernel)


def config_backend(config: Mapping[str, Any]) -> str:
    """Which transformers backend ``AutoImageProcessor`` would load for this
    ``preprocessor_config.json``: ``pil`` or ``torchvision``. The config's own word
    first (``backend``, ``use_fast``, a ``...Pil``/``...Fast`` type), else the installed
    transformers' default (torchvision in transformers 5 when torchvision is installed)."""
    import importlib.util

    backend = str(config.get("backend") or "").lower()
    if backend in ("pil", "torchvision"):
        return backend
    if config.get("use_fast") is False:
        return "pil"
    kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
    if kind.endswith("Pil"):
        return "pil"
    if kind.endswith("Fast") or config.get("use_fast") is True:
        return "torchvision"
    try:
        from transformers.image_processing_backends import TorchvisionBackend  # noqa: F401  (transformers 5)
    except ImportError:
        return "pil"
    return "torchvision" if importlib.util.find_spec("torchvision") is not None else "pil"


def from_transformers_config(config: Mapping[str, Any], backend: str | None = None) -> Preprocessing:
    """Translate a ``preprocessor_config.json`` dict without instantiating a processor.

    Keys a ViT config leaves out take ``ViTImageProcessor``'s defaults; a config
    of another processor type must spell out every setting. ``backend`` (``pil`` or
    ``torchvision``) is the processor followed; by default the one ``AutoImageProcessor``
    loads for this config (:func:`config_backend`).
    """
    kind = config.get("image_processor_type") or config.get("feature_extractor_type") or "ViTImageProcessor"
    if kind not in _VIT_TYPES:
        missing = [k for k in ("do_resize", "size", "resample", "do_rescale", "do_normalize") if k not in config]
        if missing:
            raise SourceError(
                f"{kind}: preprocessor config has no {missing[0]!r}, and only ViT defaults are known; "
                "use from_transformers(AutoImageProcessor.from_pretrained(...)) instead"
            )
    if backend is None:
        backend = config_backend(config)
        if backend == "torchvision" and config.get("resample", 2) not in (2, 3):
            # torchvision's other filters are not replayed: follow the PIL processor (recorded)
            backend = "pil"
    if backend not in ("pil", "torchvision"):
        raise SourceError(f"image processor backend {backend!r} is not one of pil, torchvision")
    return _translate({**_VIT_DEFAULTS, **config}, kind, backend)


def _translate(config: Mapping[str, Any], name: str, kernel: str = "pil") -> Preprocessing:
    for key, value in config.items():
        if key in _VIT_DEFAULTS or key in _IGNORED_KEYS:
            continue
        # Unknown switches that are on (do_reduce_labels, crop_pct, ...) change the pixels.
        if value or not key.startswith("do_"):
            raise SourceError(f"{name}: setting {key}={value!r} is not supported by enginekit preprocessing")
    if config.get("do_pad"):
        raise SourceError(f"{name}: do_pad=True (padded batches) is not supported; the model input must be fixed size")
    square = config.get("default_to_square", True)
    crop = _hw(config.get("crop_size"), True, name, "crop_size") if config.get("do_center_crop") else None
    if config.get("do_resize"):
        resize, resize_size = _resize_mode(config["size"], square, name)
    elif crop is not None:
        resize, resize_size = "none", ()
    else:
        raise SourceError(f"{name}: do_resize=False without a center crop gives inputs of varying size")
    if crop is None and resize != "exact":
        raise SourceError(f"{name}: size {config['size']!r} without a center crop gives inputs of varying size")
    mean = std = None
    if config.get("do_normalize"):
        mean, std = _per_channel(config["image_mean"], name), _per_channel(config["image_std"], name)
    try:
        return Preprocessing(
            size=crop if crop is not None else resize_size,
            resize=resize,
            resize_size=resize_size,
            interpolation=_interpolation(config.get("resample"), name),
            center_crop=crop is not None,
            # transformers: (h - crop_h) // 2; its torchvision backend pads the odd pixel after
            crop_offset="floor_after" if kernel == "torchvision" else "floor",
            rescale_factor=float(config["rescale_factor"]) if config.get("do_rescale") else None,
            mean=mean,
            std=std,
            # transformers composites alpha onto white when it converts. With
            # do_convert_rgb unset it would feed grayscale or RGBA as they are (and
            # fail to normalize them); converting only changes what would fail.
            alpha_background=(255, 255, 255),
            source="transformers",
            resize_kernel=kernel if config.get("do_resize") else "pil",
        )
    except ValueError as exc:
        raise SourceError(f"{name}: {exc}") from exc


def _resize_mode(size: Any, square: bool, name: str) -> tuple[str, tuple[int, ...]]:
    if isinstance(size, int) and not square:
        return "shortest_edge", (size,)
    if isinstance(size, Mapping) and set(size) == {"shortest_edge"}:
        return "shortest_edge", (int(size["shortest_edge"]),)
    return "exact", _hw(size, square, name, "size")


def _hw(size: Any, square: bool, name: str, key: str) -> tuple[int, int]:
    """(height, width) from a transformers size: int, [h, w] or {"height", "width"}."""
    if isinstance(size, int) and not isinstance(size, bool) and square:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, Mapping) and set(size) == {"height", "width"}:
        return int(size["height"]), int(size["width"])
    raise SourceError(f"{name}: {key}={size!r} is not supported (use height/width or shortest_edge)")


def _per_channel(value: Any, name: str) -> tuple[float, ...]:
    values = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) != 3:
        raise SourceError(f"{name}: mean/std {value!r} is not one value per RGB channel")
    return values


def _interpolation(resample: Any, name: str) -> str:
    if resample is None:
        return "bilinear"  # both transformers backends fall back to bilinear
    if isinstance(resample, int):  # PIL.Image.Resampling / PILImageResampling are IntEnums
        found = _PIL_RESAMPLE_NAMES.get(int(resample))
    else:  # torchvision InterpolationMode, or a name
        found = str(getattr(resample, "value", resample)).lower()
    if found not in INTERPOLATIONS:
        raise SourceError(f"{name}: resample={resample!r} is not supported (one of {tuple(INTERPOLATIONS)})")
    return found
