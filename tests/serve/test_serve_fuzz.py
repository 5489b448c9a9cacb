"""Schemathesis against the server's own OpenAPI schema: generated requests, valid and
malformed, to every endpoint of a real server on 127.0.0.1 (KServe v2, the task API, the
A1111 API, and the routes the schema leaves out), with the API key off and on; none may
answer 5xx, every error must be JSON with a message, a request without the key must get
401, and the server must be healthy after. The driver is ``benchmarks/serve_fuzz.py``.

Bounded by a count of requests, not by time: 500 per key setting in the default suite,
10,000 under ``-m slow`` (``ENGINEKIT_FUZZ_REQUESTS`` overrides both)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis")

from benchmarks.serve_fuzz import KEY, fuzz_server  # noqa: E402

OVERRIDE = os.environ.get("ENGINEKIT_FUZZ_REQUESTS")


@pytest.mark.parametrize("api_key", [None, KEY], ids=["key-off", "key-on"])
def test_fuzz_every_endpoint_no_5xx(exported: dict, tiny_pipelines: dict, api_key: str | None) -> None:
    _fuzz_test(exported, tiny_pipelines, int(OVERRIDE or 500), api_key)


@pytest.mark.slow
@pytest.mark.parametrize("api_key", [None, KEY], ids=["key-off", "key-on"])
def test_fuzz_ten_thousand_requests_no_5xx(exported: dict, tiny_pipelines: dict, api_key: str | None) -> None:
    _fuzz_test(exported, tiny_pipelines, int(OVERRIDE or 10_000), api_key)


def _fuzz_test(exported: dict, tiny_pipelines: dict, total: int, api_key: str | None) -> None:
    result, health = fuzz_server(exported["timm"], tiny_pipelines[("tiny-sd15", "onnx")], total, api_key)
    assert not result.failures, f"{len(result.failures)} bad answers of {result.sent}, e.g. {result.failures[:5]}"
    assert result.sent >= total, f"only {result.sent} requests generated"
    assert result.operations >= 21, result.operations  # every route, the three outside the schema included
    if api_key:
        assert result.statuses[401] > 0, result.statuses  # requests without the key were sent, and refused
    assert health == 200, "unhealthy after the fuzz run"
    print(f"fuzz, api key {'on' if api_key else 'off'}: {result.line()}")
