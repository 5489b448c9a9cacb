"""LoRA at run time on the server and the CLI: ``serve --lora-dir``'s names in ``/v1/generate``'s
``loras`` and in A1111 prompts' ``<lora:NAME:WEIGHT>`` give the library call's image, with A1111's
``Lora hashes`` in the infotext; ``/sdapi/v1/loras`` lists the folder; unknown names are 422s;
``generate --lora FILE:SCALE`` writes the library call's image."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")

from PIL import Image  # noqa: E402

from enginekit.serve.app import create_app  # noqa: E402
from enginekit.serve.settings import ServeSettings  # noqa: E402
from enginekit.serve.testing import AppRunner  # noqa: E402

from .test_serve import b64  # noqa: F401,E402

_CALL = dict(num_inference_steps=2, guidance_scale=7.5, height=64, width=64, seed=7, scheduler="euler")


def write_unet_lora(artifact: Path, path: Path, seed: int = 0) -> Path:
    """A diffusers/PEFT-format LoRA (rank 4) on the attention of the artifact's denoiser (a UNet, or
    SD3's and FLUX's transformer), built with numpy from the artifact's own weight map (no torch)."""
    from safetensors.numpy import save_file

    maps = json.loads((artifact / "lora_map.json").read_text())["components"]
    denoiser = "unet" if "unet" in maps else "transformer"
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, entry in maps[denoiser].items():
        if name.endswith(("attn1.to_q", "attn2.to_v", "attn1.to_out.0", "attn.to_q", "attn.to_v")):
            out, inp = entry["shape"][:2]
            tensors[f"{denoiser}.{name}.lora_A.weight"] = (rng.standard_normal((4, inp)) * 0.3).astype(np.float32)
            tensors[f"{denoiser}.{name}.lora_B.weight"] = (rng.standard_normal((out, 4)) * 0.3).astype(np.float32)
    assert tensors, f"no attention projection in {denoiser}'s map"
    save_file(tensors, str(path), metadata={"ss_output_name": "ink-style"})
    return path


@pytest.fixture(scope="module")
def sd_path(tiny_pipelines: dict) -> Path:
    return tiny_pipelines[("tiny-sd15", "onnx")]


@pytest.fixture(scope="module")
def lora_dir(sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-dir")
    write_unet_lora(sd_path, root / "ink.safetensors")
    return root


@pytest.fixture(scope="module")
def server(sd_path: Path, lora_dir: Path):
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(lora_dir=str(lora_dir)))) as runner:
        yield runner


@pytest.fixture(scope="module")
def expected(sd_path: Path, lora_dir: Path) -> np.ndarray:
    import enginekit

    with enginekit.load(sd_path) as pipe:
        out = pipe("a lighthouse", loras={lora_dir / "ink.safetensors": 0.8}, **_CALL)
        base = pipe("a lighthouse", **_CALL)
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(base.images[0]))
    return np.asarray(out.images[0])


def _decode(data: bytes) -> tuple[np.ndarray, str]:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")), image.info.get("parameters", "")


def test_lists_the_folder_as_a1111_does(server: AppRunner, lora_dir: Path) -> None:
    (entry,) = server.get("/sdapi/v1/loras").json()
    assert entry["name"] == "ink" and entry["alias"] == "ink-style"
    assert entry["path"] == str(lora_dir / "ink.safetensors") and entry["metadata"]["ss_output_name"] == "ink-style"


def test_v1_generate_applies_loras_by_name(server: AppRunner, expected: np.ndarray, lora_dir: Path) -> None:
    from enginekit.runtimes.lora_files import read_lora

    body = {"prompt": "a lighthouse", "steps": 2, "guidance": 7.5, "height": 64, "width": 64, "seed": 7,
            "scheduler": "euler", "loras": {"ink": 0.8}}
    r = server.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    image, text = _decode(r.content)
    assert np.array_equal(image, expected)
    assert f'Lora hashes: "ink: {read_lora(lora_dir / "ink.safetensors").short_hash}"' in text
    r = server.post("/v1/generate", json={**body, "loras": {"../ink": 0.8}})
    assert r.status_code == 422 and "no LoRA named '../ink'" in r.text


def test_a1111_prompt_tags_are_applied_and_kept_in_the_infotext(server: AppRunner, expected: np.ndarray) -> None:
    import base64

    body = {"prompt": "a lighthouse <lora:ink:0.8>", "steps": 2, "cfg_scale": 7.5, "height": 64, "width": 64,
            "seed": 7, "sampler_name": "Euler"}
    r = server.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image, text = _decode(base64.b64decode(r.json()["images"][0]))
    assert np.array_equal(image, expected)
    assert text.startswith("a lighthouse <lora:ink:0.8>") and "Lora hashes: " in text
    r = server.post("/sdapi/v1/txt2img", json={**body, "prompt": "a lighthouse <lora:nope:1>"})
    assert r.status_code == 422 and "no LoRA named 'nope'" in r.text


def test_a_server_without_a_folder_refuses_loras(sd_path: Path) -> None:
    with AppRunner(create_app({"sd": sd_path}, ServeSettings())) as runner:
        assert runner.get("/sdapi/v1/loras").json() == []
        r = runner.post("/v1/generate", json={"prompt": "x", "loras": {"ink": 1.0}})
        assert r.status_code == 422 and "--lora-dir" in r.text


def test_cli_generate_lora(sd_path: Path, lora_dir: Path, expected: np.ndarray, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    out = tmp_path / "p.png"
    args = ["generate", str(sd_path), "a lighthouse", "-o", str(out), "--steps", "2", "--guidance", "7.5",
            "--height", "64", "--width", "64", "--seed", "7", "--scheduler", "euler"]
    result = CliRunner().invoke(cli, [*args, "--lora", f"{lora_dir / 'ink.safetensors'}:0.8"])
    assert result.exit_code == 0, result.output
    image, text = _decode(out.read_bytes())
    assert np.array_equal(image, expected) and 'Lora hashes: "ink: ' in text
    result = CliRunner().invoke(cli, [*args, "--lora", str(lora_dir / "missing.safetensors")])
    assert result.exit_code != 0 and "no such file" in result.output and "Traceback" not in result.output
