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
