"""Inpainting through every surface: ``/v1/generate`` (JSON and multipart uploads), A1111's
``/sdapi/v1/img2img`` mask fields and ``enginekit generate --mask`` give the image the Python
call gives; bad masks answer one line naming the field, and the next request still works."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

import enginekit  # noqa: E402
from enginekit.serve import ServeSettings, create_app  # noqa: E402
from enginekit.serve.testing import AppRunner  # noqa: E402

from ..conftest import make_mask, make_photo  # noqa: E402

PROMPT = "a red fox in the snow"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _b64(image) -> str:
    return base64.b64encode(_png(image)).decode()


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def inp_path(inpainting: dict) -> Path:
    return inpainting[("tiny-sd15-inpainting", "onnx")]


@pytest.fixture(scope="module")
def pipe(inp_path: Path):
    return enginekit.load(inp_path, device="cpu")


@pytest.fixture(scope="module")
def server(inp_path: Path):
    with AppRunner(create_app({"inp": inp_path}, ServeSettings(warmup=False))) as runner:
        yield runner


PHOTO, MASK = make_photo((72, 64), seed=5), make_mask((36, 32), (8, 6, 26, 22))


def test_generate_json_and_multipart_match_the_python_call(server: AppRunner, pipe) -> None:
    want = np.asarray(pipe(PROMPT, image=PHOTO, mask_image=MASK, num_inference_steps=3, seed=4).images[0])
    r = server.post("/v1/generate", json={"prompt": PROMPT, "steps": 3, "seed": 4, "init_image": _b64(PHOTO),
                                          "mask_image": _b64(MASK)})
    assert r.status_code == 200, r.text
    assert np.array_equal(_pixels(r.content), want)
    files = {"init_image": ("photo.png", _png(PHOTO), "image/png"), "mask_image": ("mask.png", _png(MASK), "image/png")}
    r = server.post("/v1/generate", data={"prompt": PROMPT, "steps": "3", "seed": "4"}, files=files)
    assert r.status_code == 200, r.text
    assert np.array_equal(_pixels(r.content), want)
    crop = np.asarray(pipe(PROMPT, image=PHOTO, mask_image=MASK, padding_mask_crop=4, height=32, width=32,
                           num_inference_steps=3, seed=4).images[0])
    r = server.post("/v1/generate", json={"prompt": PROMPT, "steps": 3, "seed": 4, "init_image": _b64(PHOTO),
                                          "mask_image": _b64(MASK), "padding_mask_crop": 4, "height": 32, "width": 32})
    assert r.status_code == 200, r.text
    assert _pixels(r.content).shape == (64, 72, 3) and np.array_equal(_pixels(r.content), crop)


@pytest.mark.parametrize(
    ("fields", "status", "needle"),
    [
        ({"mask_image": "MASK"}, 422, "mask_image: inpainting repaints part of an init_image"),
        ({"init_image": "PHOTO", "mask_image": base64.b64encode(b"not an image").decode()}, 415, "mask_image:"),
        ({"init_image": "PHOTO", "mask_image": "%%%"}, 422, "mask_image: not valid base64"),
        ({"init_image": "PHOTO", "padding_mask_crop": 4}, 422, "padding_mask_crop"),
        ({"init_image": "PHOTO", "mask_image": "MASK", "padding_mask_crop": -2}, 422, "padding_mask_crop"),
    ],
)
def test_generate_refuses_bad_masks_naming_the_field(server: AppRunner, fields: dict, status: int,
                                                     needle: str) -> None:
    body = {"prompt": PROMPT, "steps": 2, **{k: {"PHOTO": _b64(PHOTO), "MASK": _b64(MASK)}.get(v, v)
                                             for k, v in fields.items()}}
    r = server.post("/v1/generate", json=body)
    assert r.status_code == status and needle in r.json()["error"], r.text
    assert server.post("/v1/generate", json={"prompt": PROMPT, "steps": 2, "seed": 1}).status_code == 200


def test_a1111_img2img_mask_fields(server: AppRunner, pipe) -> None:
    from enginekit.serve.sdapi_inpaint import fill

    def a1111(**fields) -> np.ndarray:
        body = {"prompt": PROMPT, "steps": 3, "seed": 9, "sampler_name": "Euler", "init_images": [_b64(PHOTO)],
                "mask": _b64(MASK), "mask_blur": 0, "denoising_strength": 1.0, **fields}
        r = server.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 200, r.text
        return _pixels(base64.b64decode(r.json()["images"][0]))

    def ours(**kwargs) -> np.ndarray:
        call = {"image": PHOTO, "mask_image": MASK, "strength": 1.0, **kwargs}
        return np.asarray(pipe(PROMPT, num_inference_steps=3, seed=9, scheduler="euler", **call).images[0])

    # "original", whole picture; then "only masked" with its padding; then A1111's default fill.
    assert np.array_equal(a1111(inpainting_fill=1, inpaint_full_res=False), ours())
    assert np.array_equal(a1111(inpainting_fill=1, inpaint_full_res_padding=6, width=32, height=32),
                          ours(padding_mask_crop=6, width=32, height=32))
    filled = fill(PHOTO, MASK.resize(PHOTO.size))
    assert np.array_equal(a1111(inpaint_full_res=False), ours(image=filled))
    inverted = a1111(inpainting_fill=1, inpaint_full_res=False, inpainting_mask_invert=1)
    assert not np.array_equal(inverted, ours())
    # Latent noise / nothing change only what strength 1 ignores: refused below it, in one line.
    r = server.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "steps": 2, "init_images": [_b64(PHOTO)],
                                               "mask": _b64(MASK), "inpainting_fill": 2, "denoising_strength": 0.5})
    assert r.status_code == 422 and "inpainting_fill" in r.json()["error"], r.text
    r = server.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "steps": 2, "init_images": [_b64(PHOTO)],
                                               "mask": "bm90IGFuIGltYWdl"})
    assert r.status_code == 415 and r.json()["error"].startswith("mask:"), r.text


def test_cli_generate_with_a_mask(inp_path: Path, pipe, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    PHOTO.save(tmp_path / "photo.png")
    MASK.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["generate", str(inp_path), PROMPT, "--init-image", str(tmp_path / "photo.png"), "--mask",
            str(tmp_path / "mask.png"), "--steps", "3", "--seed", "4", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    want = np.asarray(pipe(PROMPT, image=PHOTO, mask_image=MASK, num_inference_steps=3, seed=4).images[0])
    assert np.array_equal(_pixels(out.read_bytes()), want)
    result = CliRunner().invoke(cli, ["generate", str(inp_path), PROMPT, "--mask", str(tmp_path / "mask.png"),
                                      "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--mask is for image-to-image and inpainting" in result.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(cli, ["generate", str(inp_path), PROMPT, "--init-image", str(tmp_path / "photo.png"),
                                      "--mask", str(bad), "-o", str(tmp_path / "y.png")])
    assert result.exit_code != 0 and "mask_image:" in result.output and not (tmp_path / "y.png").exists()
