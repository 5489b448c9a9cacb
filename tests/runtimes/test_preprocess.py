"""Pixel parity of enginekit's torch-free preprocessing with timm and transformers.

Photo-like test images are drawn in-process (seeded), saved as JPEG and PNG, and
each goes through our ``load_images`` + ``preprocess`` and through the model
library's own eval transform. The PIL paths match bit for bit (we assert 1e-6).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image, ImageDraw

from enginekit.errors import ImageError, ManifestError, SourceError
from enginekit.runtimes.images import expand_image_paths, load_images
from enginekit.runtimes.preprocess import Preprocessing, preprocess, resized_size

TOL = 1e-6

# (width, height, mode); RGBA goes to PNG only (JPEG has no alpha).
# 321x240 and 200x256 put the crop offset on an odd .5 (banker's rounding rounds up).
PHOTOS = [
    (640, 480, "RGB"), (300, 500, "RGB"), (384, 384, "RGB"), (100, 37, "RGB"), (321, 240, "L"), (200, 256, "RGBA"),
]  # fmt: skip


def _photo(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """Smooth gradients, flat shapes, sensor noise and text: what resizing finds hard."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 17 + y / 29)], axis=-1) * 255
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(5, width // 2 + 6)), y0 + int(rng.integers(5, height // 2 + 6)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    for row in range(0, height, 14):
        draw.text((2, row), "enginekit 0123 ViT |/|\\ WMW", fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image).astype(np.float64) + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = np.clip(rng.normal(128, 90, (height, width)), 0, 255).astype(np.uint8)
        alpha[: height // 3] = 255  # opaque and transparent parts both
        image.putalpha(Image.fromarray(alpha))
    return image.convert(mode)


@pytest.fixture(scope="module")
def photo_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for seed, (width, height, mode) in enumerate(PHOTOS):
        image = _photo(width, height, mode, seed)
        stem = f"{width}x{height}_{mode}"
        image.save(folder / f"{stem}.png")
        paths.append(folder / f"{stem}.png")
        if mode != "RGBA":
            image.save(folder / f"{stem}.jpg", quality=90)
            paths.append(folder / f"{stem}.jpg")
    return paths


# ---------------------------------------------------------------- references


def _timm_case(data_config: dict[str, Any], cfg: Preprocessing | None = None) -> tuple[Preprocessing, Callable]:
    from timm.data import create_transform

    from enginekit.export.preprocessing import from_timm_data_config

    transform = create_transform(**data_config, is_training=False)
    # timm's datasets open images with .convert("RGB"); its transform expects RGB.
    return cfg or from_timm_data_config(data_config), lambda p: transform(Image.open(p).convert("RGB")).numpy()


def _pretrained_data_config(name: str) -> dict[str, Any]:
    # The pretrained cfg resolves like the model would, without building the model.
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    return resolve_data_config(pretrained_cfg=get_pretrained_cfg(name).to_dict())


def _transformers_case(processor: Any) -> tuple[Preprocessing, Callable]:
    from enginekit.export.preprocessing import from_transformers

    def reference(path: Path) -> np.ndarray:
        # do_convert_rgb: unset, transformers fails on grayscale/RGBA (see from_transformers).
        return processor(Image.open(path), do_convert_rgb=True, return_tensors="np")["pixel_values"][0]

    return from_transformers(processor), reference


@pytest.fixture(scope="module")
def tiny_timm_model() -> Any:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False)  # crop_pct 0.9, bicubic


def _case(name: str, model: Any) -> tuple[Preprocessing, Callable]:
    from timm.data import resolve_model_data_config
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from enginekit.export.preprocessing import from_timm

    if name == "timm-vit_small_patch16_384":
        return _timm_case(_pretrained_data_config("vit_small_patch16_384"))
    if name == "timm-vit_tiny_patch16_224-model":
        return _timm_case(resolve_model_data_config(model), from_timm(model))
    deit = _pretrained_data_config("deit_tiny_patch16_224")  # crop_pct 0.875 would do as well
    variants = {
        "timm-deit_tiny_patch16_224": {},
        "timm-squash-0.875": {"crop_mode": "squash", "crop_pct": 0.875},
        "timm-border-0.9": {"crop_mode": "border", "crop_pct": 0.9},
        "timm-non-square-224x160": {"input_size": (3, 224, 160), "interpolation": "bilinear"},
    }
    if name in variants:
        return _timm_case({**deit, **variants[name]})
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    processors = {
        "transformers-pil-default": {},
        "transformers-pil-384-bicubic": {"size": {"height": 384, "width": 384}, "resample": 3, **imagenet},
        "transformers-pil-shortest-edge-crop": {
            "size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": 225, "resample": 1,
        },
        "transformers-pil-crop-pads": {"size": {"height": 180, "width": 201}, "do_center_crop": True, "crop_size": 224},
    }  # fmt: skip
    if name.startswith("transformers-tv-"):  # the same settings, transformers 5's default torchvision backend
        from transformers import ViTImageProcessor

        settings = dict(processors[name.replace("-tv-", "-pil-")])
        if settings.get("resample") == 1:  # lanczos: torchvision's is not replayed; bilinear instead
            settings["resample"] = 2
        return _transformers_case(ViTImageProcessor(**settings))
    return _transformers_case(ViTImageProcessorPil(**processors[name]))


CASES = [
    "timm-vit_small_patch16_384",
    "timm-vit_tiny_patch16_224-model",
    "timm-deit_tiny_patch16_224",
    "transformers-pil-default",
    "transformers-pil-384-bicubic",
    "transformers-tv-default",
    "transformers-tv-384-bicubic",
]
# Modes no shipped ViT uses: run on the odd-sized RGB photos only, to keep the file fast.
EXTRA_CASES = [
    "timm-squash-0.875",
    "timm-border-0.9",
    "timm-non-square-224x160",
    "transformers-pil-shortest-edge-crop",
    "transformers-pil-crop-pads",
    "transformers-tv-shortest-edge-crop",
    "transformers-tv-crop-pads",
]


@pytest.mark.parametrize("name", CASES + EXTRA_CASES)
def test_matches_reference(name: str, photo_paths: list[Path], tiny_timm_model: Any) -> None:
    cfg, reference = _case(name, tiny_timm_model)
    if name in EXTRA_CASES:
        photo_paths = [p for p in photo_paths if p.stem.startswith(("300x500_RGB", "100x37_RGB"))]
    ours = preprocess(load_images(photo_paths), cfg)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == (len(photo_paths), 3, *cfg.size)
    for path, got in zip(photo_paths, ours):
        ref = reference(path)
        assert ref.shape == got.shape, path.name
        assert np.abs(got - ref).max() <= TOL, f"{name} on {path.name}: max abs diff {np.abs(got - ref).max()}"
    assert Preprocessing.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_both_transformers_backends_are_followed_and_recorded(photo_paths: list[Path], tmp_path: Path) -> None:
    """transformers 5's default ViTImageProcessor resizes uint8 tensors with torchvision's
    antialiased kernels (15-bit fixed point), ViTImageProcessorPil with Pillow's (22-bit):
    they differ by a uint8 level in places. Each translation replays its own processor
    (the parametrized cases above check the pixels: torchvision's within float rounding of
    its fused rescale+normalize) and says which it follows; the two disagree with each other."""
    from transformers import ViTImageProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from enginekit.export.preprocessing import config_backend, from_transformers, from_transformers_config

    fast, slow = from_transformers(ViTImageProcessor()), from_transformers(ViTImageProcessorPil())
    assert (fast.resize_kernel, slow.resize_kernel) == ("torchvision", "pil")
    assert fast.to_dict()["resize_kernel"] == "torchvision" and "resize_kernel" not in slow.to_dict()
    images = load_images(photo_paths)
    assert np.abs(preprocess(images, fast) - preprocess(images, slow)).max() > TOL  # the kernels really differ
    # a saved folder follows what AutoImageProcessor loads for it, unless its config says otherwise
    saved = {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}}
    assert config_backend(saved) == "torchvision" and from_transformers_config(saved).resize_kernel == "torchvision"
    assert from_transformers_config({**saved, "use_fast": False}).resize_kernel == "pil"
    assert from_transformers_config(saved, backend="pil").resize_kernel == "pil"
    with pytest.raises(SourceError, match="torchvision is replayed for bilinear, bicubic only"):
        from_transformers_config({**saved, "resample": 0}, backend="torchvision")  # nearest
    assert from_transformers_config({**saved, "resample": 0}).resize_kernel == "pil"  # followed, and recorded
    assert Preprocessing.from_dict(fast.to_dict()) == fast


def test_export_records_the_processor_it_followed(exported: dict) -> None:
    from enginekit.manifest import read_manifest

    manifest = read_manifest(exported["hf"])  # saved with transformers 5's ViTImageProcessor
    assert manifest.provenance["image_processor"] == {"type": "ViTImageProcessor", "backend": "torchvision"}
    assert manifest.preprocessing["resize_kernel"] == "torchvision"
    assert "resize_kernel" not in read_manifest(exported["timm"]).preprocessing  # timm: Pillow, as timm does


def test_to_dict_is_plain_json() -> None:
    from enginekit.export.preprocessing import from_timm_data_config

    cfg = from_timm_data_config(_pretrained_data_config("vit_small_patch16_384"))
    assert cfg.to_dict() == {
        "size": [384, 384], "resize": "shortest_edge", "resize_size": [384], "interpolation": "bicubic",
        "center_crop": True, "rescale_factor": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
        "resize_max_size": None, "resize_longest": 0.0, "crop_offset": "round", "pad_fill": [0, 0, 0],
        "convert_rgb": True, "alpha_background": None, "source": "timm",
    }  # fmt: skip


def test_resized_size_matches_torchvision() -> None:
    from torchvision.transforms.functional import _compute_resized_output_size

    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w, edge = (int(v) for v in rng.integers(1, 3000, 3))
        max_size = int(edge + rng.integers(1, 500)) if rng.random() < 0.5 else None
        cfg = Preprocessing(
            size=(1, 1), resize="shortest_edge", resize_size=(edge,), resize_max_size=max_size,
            interpolation="bilinear", center_crop=True, rescale_factor=None, mean=None, std=None,
        )  # fmt: skip
        assert list(resized_size(h, w, cfg)) == _compute_resized_output_size((h, w), [edge], max_size)


# ------------------------------------------------------------ config errors


def test_from_dict_names_the_bad_field() -> None:
    good = Preprocessing(
        size=(224, 224), resize="exact", resize_size=(224, 224), interpolation="bilinear",
        center_crop=False, rescale_factor=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3,
    ).to_dict()  # fmt: skip
    cases = {
        "interpolation": {**good, "interpolation": "cubic"},
        "size": {**good, "size": [224]},
        "std": {**good, "std": [0.5, 0.0, 0.5]},
        "resize": {**good, "resize": "fit"},
        "colour": {**good, "colour": "rgb"},
    }
    for field, data in cases.items():
        with pytest.raises(ManifestError, match=field):
            Preprocessing.from_dict(data)
    missing = dict(good)
    del missing["mean"]
    with pytest.raises(ManifestError, match="missing field 'mean'"):
        Preprocessing.from_dict(missing)


def test_transformers_config_translation_and_refusals(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, ViTImageProcessor

    from enginekit.export.preprocessing import from_transformers, from_transformers_config

    # google/vit-base-patch16-224's preprocessor_config.json (an int size means square).
    hub = {"do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "resample": 2, "size": 224, "feature_extractor_type": "ViTFeatureExtractor"}  # fmt: skip
    expected = from_transformers(ViTImageProcessor())
    assert from_transformers_config(hub) == expected
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert from_transformers(AutoImageProcessor.from_pretrained(tmp_path)) == expected
    for bad, why in [
        ({"do_pad": True}, "do_pad"),
        ({"do_resize": False}, "varying size"),
        ({"size": {"shortest_edge": 224}}, "varying size"),
        ({"size": {"shortest_edge": 224, "longest_edge": 400}}, "not supported"),
        ({"crop_pct": 0.875}, "crop_pct"),
        ({"do_reduce_labels": True}, "do_reduce_labels"),
        ({"image_processor_type": "ConvNextImageProcessor", "size": 224}, "ViT defaults"),
    ]:
        with pytest.raises(SourceError, match=why):
            from_transformers_config({**hub, **bad})


# ---------------------------------------------------------------- images.py


def test_bad_images_raise_one_line_errors(tmp_path: Path, photo_paths: list[Path]) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture\n")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(next(p for p in photo_paths if p.suffix == ".jpg").read_bytes()[:3000])
    cases = [
        (text, "notes.jpg: not an image"),
        (truncated, "cut.jpg: corrupt or truncated"),
        (tmp_path / "gone.png", "gone.png: no such file"),
        (tmp_path, "is a folder"),
        (np.zeros((8, 8, 3), dtype=np.float32), "item 0 .*float32.*uint8"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), r"item 0 .*\(2, 8, 8, 3\)"),
        (np.zeros((8, 8, 2), dtype=np.uint8), "item 0"),
        (42, "item 0: not an image"),
    ]
    for item, message in cases:
        with pytest.raises(ImageError, match=message) as info:
            load_images([item])
        assert "\n" not in str(info.value)
    with pytest.raises(ImageError, match="not an image") as info:
        load_images([text])
    assert info.value.__cause__ is not None


def test_arrays_bytes_and_pil_images_load() -> None:
    rng = np.random.default_rng(0)
    shapes = {(5, 7): "L", (5, 7, 1): "L", (5, 7, 3): "RGB", (5, 7, 4): "RGBA"}
    for shape, mode in shapes.items():
        (image,) = load_images([rng.integers(0, 256, shape, dtype=np.uint8)])
        assert (image.mode, image.size) == (mode, (7, 5))
    pil = Image.new("RGB", (3, 4))
    assert load_images([pil])[0] is pil
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    assert load_images(buffer.getvalue())[0].size == (3, 4)


def test_exif_orientation_is_not_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_images([tmp_path / "rotated.jpg"])[0].size == (40, 20)


def test_expand_image_paths(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "sub/z.webp", "sub/c.jpeg", "notes.txt", ".hidden/x.png", "sub/._y.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    single = tmp_path / "notes.txt"
    found = expand_image_paths([tmp_path, single])
    expected = ["a.JPG", "b.png", "sub/c.jpeg", "sub/z.webp", "notes.txt"]
    assert [p.relative_to(tmp_path).as_posix() for p in found] == expected
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="empty: folder holds no images"):
        expand_image_paths([tmp_path / "empty"])
    with pytest.raises(ImageError, match="missing.jpg: no such file or folder"):
        expand_image_paths([tmp_path / "missing.jpg"])


def test_runtime_modules_import_without_torch() -> None:
    code = (
        "import sys, enginekit.runtimes.preprocess, enginekit.runtimes.images\n"
        "print([m for m in ('torch', 'timm', 'transformers', 'torchvision') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
