"""``/v1/classify?explain=true`` through httpx against the ASGI app: each verdict with its map
(the library's grid, and its overlay as a PNG), in every body form; bad values are 422."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")

import enginekit
from enginekit.serve.app import create_app
from enginekit.serve.settings import ServeSettings
from enginekit.serve.testing import AppRunner

from .test_serve import png


def test_classify_explain(exported: dict) -> None:
    from PIL import Image

    images = [png(1), png(2, (40, 56))]
    clf = enginekit.load(exported["timm"], device="cpu")
    want = clf.explain(images)
    with AppRunner(create_app({"clf": exported["timm"]}, ServeSettings(max_images=4))) as server:
        files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        r = server.post("/v1/classify?explain=true", files=files)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [e.prediction.label for e in want]
        for p, e, data in zip(got, want, images):
            assert p["explanation"]["method"] == "rollout"
            np.testing.assert_allclose(p["explanation"]["grid"], e.grid, atol=1e-6)
            overlay = Image.open(io.BytesIO(base64.b64decode(p["explanation"]["overlay_png"])))
            assert np.array_equal(np.asarray(overlay), np.asarray(e.overlay(Image.open(io.BytesIO(data)))))

        r = server.post("/v1/classify", json={"images": [base64.b64encode(images[0]).decode()], "explain": "occlusion"})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["explanation"]["method"] == "occlusion"
        r = server.post("/v1/classify?explain=true", content=images[0], headers={"content-type": "image/png"})
        assert r.status_code == 200 and "explanation" in r.json()["predictions"][0]
        plain = server.post("/v1/classify", files=files[:1])
        assert "explanation" not in plain.json()["predictions"][0]
        bad = server.post("/v1/classify?explain=maybe", files=files[:1])
        assert bad.status_code == 422 and "explain" in bad.json()["error"]


def test_kserve_infer_explains_with_a_parameter(exported: dict) -> None:
    """KServe v2: ``parameters: {"explain": ...}`` with the ``image`` input adds ``explanation``,
    ``explanation_box`` and ``explanation_png`` beside the usual outputs, equal to the library's."""
    import json
    import struct

    from PIL import Image

    images = [png(1), png(2, (40, 56))]
    clf = enginekit.load(exported["timm"], device="cpu")
    want = clf.explain(images)
    raw = b"".join(struct.pack("<I", len(im)) + im for im in images)
    with AppRunner(create_app({"clf": exported["timm"]}, ServeSettings(max_images=4))) as server:
        def infer(params: dict, outputs: list[str] | None = None, data: bytes = raw, count: int = 2):
            header: dict = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count],
                                        "parameters": {"binary_data_size": len(data)}}], "parameters": params}
            if outputs is not None:
                header["outputs"] = [{"name": n} for n in outputs]
            text = json.dumps(header)
            return server.post("/v2/models/clf/infer", content=text.encode() + data,
                               headers={"Inference-Header-Content-Length": str(len(text))})

        r = infer({"explain": True})
        assert r.status_code == 200, r.text
        got = {o["name"]: o for o in r.json()["outputs"]}
        assert {"logits", "embedding", "explanation", "explanation_box", "explanation_png"} <= set(got)
        grid = np.array(got["explanation"]["data"], np.float32).reshape(got["explanation"]["shape"])
        np.testing.assert_allclose(grid, np.stack([e.grid for e in want]), atol=1e-6)
        assert got["explanation_box"]["shape"] == [2, 4] and got["explanation_png"]["shape"] == [2]
        np.testing.assert_allclose(np.array(got["explanation_box"]["data"]).reshape(2, 4),
                                   [e.box for e in want], atol=1e-4)
        overlay = Image.open(io.BytesIO(base64.b64decode(got["explanation_png"]["data"][1])))
        assert np.array_equal(np.asarray(overlay), np.asarray(want[1].overlay(Image.open(io.BytesIO(images[1])))))

        r = infer({"explain": "occlusion"}, outputs=["explanation"], data=raw[: 4 + len(images[0])], count=1)
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["outputs"]] == ["explanation"]
        plain = infer({})
        assert "explanation" not in {o["name"] for o in plain.json()["outputs"]}
        bad = infer({"explain": "maybe"})
        assert bad.status_code == 422 and "explain" in bad.json()["error"]
        pixels = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32],
                              "data": [0.0] * 3 * 32 * 32}], "parameters": {"explain": True}}
        r = server.post("/v2/models/clf/infer", json=pixels)
        assert r.status_code == 400 and "'image' input" in r.json()["error"]
