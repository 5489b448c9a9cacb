"""The A1111 surface clients probe (options and switching the current model, the lists,
cmd-flags, ping, png-info), the generation parameters every PNG carries (server and CLI),
the progress preview, skip, and Triton's statistics and repository index, through httpx
against the ASGI app."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")

from PIL import Image  # noqa: E402

from enginekit import __version__  # noqa: E402
from enginekit.manifest import read_manifest  # noqa: E402
from enginekit.serve.app import create_app  # noqa: E402
from enginekit.serve.settings import ServeSettings  # noqa: E402
from enginekit.serve.testing import AppRunner  # noqa: E402

from .test_serve import assert_error, b64, png  # noqa: E402


@pytest.fixture(scope="module")
def sd_path(tiny_pipelines: dict) -> Path:
    return tiny_pipelines[("tiny-sd15", "onnx")]


@pytest.fixture(scope="module")
def server(sd_path: Path):
    # Two names for one artifact: enough to switch between, at one artifact's load time.
    settings = ServeSettings(max_upload_pixels=100_000, max_steps=50, host="0.0.0.0", port=7860)
    with AppRunner(create_app({"sd": sd_path, "other": sd_path}, settings)) as runner:
        yield runner


def _chunk(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.info["parameters"]


def _png_info(server: AppRunner, data: bytes) -> dict:
    r = server.post("/sdapi/v1/png-info", json={"image": b64(data)})
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------- options

def test_options_switch_the_model_a_following_txt2img_runs(server: AppRunner, sd_path: Path) -> None:
    digest = read_manifest(sd_path).digest()
    options = server.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "sd" and options["sd_checkpoint_hash"] == digest
    assert (options["samples_format"], options["CLIP_stop_at_last_layers"], options["eta_noise_seed_delta"],
            options["sd_vae"]) == ("png", 1, 0, "Automatic")
    try:
        # Unknown options are accepted and ignored, as A1111 does; a fixed one may be repeated.
        r = server.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other", "some_extension_option": [1],
                                                   "samples_format": "png", "sd_vae": "None"})
        assert r.status_code == 200 and r.json()["sd_model_checkpoint"] == "other", r.text
        assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other"
        r = server.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "seed": 5})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sd_model_name"] == "other" and "Model: other" in info["infotexts"][0]
        # /v1/generate names no model either: with two pipelines served it takes the default too.
        r = server.post("/v1/generate", json={"prompt": "x", "steps": 1, "seed": 1, "response_format": "json"})
        assert r.status_code == 200 and r.json()["model"] == "other", r.text
        # An override still wins; a model may be named by its title or hash, as A1111's aliases do.
        r = server.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 1, "seed": 5,
                                                   "override_settings": {"sd_model_checkpoint": "sd"}})
        assert json.loads(r.json()["info"])["sd_model_name"] == "sd"
        for alias in (f"other [{digest[:10]}]", digest[:10], digest):
            r = server.post("/sdapi/v1/options", json={"sd_model_checkpoint": alias})
            assert r.status_code == 200 and r.json()["sd_model_checkpoint"] in ("sd", "other"), r.text
    finally:
        server.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd"})
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd"


@pytest.mark.parametrize("body, needle", [
    ({"sd_model_checkpoint": "nope"}, "'nope' (served: sd, other)"),
    ({"sd_model_checkpoint": 5}, "sd_model_checkpoint: expected str"),
    ({"CLIP_stop_at_last_layers": "2"}, "CLIP_stop_at_last_layers: expected int"),
    ({"CLIP_stop_at_last_layers": True}, "CLIP_stop_at_last_layers: expected int"),
    ({"enable_pnginfo": 1}, "enable_pnginfo: expected bool"),
    ({"samples_format": "jpg"}, "samples_format"),
    ({"eta_noise_seed_delta": 31337}, "eta_noise_seed_delta"),
    ([1, 2], "body"),
])
def test_options_refuse_unknown_models_and_wrong_types(server: AppRunner, body, needle: str) -> None:
    assert_error(server.post("/sdapi/v1/options", json=body), 422, needle)
    assert server.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sd"  # nothing half-applied


# ---------------------------------------------------------------------------- the lists and flags

def test_the_lists_clients_probe(server: AppRunner, sd_path: Path) -> None:
    digest = read_manifest(sd_path).digest()
    models = server.get("/sdapi/v1/sd-models").json()
    assert [(m["model_name"], m["hash"], m["sha256"]) for m in models] == [("sd", digest[:10], digest),
                                                                          ("other", digest[:10], digest)]
    schedulers = server.get("/sdapi/v1/schedulers").json()
    assert [s["label"] for s in schedulers] == ["Automatic", "Karras"]
    assert set(schedulers[0]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    assert server.get("/sdapi/v1/loras").json() == []
    assert [u["name"] for u in server.get("/sdapi/v1/upscalers").json()] == ["None"]
    assert server.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    flags = server.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["listen"] is True and flags["port"] == 7860
    assert server.get("/internal/ping").json() == {}


# ---------------------------------------------------------------------------- PNG parameters and png-info

def test_every_server_png_carries_its_parameters(server: AppRunner, sd_path: Path) -> None:
    digest = read_manifest(sd_path).digest()
    r = server.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse, at dusk", "negative_prompt": "blurry",
                                               "steps": 3, "cfg_scale": 6, "seed": 11, "sampler_name": "Euler a",
                                               "batch_size": 2})
    assert r.status_code == 200, r.text
    images = [base64.b64decode(im) for im in r.json()["images"]]
    texts = [_chunk(im) for im in images]
    assert texts == json.loads(r.json()["info"])["infotexts"]
    assert texts[0] == ("a lighthouse, at dusk\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 6.0, "
                        f"Seed: 11, Size: 64x64, Model hash: {digest[:10]}, Model: sd, Batch size: 2, Batch pos: 0, "
                        f"enginekit: {__version__}")
    assert "Batch pos: 1" in texts[1]
    # png-info reads it back, as A1111 parses it.
    got = _png_info(server, images[0])
    assert got["info"] == texts[0] and got["items"] == {}
    assert got["parameters"]["Prompt"] == "a lighthouse, at dusk" and got["parameters"]["Seed"] == "11"
    assert (got["parameters"]["Size-1"], got["parameters"]["Model hash"]) == ("64", digest[:10])
    # /v1/generate's PNG: the values that ran, the model's own where the request left them unset.
    r = server.post("/v1/generate", json={"prompt": "a boat", "steps": 2, "seed": 3, "model": "sd"})
    params = _png_info(server, r.content)["parameters"]
    assert params["Steps"] == "2" and params["Seed"] == "3" and params["Sampler"] and params["CFG scale"]
    assert "Negative prompt" in params and params["Negative prompt"] == ""
    # img2img says how much it repainted; the SSE stream's images carry the text too.
    r = server.post("/sdapi/v1/img2img", json={"prompt": "a dog", "steps": 2, "seed": 4, "denoising_strength": 0.5,
                                               "init_images": [b64(png(4, size=(64, 64)))]})
    assert "Denoising strength: 0.5" in _chunk(base64.b64decode(r.json()["images"][0]))
    r = server.post("/v1/generate", json={"prompt": "a boat", "steps": 1, "seed": 3, "model": "sd",
                                          "response_format": "sse"})
    done = json.loads(r.text.strip().split("\n\n")[-1].split("\n")[1][len("data: "):])
    assert "Seed: 3" in _chunk(base64.b64decode(done["images"][0]))


def test_png_info_reads_jpeg_exif_and_data_urls(server: AppRunner) -> None:
    from enginekit.runtimes.png_info import image_bytes

    text = "a cat\nSteps: 3, Sampler: Euler, CFG scale: 7.0, Seed: 9, Size: 16x16"
    jpeg = image_bytes(Image.new("RGB", (16, 16)), text, "JPEG")
    r = server.post("/sdapi/v1/png-info", json={"image": "data:image/jpeg;base64," + b64(jpeg)})
    assert r.status_code == 200 and r.json()["info"] == text and r.json()["parameters"]["Seed"] == "9", r.text
    got = _png_info(server, png(1))  # an image without parameters
    assert got == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize("body, status, needle", [
    ({"image": b64(b"not an image at all")}, 415, "image 0"),
    ({"image": "%%% not base64"}, 422, "image: not valid base64"),
    ({"image": 5}, 422, "image"),
    ({}, 422, "image"),
    ({"image": b64(png(2, size=(400, 400)))}, 413, "pixels"),
])
def test_png_info_refuses_what_is_not_an_image(server: AppRunner, body: dict, status: int, needle: str) -> None:
    assert_error(server.post("/sdapi/v1/png-info", json=body), status, needle)


def test_cli_images_carry_parameters_that_png_info_reads(server: AppRunner, sd_path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(sd_path), "a red barn", "-o", str(tmp_path / "b.png"),
                                      "--steps", "2", "--seed", "21", "--negative", "fog", "--num-images", "2"])
    assert result.exit_code == 0, result.output
    got = _png_info(server, (tmp_path / "b-2.png").read_bytes())
    params = got["parameters"]
    assert (params["Prompt"], params["Negative prompt"], params["Steps"], params["Seed"]) == ("a red barn", "fog",
                                                                                             "2", "21")
    assert params["Model"] == sd_path.name and params["Batch pos"] == "1" and params["enginekit"] == __version__
    # A JPEG carries the same as its EXIF UserComment.
    result = CliRunner().invoke(cli, ["generate", str(sd_path), "a red barn", "-o", str(tmp_path / "b.jpg"),
                                      "--steps", "1", "--seed", "21"])
    assert result.exit_code == 0, result.output
    assert _png_info(server, (tmp_path / "b.jpg").read_bytes())["parameters"]["Seed"] == "21"


# ---------------------------------------------------------------------------- progress preview and skip

def test_progress_previews_the_running_generation_and_skip_stops_it(sd_path: Path) -> None:
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(warmup=False))) as runner:
        jobs = runner.state.slots["sd"].jobs
        original = jobs.progress

        def progress(job, step, steps):
            time.sleep(0.05)
            original(job, step, steps)

        jobs.progress = progress

        async def run(client):
            task = asyncio.ensure_future(client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 40}))
            seen, skipped = [], None
            deadline = time.monotonic() + 30
            while not task.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                r = (await client.get("/sdapi/v1/progress")).json()
                seen.append(r)
                if r["current_image"]:
                    bare = (await client.get("/sdapi/v1/progress", params={"skip_current_image": "true"})).json()
                    skipped = (bare, (await client.post("/sdapi/v1/skip")).json())
                    break
            return await task, seen, skipped

        answer, seen, skipped = runner.run(run)
        assert skipped is not None, seen[-3:]
        bare, stopped = skipped
        assert bare["current_image"] is None and stopped == {"interrupted": ["sd"]}
        assert_error(answer, 400, "cancelled")
        preview = Image.open(io.BytesIO(base64.b64decode(seen[-1]["current_image"])))
        assert preview.format == "PNG" and preview.size == (64, 64) and preview.mode == "RGB"
        idle = runner.get("/sdapi/v1/progress").json()
        assert idle["current_image"] is None and idle["state"]["job_count"] == 0
        assert_error(runner.get("/sdapi/v1/progress", params={"skip_current_image": "maybe"}), 422,
                     "skip_current_image")


# ---------------------------------------------------------------------------- Triton statistics and index

def test_statistics_count_what_the_models_answered(server: AppRunner) -> None:
    before = server.get("/v2/models/sd/stats").json()["model_stats"][0]
    r = server.post("/v1/generate", json={"prompt": "stats", "steps": 1, "seed": 1, "model": "sd", "num_images": 2,
                                          "response_format": "json"})
    assert r.status_code == 200, r.text
    after = server.get("/v2/models/sd/stats").json()["model_stats"][0]
    stats = after["inference_stats"]
    assert after["name"] == "sd" and after["version"] == "1" and after["last_inference"] > 0
    assert after["execution_count"] == before["execution_count"] + 1
    assert after["inference_count"] == before["inference_count"] + 2
    assert stats["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert stats["compute_infer"]["ns"] > before["inference_stats"]["compute_infer"]["ns"]
    assert stats["success"]["ns"] >= stats["compute_infer"]["ns"] and stats["queue"]["count"] >= 1
    assert {"fail", "compute_input", "compute_output"} <= set(stats)
    assert any(b["batch_size"] == 2 for b in after["batch_stats"])
    every = server.get("/v2/models/stats").json()["model_stats"]
    assert [m["name"] for m in every] == ["sd", "other"]
    assert server.post("/v2/models/stats").json()["model_stats"] == every
    assert server.get("/v2/models/sd/versions/1/stats").json()["model_stats"][0]["name"] == "sd"
    assert_error(server.get("/v2/models/nope/stats"), 404, "nope")
    assert_error(server.get("/v2/models/sd/versions/2/stats"), 404, "version")


def test_repository_index_lists_every_model_and_its_state(server: AppRunner) -> None:
    want = [{"name": "sd", "version": "1", "state": "READY"}, {"name": "other", "version": "1", "state": "READY"}]
    assert server.post("/v2/repository/index").json() == want
    assert server.post("/v2/repository/index", json={"ready": True}).json() == want
    assert_error(server.post("/v2/repository/index", json={"ready": "yes"}), 400, "ready")
    assert_error(server.post("/v2/repository/index", content=b"{nope"), 400, "JSON")
