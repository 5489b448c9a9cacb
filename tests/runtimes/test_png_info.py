"""A1111's generation parameters: written as A1111 writes them, parsed as A1111 parses them,
carried by PNG, JPEG and WebP; and the cheap latent preview's maps."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from enginekit.runtimes.png_info import (GenerationParams, format_infotext, image_bytes, parse_infotext,
                                         read_image_info)

# The example in A1111's parse_generation_parameters docstring.
A1111_EXAMPLE = ("girl with an artist's beret, determined, blue eyes, desert scene\n"
                 "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry]\n"
                 "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")


def test_parses_a1111s_own_example() -> None:
    got = parse_infotext(A1111_EXAMPLE)
    assert got["Prompt"] == "girl with an artist's beret, determined, blue eyes, desert scene"
    assert got["Negative prompt"] == "ugly, fat, obese, chubby, (((deformed))), [blurry]"
    assert got["Steps"] == "20" and got["Sampler"] == "Euler a" and got["Seed"] == "965400086"
    assert (got["Size"], got["Size-1"], got["Size-2"], got["Model hash"]) == ("512x512", "512", "512", "45dee52b")


def test_formats_as_create_infotext_and_round_trips() -> None:
    params = GenerationParams(prompt="a lighthouse,\nat dusk", negative_prompt="blurry", steps=20,
                              scheduler="dpm++2m-karras", cfg_scale=7.0, seed=42, width=640, height=512,
                              model="sd, v1: test", model_hash="0123456789", denoising_strength=0.5, version="9.9")
    text = params.infotext()
    assert text.splitlines()[-1] == ('Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, '
                                     'Size: 640x512, Model hash: 0123456789, Model: "sd, v1: test", '
                                     'Denoising strength: 0.5, enginekit: 9.9')
    got = parse_infotext(text)
    assert got["Prompt"] == "a lighthouse,\nat dusk" and got["Negative prompt"] == "blurry"
    assert got["Model"] == "sd, v1: test" and got["Schedule type"] == "Karras" and got["enginekit"] == "9.9"
    # No negative prompt: no line for it; a batch names each image's place.
    text = GenerationParams("cat", None, 4, "euler-a", 1.0, 7, 64, 64, "m", batch_size=2, version="1").at(1).infotext()
    assert text == "cat\nSteps: 4, Sampler: Euler a, CFG scale: 1.0, Seed: 7, Size: 64x64, Model: m, Batch size: 2, " \
                   "Batch pos: 1, enginekit: 1"
    assert format_infotext("only a prompt", "", {}) == "only a prompt"
    assert parse_infotext("a prompt\nwith: two lines")["Prompt"] == "a prompt\nwith: two lines"


def test_parsing_a_hostile_text_takes_linear_time() -> None:
    import time

    for text in (" " * 200_000 + "x", "word " * 40_000, "prompt\n" + "a: b, " * 40_000):
        t0 = time.perf_counter()
        parse_infotext(text)
        assert time.perf_counter() - t0 < 5.0  # a bound on the growth, not a speed: A1111's pattern takes minutes


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_every_written_format_carries_the_text(fmt: str) -> None:
    text = "ünïcödé prompt 😀\nNegative prompt: x\nSteps: 3, Sampler: Euler, CFG scale: 7.0, Seed: 1"
    data = image_bytes(Image.new("RGB", (16, 16), "red"), text, fmt)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == fmt
        got, items = read_image_info(image)
    assert got == text and "exif" not in items
    plain = image_bytes(Image.new("RGB", (8, 8)))
    assert read_image_info(Image.open(io.BytesIO(plain))) == (None, {})


def test_latent_preview_maps_each_latent_space() -> None:
    from enginekit.runtimes.tasks.layouts.clip import ClipLayout
    from enginekit.runtimes.tasks.layouts.flux import FluxLayout
    from enginekit.runtimes.tasks.preview import latent_rgb, preview_rgb

    assert latent_rgb(4, 0.18215).name == "sd1" and latent_rgb(4, 0.13025).name == "sdxl"
    assert latent_rgb(16, 1.5305).name == "sd3" and latent_rgb(16, 0.3611).name == "flux"
    assert latent_rgb(4, 0.5).name == "sd1" and latent_rgb(16, 1.0) is None and latent_rgb(32, 1.0) is None
    sd = SimpleNamespace(latent_channels=4, vae_scaling_factor=0.18215, vae_scale_factor=8)
    pipe = SimpleNamespace(config=sd, layout=ClipLayout(sd))
    rgb = preview_rgb(pipe, np.zeros((2, 4, 6, 5), np.float32), 48, 40)
    assert rgb.shape == (48, 40, 3) and rgb.dtype == np.uint8 and (rgb == 127).all()
    # FLUX's packed tokens come back to the grid of the shape asked for (3 x 2 patches here).
    flux = SimpleNamespace(latent_channels=16, vae_scaling_factor=0.3611, vae_scale_factor=8)
    pipe = SimpleNamespace(config=flux, layout=FluxLayout(flux))
    assert preview_rgb(pipe, np.zeros((1, 6, 64), np.float32), 48, 32).shape == (48, 32, 3)
    odd = SimpleNamespace(latent_channels=16, vae_scaling_factor=1.0, vae_scale_factor=8)
    assert preview_rgb(SimpleNamespace(config=odd, layout=ClipLayout(odd)), np.zeros((1, 16, 2, 2)), 16, 16) is None
