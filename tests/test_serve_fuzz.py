"""Schemathesis against the server's own OpenAPI schema: generated requests, valid and
malformed, to every operation of a real server on 127.0.0.1; none may answer 5xx, every
error must be JSON with a message, and the server must be healthy after.

Bounded by a count of requests, not by time: 1,000 in the default suite (about 20 s on
2 cores), 10,000 under ``-m slow`` (``ENGINEKIT_FUZZ_REQUESTS`` overrides both)."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis")
import requests
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation.modes import GenerationMode

from enginekit.serve.app import create_app
from enginekit.serve.settings import ServeSettings
from enginekit.serve.testing import UvicornThread

OVERRIDE = os.environ.get("ENGINEKIT_FUZZ_REQUESTS")
#: Side effects a fuzzer must not trigger for real: interrupt would only cancel its own runs.
SKIP = {("POST", "/sdapi/v1/interrupt")}


def test_fuzz_the_openapi_schema_no_5xx(exported: dict, tiny_pipelines: dict) -> None:
    _fuzz_test(exported, tiny_pipelines, int(OVERRIDE or 1000))


@pytest.mark.slow
def test_fuzz_ten_thousand_requests_no_5xx(exported: dict, tiny_pipelines: dict) -> None:
    _fuzz_test(exported, tiny_pipelines, int(OVERRIDE or 10_000))


def _fuzz_test(exported: dict, tiny_pipelines: dict, total: int) -> None:
    # Small limits keep each valid generation cheap; the fuzzer still reaches every check.
    limits = ServeSettings(max_steps=2, max_side=64, max_images=2, max_prompt_chars=64, max_pixels=64 * 64,
                           max_body_bytes=256 * 1024, timeout_s=10)
    app = create_app({"clf": exported["timm"], "sd": tiny_pipelines[("tiny-sd15", "onnx")]}, limits)
    with UvicornThread(app) as server:
        sent, failures, seconds = fuzz(server.url, total)
        assert not failures, f"{len(failures)} bad answers of {sent}, e.g. {failures[:5]}"
        assert sent >= total, f"only {sent} requests generated"
        assert requests.get(f"{server.url}/v2/health/ready").status_code == 200, "unhealthy after the fuzz run"
        print(f"fuzz: {sent} requests in {seconds:.0f} s, no 5xx")


def fuzz(url: str, total: int) -> tuple[int, list[str], float]:
    """Send ``total`` generated requests (half valid by the schema, half not) round the operations."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    operations = [op for op in operations if (op.method.upper(), op.path) not in SKIP]
    assert len(operations) >= 15
    sent, failures = 0, []
    per_round = max(1, total // (2 * len(operations)) + 1)
    t0 = time.perf_counter()
    with requests.Session() as session:
        for rounds in range(1, 6):
            for op in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    @settings(max_examples=per_round, deadline=None, phases=[Phase.generate], database=None,
                              suppress_health_check=list(HealthCheck), derandomize=rounds == 1)
                    @given(case=op.as_strategy(generation_mode=mode))
                    def send(case) -> None:
                        nonlocal sent
                        response = case.call(base_url=url, session=session, timeout=30)
                        sent += 1
                        if response.status_code >= 500 or (response.status_code >= 400 and not _json_error(response)):
                            failures.append(f"{case.method} {case.path} {case.body!r:.200} -> {response.status_code} "
                                            f"{response.text[:200]}")

                    try:
                        send()
                    except Exception as exc:  # no malformed variant exists (an operation without inputs)
                        if "Unsatisfiable" not in type(exc).__name__:
                            raise
                if sent >= total:
                    return sent, failures, time.perf_counter() - t0
    return sent, failures, time.perf_counter() - t0


def _json_error(response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str) and bool(body["error"])
