"""enginekit serve through httpx against the ASGI app: KServe v2, /v1 tasks, the A1111 API,
batching, overload, timeouts, limits, readiness, authentication and metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
pytest.importorskip("prometheus_client", reason="serving needs the 'serve' extra")

import enginekit
from enginekit.serve.app import create_app
from enginekit.serve.settings import ServeSettings, parse_model_specs
from enginekit.serve.testing import AppRunner

from ..conftest import TIMM_LABELS, make_photo


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    make_photo(size, seed).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response, status: int, needle: str = "") -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert needle.lower() in body["error"].lower(), body
    return body


@pytest.fixture(scope="module")
def clf_path(exported: dict) -> Path:
    return exported["timm"]


@pytest.fixture(scope="module")
def sd_path(tiny_pipelines: dict) -> Path:
    return tiny_pipelines[("tiny-sd15", "onnx")]


@pytest.fixture(scope="module")
def reference(clf_path: Path):
    return enginekit.load(clf_path, device="cpu")


@pytest.fixture(scope="module")
def server(clf_path: Path, sd_path: Path):
    settings = ServeSettings(max_batch=4, max_delay_ms=20, max_pixels=100_000, max_upload_pixels=100_000,
                             max_images=4, max_steps=50,
                             max_prompt_chars=200, max_body_bytes=2_000_000)
    with AppRunner(create_app({"clf": clf_path, "sd": sd_path}, settings)) as runner:
        yield runner


# ---------------------------------------------------------------------------- settings

def test_model_specs_name_by_folder_or_explicitly(tmp_path: Path) -> None:
    from enginekit.errors import InputError

    assert parse_model_specs(["out/sd-ov", "clf=out/x"]) == {"sd-ov": Path("out/sd-ov"), "clf": Path("out/x")}
    for bad in ([], ["a=x", "a=y"], ["bad name=x"]):
        with pytest.raises(InputError):
            parse_model_specs(bad)
    with pytest.raises(InputError, match="max-batch"):
        ServeSettings(max_batch=0)


# ---------------------------------------------------------------------------- KServe v2

def test_health_list_and_metadata(server: AppRunner, reference) -> None:
    assert server.get("/v2/health/live").status_code == 200
    ready = server.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    names = {m["name"]: m for m in server.get("/v2/models").json()["models"]}
    assert set(names) == {"clf", "sd"} and all(m["ready"] for m in names.values())
    assert names["clf"]["labels"] == TIMM_LABELS and names["sd"]["task"] == "text-to-image"
    meta = server.get("/v2/models/clf").json()
    assert meta["name"] == "clf" and meta["versions"] == ["1"]
    h, w = reference.preprocessing.size
    assert meta["inputs"][0] == {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, h, w]}
    assert {o["name"] for o in meta["outputs"]} == {"logits", "embedding"}
    assert server.get("/v2/models/clf/ready").json()["ready"] is True
    assert server.get("/v2/models/clf/versions/1").json() == meta
    assert_error(server.get("/v2/models/nope"), 404, "nope")
    assert_error(server.get("/v2/models/clf/versions/7"), 404, "version")
    assert server.get("/v2").json()["extensions"]


def test_infer_json_and_binary_match_the_runtime(server: AppRunner, reference) -> None:
    h, w = reference.preprocessing.size
    pixels = np.random.default_rng(0).standard_normal((3, 3, h, w)).astype(np.float32)
    want = reference.run_pixels(pixels)
    body = {"id": "r1", "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape),
                                    "data": pixels.reshape(-1).tolist()}]}
    r = server.post("/v2/models/clf/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "r1" and out["logits"]["shape"] == list(want["logits"].shape)
    np.testing.assert_allclose(np.array(out["logits"]["data"]).reshape(want["logits"].shape), want["logits"],
                               rtol=1e-4, atol=1e-5)
    # The binary-data extension: a JSON header, then the raw tensor; binary outputs back.
    header = json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape),
                                     "parameters": {"binary_data_size": pixels.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                                     {"name": "logits", "parameters": {"classification": 2, "binary_data": False}}]})
    r = server.post("/v2/models/clf/infer", content=header.encode() + pixels.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    blob = r.content[n:]
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(blob)
    np.testing.assert_allclose(np.frombuffer(blob, np.float32).reshape(want["logits"].shape), want["logits"],
                               rtol=1e-4, atol=1e-5)
    top = meta["outputs"][1]
    assert top["datatype"] == "BYTES" and top["shape"] == [3, 2]
    best = want["logits"].argmax(axis=1)
    assert [s.split(":")[1:] for s in top["data"][::2]] == [[str(i), TIMM_LABELS[i]] for i in best]


def test_infer_takes_encoded_images(server: AppRunner, reference) -> None:
    images = [png(1), png(2)]
    raw = b"".join(struct.pack("<I", len(im)) + im for im in images)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]})
    r = server.post("/v2/models/clf/infer", content=header.encode() + raw,
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    got = np.array(r.json()["outputs"][0]["data"]).reshape(2, -1)
    np.testing.assert_allclose(got, reference.logits(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("body, needle", [
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "takes one input"),
    ({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}, "shape"),
    ({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [2], "data": [1]}]}, "values for shape"),
    ({"inputs": [{"name": "pixel_values", "datatype": "FP99", "shape": [1], "data": [1]}]}, "datatype"),
    ({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1], "data": ["a"]}]}, "not FP32"),
    ({"inputs": []}, "non-empty"),
    ([1, 2], "JSON object"),
])
def test_infer_refuses_bad_tensors_with_400(server: AppRunner, body, needle: str) -> None:
    assert_error(server.post("/v2/models/clf/infer", json=body), 400, needle)


def test_infer_refuses_a_binary_size_past_the_body(server: AppRunner) -> None:
    header = json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1],
                                     "parameters": {"binary_data_size": 400}}]})
    r = server.post("/v2/models/clf/infer", content=header.encode() + b"abcd",
                    headers={"Inference-Header-Content-Length": str(len(header))})
    assert_error(r, 400, "binary")
    assert_error(server.post("/v2/models/clf/infer", content=b"{", headers={"Inference-Header-Content-Length": "9"}),
                 400, "Inference-Header-Content-Length")


def test_infer_on_a_pipeline_gives_an_image(server: AppRunner) -> None:
    body = {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a red fox"]}],
            "parameters": {"steps": 2, "seed": 3}}
    r = server.post("/v2/models/sd/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "image" and out["datatype"] == "UINT8" and out["shape"][0] == 1 and out["shape"][3] == 3


# ---------------------------------------------------------------------------- /v1/classify

def test_classify_multipart_and_json_match_predict(server: AppRunner, reference) -> None:
    images = [png(10), png(11), png(12)]
    want = reference.predict(images, top_k=3)
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = server.post("/v1/classify", files=files, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [p["label"] for p in got] == [p.label for p in want]
    for g, p in zip(got, want):
        assert [t["label"] for t in g["top_k"]] == [lbl for lbl, _ in p.top_k]
        np.testing.assert_allclose([t["score"] for t in g["top_k"]], [s for _, s in p.top_k], rtol=1e-4, atol=1e-6)
    r = server.post("/v1/classify", json={"images": [b64(images[0])], "top_k": 1, "embedding": True})
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert pred["label"] == want[0].label and len(pred["top_k"]) == 1
    np.testing.assert_allclose(pred["embedding"], reference.embed(images[:1])[0], rtol=1e-4, atol=1e-5)
    # One raw image as the body works too.
    r = server.post("/v1/classify", content=images[1], headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == want[1].label


def test_classify_limits_and_bad_input(server: AppRunner) -> None:
    assert_error(server.post("/v1/classify", files=[("images", ("a.txt", b"hello", "text/plain"))]), 415, "image 0")
    big = png(1, size=(400, 400))  # 160,000 pixels: over this server's 100,000
    assert_error(server.post("/v1/classify", files=[("images", ("b.png", big, "image/png"))]), 413, "pixels")
    five = [("images", (f"{i}.png", png(i), "image/png")) for i in range(5)]
    assert_error(server.post("/v1/classify", files=five), 413, "images")
    assert_error(server.post("/v1/classify", json={"images": [b64(png(1))], "top_k": 0}), 422, "top_k")
    assert_error(server.post("/v1/classify", json={"images": ["%%%"]}), 422, "images[0]")
    assert_error(server.post("/v1/classify", json={"images": []}), 422, "images")
    assert_error(server.post("/v1/classify", json={"images": [b64(png(1))], "model": "sd"}), 422, "model")
    assert_error(server.post("/v1/classify", content=b"x" * 2_100_000, headers={"content-type": "image/png"}),
                 413, "limit")
    truncated = png(3)[:200]
    assert_error(server.post("/v1/classify", json={"images": [b64(truncated)]}), 422, "image 0")
    gif = io.BytesIO()
    make_photo((32, 32), 0).save(gif, format="ICO")
    assert_error(server.post("/v1/classify", json={"images": [b64(gif.getvalue())]}), 415, "ICO")
    assert_error(server.post("/v1/classify", content=b"{}", headers={"content-type": "text/plain"}), 415)
    assert_error(server.get("/v1/nothing"), 404, "no such endpoint")
    assert_error(server.get("/v1/classify"), 405)


# ---------------------------------------------------------------------------- batching, overload, timeouts

def test_concurrent_requests_are_batched_and_answered_individually(clf_path: Path, reference) -> None:
    images = [png(20 + i) for i in range(8)]
    want = reference.predict(images, top_k=2)
    settings = ServeSettings(max_batch=8, max_delay_ms=200, warmup=False)
    with AppRunner(create_app({"clf": clf_path}, settings)) as runner:
        async def fire(client):
            return await asyncio.gather(*[client.post("/v1/classify", json={"images": [b64(im)], "top_k": 2})
                                          for im in images])
        answers = runner.run(fire)
        assert [a.status_code for a in answers] == [200] * 8
        assert [a.json()["predictions"][0]["label"] for a in answers] == [p.label for p in want]
        for a, p in zip(answers, want):
            assert a.json()["predictions"][0]["score"] == pytest.approx(p.score, rel=1e-4, abs=1e-6)
        metrics = runner.get("/metrics").text
        count = _metric(metrics, 'enginekit_batch_size_count{model="clf"}')
        total = _metric(metrics, 'enginekit_batch_size_sum{model="clf"}')
        assert total == 8 and count < 8  # 8 images in fewer engine calls


def _metric(text: str, key: str) -> float:
    """The value of ``name{labels}`` in Prometheus text, whatever the order of its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    name, _, rest = key.partition("{")
    want = dict(kv.split("=", 1) for kv in rest.rstrip("}").split(",")) if rest else {}
    want = {k: v.strip('"') for k, v in want.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == want:
                return sample.value
    raise AssertionError(f"no sample {key} in the metrics")


def _slow(runner: AppRunner, name: str, seconds: float) -> list[int]:
    """Make a classifier's engine take ``seconds`` per batch; returns the batch sizes it ran."""
    batcher = runner.state.slots[name].batcher
    run, sizes = batcher._run, []

    def slow(rows):
        sizes.append(len(rows))
        time.sleep(seconds)
        return run(rows)

    batcher._run = slow
    return sizes


def test_full_queue_answers_503_with_retry_after_at_once(clf_path: Path, reference) -> None:
    settings = ServeSettings(max_batch=1, max_delay_ms=0, max_queue=2, warmup=False)
    image = png(5)
    want = reference.predict([image])[0]
    with AppRunner(create_app({"clf": clf_path}, settings)) as runner:
        _slow(runner, "clf", 0.3)

        async def fire(client):
            async def one():
                t0 = time.perf_counter()
                r = await client.post("/v1/classify", json={"images": [b64(image)]})
                return r, time.perf_counter() - t0
            return await asyncio.gather(*[one() for _ in range(8)])

        answers = runner.run(fire)
        codes = [r.status_code for r, _ in answers]
        assert set(codes) == {200, 503} and codes.count(200) >= 1, codes  # at least the running one; how many waited depends on timing
        for r, seconds in answers:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and seconds < 0.25 and "queue" in r.json()["error"]
            else:
                assert r.json()["predictions"][0]["label"] == want.label
        assert _metric(runner.get("/metrics").text, 'enginekit_rejections_total{model="clf",reason="queue_full"}') \
            == codes.count(503)


def test_timeout_answers_504_and_drops_the_waiting_work(clf_path: Path) -> None:
    settings = ServeSettings(max_batch=1, max_delay_ms=0, timeout_s=0.2, warmup=False)
    with AppRunner(create_app({"clf": clf_path}, settings)) as runner:
        sizes = _slow(runner, "clf", 0.5)

        async def fire(client):
            return await asyncio.gather(*[client.post("/v1/classify", json={"images": [b64(png(i))]})
                                          for i in range(3)])

        answers = runner.run(fire)
        for r in answers:
            assert_error(r, 504, "did not answer")
        time.sleep(0.6)
        assert len(sizes) == 1  # the two that timed out while waiting never ran


def test_generation_timeout_cancels_the_job(sd_path: Path) -> None:
    settings = ServeSettings(timeout_s=0.3, warmup=False)
    with AppRunner(create_app({"sd": sd_path}, settings)) as runner:
        jobs = runner.state.slots["sd"].jobs
        steps_seen: list[int] = []
        original_progress = jobs.progress

        def progress(job, step, steps):
            steps_seen.append(step)
            time.sleep(0.1)
            original_progress(job, step, steps)

        jobs.progress = progress
        r = runner.post("/v1/generate", json={"prompt": "slow", "steps": 50, "seed": 1})
        assert_error(r, 504, "cancelled")
        deadline = time.monotonic() + 5
        while jobs.current is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert jobs.current is None and len(steps_seen) < 50


# ---------------------------------------------------------------------------- /v1/generate and the A1111 API

def test_generate_png_json_and_seeds(server: AppRunner, sd_path: Path) -> None:
    from PIL import Image

    r = server.post("/v1/generate", json={"prompt": "a lighthouse", "steps": 3, "seed": 7, "guidance": 5.0})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    got = np.asarray(Image.open(io.BytesIO(r.content)))
    pipe = enginekit.load(sd_path, device="cpu")
    want = np.asarray(pipe("a lighthouse", num_inference_steps=3, seed=7, guidance_scale=5.0).images[0])
    np.testing.assert_array_equal(got, want)
    assert r.headers["x-seed"] == "7"
    r = server.post("/v1/generate", json={"prompt": "a lighthouse", "steps": 3, "seed": 7, "guidance": 5.0,
                                          "num_images": 2, "response_format": "json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 7 and len(body["images"]) == 2
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))))
    assert first.shape == want.shape


def test_generate_streams_progress_then_the_image(server: AppRunner) -> None:
    r = server.post("/v1/generate", json={"prompt": "a boat", "steps": 4, "seed": 1, "response_format": "sse"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [(block.split("\n")[0][len("event: "):], json.loads(block.split("\n")[1][len("data: "):]))
              for block in r.text.strip().split("\n\n")]
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert [d["step"] for k, d in events if k == "progress"] == [1, 2, 3, 4]
    assert events[-1][1]["images"] and events[-1][1]["seed"] == 1


def test_generate_with_a_step_cache_and_the_next_request_without(server: AppRunner) -> None:
    cached = server.post("/v1/generate", json={"prompt": "a boat", "steps": 4, "seed": 1, "cache": "deepcache:2"})
    assert cached.status_code == 200, cached.text
    plain = server.post("/v1/generate", json={"prompt": "a boat", "steps": 4, "seed": 1})
    assert plain.status_code == 200 and plain.content != cached.content


def test_image_to_image_by_upload(server: AppRunner) -> None:
    init = png(9, size=(64, 64))
    r = server.post("/v1/generate", data={"prompt": "repaint", "steps": "4", "strength": "0.5", "seed": "2"},
                    files={"init_image": ("init.png", init, "image/png")})
    assert r.status_code == 200, r.text
    from PIL import Image

    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


@pytest.mark.parametrize("fields, status, needle", [
    ({"prompt": "x", "steps": 51}, 422, "steps"),
    ({"prompt": "x" * 201}, 422, "prompt"),
    ({"prompt": "x", "width": 30}, 422, "width"),
    ({"prompt": "x", "scheduler": "pndm"}, 422, "scheduler"),
    ({"prompt": "x", "guidance": "lots"}, 422, "guidance"),
    ({"prompt": "x", "seed": -5}, 422, "seed"),
    ({"prompt": "x", "bogus": 1}, 422, "bogus"),
    ({"steps": 3}, 422, "prompt"),
    ({"prompt": "x", "num_images": 2}, 422, "response_format"),
    ({"prompt": "x", "model": "clf"}, 422, "model"),
    ({"prompt": "x", "init_image": "aGVsbG8="}, 415, "image"),
    ({"prompt": "x", "cache": "fastcache"}, 422, "cache"),
    ({"prompt": "x", "cache": "deepcache:0"}, 422, "cache"),
])
def test_generate_refuses_bad_fields_naming_them(server: AppRunner, fields: dict, status: int, needle: str) -> None:
    assert_error(server.post("/v1/generate", json=fields), status, needle)


def test_a1111_txt2img_img2img_and_progress(server: AppRunner) -> None:
    r = server.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 3, "cfg_scale": 6, "seed": 11,
                                               "sampler_name": "Euler a", "restore_faces": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 1 and json.loads(body["info"])["seed"] == 11
    init = b64(png(4, size=(64, 64)))
    r = server.post("/sdapi/v1/img2img", json={"prompt": "a dog", "steps": 4, "init_images": [init],
                                               "denoising_strength": 0.5, "seed": 3})
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
    assert_error(server.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Heun"}), 422, "sampler_name")
    idle = server.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert [s["name"] for s in server.get("/sdapi/v1/samplers").json()][:2] == ["Euler", "Euler a"]
    assert server.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "sd"


def test_a1111_progress_while_running(sd_path: Path) -> None:
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(warmup=False))) as runner:
        jobs = runner.state.slots["sd"].jobs
        original = jobs.progress

        def progress(job, step, steps):
            time.sleep(0.05)
            original(job, step, steps)

        jobs.progress = progress

        async def both(client):
            task = asyncio.ensure_future(client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 20}))
            seen = []
            while not task.done():
                await asyncio.sleep(0.1)
                seen.append((await client.get("/sdapi/v1/progress")).json())
            return (await task), seen

        answer, seen = runner.run(both)
        assert answer.status_code == 200
        running = [p for p in seen if p["state"]["sampling_steps"] == 20]
        assert running and all(0 <= p["progress"] <= 1 for p in running)
        assert any(0 < p["progress"] < 1 and p["state"]["job_count"] == 1 for p in running)


# ---------------------------------------------------------------------------- readiness, auth, metrics

def test_a_broken_model_is_not_ready_and_says_why_without_paths(clf_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "secret-dir" / "tampered"
    shutil.copytree(clf_path, bad)
    payload = max((p for p in bad.rglob("*") if p.is_file() and p.name != "manifest.json"),
                  key=lambda p: p.stat().st_size)
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    with AppRunner(create_app({"good": clf_path, "bad": bad, "gone": tmp_path / "missing"})) as runner:
        ready = runner.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        models = ready.json()["models"]
        assert models["good"]["ready"] and not models["bad"]["ready"] and not models["gone"]["ready"]
        assert "sha256" in models["bad"]["reason"] or "tamper" in models["bad"]["reason"].lower()
        text = ready.text + runner.get("/v2/models/bad/ready").text + runner.get("/v2/models/gone/ready").text
        assert str(tmp_path) not in text and "secret-dir" not in text
        assert_error(runner.post("/v1/classify", json={"images": [b64(png(1))], "model": "bad"}), 503, "not ready")
        r = runner.post("/v1/classify", json={"images": [b64(png(1))], "model": "good"})
        assert r.status_code == 200


def test_ready_only_after_loading_and_warming(clf_path: Path) -> None:
    app = create_app({"clf": clf_path})
    state = app.state.server
    gate = threading.Event()
    slot = state.slots["clf"]
    load = slot.load

    def held():
        gate.wait(10)
        load()

    slot.load = held
    runner = AppRunner(app, wait=False)  # readiness must say no until the load finishes
    try:
        r = runner.get("/v2/health/ready")
        assert r.status_code == 503 and r.json()["models"]["clf"]["state"] == "loading"
        assert_error(runner.post("/v1/classify", json={"images": [b64(png(1))]}), 503, "not ready")
        assert runner.get("/v2/health/live").status_code == 200
        gate.set()
        runner.call(asyncio.wait_for(state.loaded.wait(), 60))
        assert runner.get("/v2/health/ready").status_code == 200
    finally:
        gate.set()
        runner.close()


def test_api_key_guards_everything_but_health(clf_path: Path) -> None:
    settings = ServeSettings(api_keys=frozenset({"s3cret"}), warmup=False)
    with AppRunner(create_app({"clf": clf_path}, settings)) as runner:
        assert runner.get("/v2/health/live").status_code == 200
        assert runner.get("/v2/health/ready").status_code == 200
        for path in ("/v2/models", "/v2/models/clf", "/metrics", "/sdapi/v1/progress", "/openapi.json"):
            r = runner.get(path)
            assert_error(r, 401, "API key")
            assert r.headers["www-authenticate"] == "Bearer"
        assert_error(runner.get("/v2/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert runner.get("/v2/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = runner.post("/v1/classify", json={"images": [b64(png(1))]}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_no_cors_unless_configured(clf_path: Path) -> None:
    origin = {"Origin": "http://evil.example"}
    with AppRunner(create_app({"clf": clf_path}, ServeSettings(warmup=False))) as runner:
        r = runner.get("/v2/models", headers=origin)
        assert "access-control-allow-origin" not in r.headers
    settings = ServeSettings(cors_origins=("http://ok.example",), warmup=False)
    with AppRunner(create_app({"clf": clf_path}, settings)) as runner:
        assert runner.get("/v2/models", headers={"Origin": "http://ok.example"}).headers[
            "access-control-allow-origin"] == "http://ok.example"
        assert "access-control-allow-origin" not in runner.get("/v2/models", headers=origin).headers


def test_metrics_count_requests_latency_and_queue(server: AppRunner) -> None:
    server.post("/v1/classify", json={"images": [b64(png(1))]})
    server.post("/v1/classify", json={"images": [b64(png(1))], "top_k": -1})
    text = server.get("/metrics").text
    assert _metric(text, 'enginekit_requests_total{model="clf",endpoint="/v1/classify",code="200"}') >= 1
    assert _metric(text, 'enginekit_requests_total{model="",endpoint="/v1/classify",code="422"}') >= 1
    assert _metric(text, 'enginekit_request_seconds_count{model="clf",endpoint="/v1/classify"}') >= 1
    assert _metric(text, 'enginekit_queue_depth{model="clf"}') == 0
    assert _metric(text, 'enginekit_model_ready{model="sd"}') == 1


def test_page_is_served(server: AppRunner) -> None:
    r = server.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script" in r.text and "/v1/classify" in r.text and "/v1/generate" in r.text


def test_batcher_runs_a_lone_request_at_once_and_gathers_concurrent_ones() -> None:
    from enginekit.serve.batching import Batcher

    calls: list[int] = []

    def run(rows: np.ndarray) -> dict[str, np.ndarray]:
        calls.append(len(rows))
        return {"y": rows * 2}

    async def scenario() -> tuple[float, list[np.ndarray]]:
        b = Batcher("m", run, max_batch=4, max_delay_s=0.5, max_queue=8)
        t0 = time.perf_counter()
        lone = await b.submit(np.ones((1, 2), np.float32))
        lone_s = time.perf_counter() - t0
        together = await asyncio.gather(*[b.submit(np.full((1, 2), i, np.float32)) for i in range(4)])
        b.close()
        return lone_s, [lone["y"]] + [t["y"] for t in together]

    lone_s, outs = asyncio.run(scenario())
    assert lone_s < 0.25  # no 0.5 s gathering wait for a single client
    assert calls == [1, 4]
    assert [o.tolist() for o in outs[1:]] == [[[2 * i, 2 * i]] for i in range(4)]
