"""Fuzz a real ``enginekit serve`` on 127.0.0.1 with schemathesis: every endpoint (KServe v2,
the task API, the A1111 API, and the routes the OpenAPI schema leaves out: ``/``,
``/metrics``, versioned infer), with the API key off and on, bounded by a count of
requests. Prints the requests sent, the answers by status class, the 5xx count, the
other bad answers (a 4xx without a JSON error) and whether the server is ready after.

    python -m benchmarks.serve_fuzz --classifier CLF --pipeline SD --requests 10000

With the key on, most requests carry it (so the fuzzer reaches the routes behind it);
every seventh goes without it or with a wrong one and must be answered 401 (the health
routes and the page excepted). Exit status 1 when any request got a 5xx or a bad answer.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FuzzResult", "fuzz", "fuzz_server", "main"]

#: Paths anyone may call with the key on (as :data:`enginekit.serve.app.PUBLIC`).
PUBLIC = {"/v2/health/live", "/v2/health/ready", "/"}
#: Small limits keep each valid generation cheap; the fuzzer still reaches every check.
LIMITS = dict(max_steps=2, max_side=64, max_images=2, max_prompt_chars=64, max_pixels=64 * 64,
              max_body_bytes=256 * 1024, timeout_s=10)
KEY = "fuzz-key-0123456789"


@dataclass
class FuzzResult:
    sent: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    operations: int = 0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def line(self) -> str:
        classes = collections.Counter()
        for status, n in self.statuses.items():
            classes[f"{status // 100}xx" if status else "no answer"] += n
        return (f"{self.sent} requests to {self.operations} operations in {self.seconds:.0f} s: "
                + ", ".join(f"{k} {v}" for k, v in sorted(classes.items()))
                + f"; 5xx: {self.server_errors}; bad answers: {len(self.failures)}")


def _json_error(response: Any) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str) and bool(body["error"])


def fuzz(url: str, total: int, api_key: str | None = None, seed: int = 0) -> FuzzResult:
    """Send ``total`` generated requests (half valid by the schema, half not) round every
    operation of the server at ``url``, plus the routes its schema leaves out."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation.modes import GenerationMode

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    operations = [r.ok() for r in schema.get_all_operations()]
    result = FuzzResult(operations=len(operations) + 3)
    rng = random.Random(seed)
    per_round = max(1, total // (2 * (len(operations) + 1)) + 1)
    t0 = time.perf_counter()

    def record(method: str, path: str, body: Any, response: Any, unauthenticated: bool) -> None:
        result.sent += 1
        result.statuses[response.status_code] += 1
        bad = response.status_code >= 500 or (response.status_code >= 400 and not _json_error(response))
        if unauthenticated and path not in PUBLIC and response.status_code != 401:
            bad = True
        if bad:
            result.failures.append(f"{method} {path} {body!r:.200} -> {response.status_code} {response.text[:200]}")

    def call(method: str, path: str, body: Any, unauthenticated: bool, send: Any) -> None:
        try:
            response = send()
        except requests.RequestException as exc:  # no answer at all: as bad as a 5xx
            result.sent += 1
            result.statuses[0] += 1
            result.failures.append(f"{method} {path} {body!r:.200} -> no answer ({type(exc).__name__}: {exc})"[:400])
            return
        record(method, path, body, response, unauthenticated)

    def credentials() -> tuple[dict[str, str], bool]:
        """The headers of the next request, and whether they lack a valid key."""
        if not api_key or rng.randrange(7):
            return headers, False
        return rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": api_key}]), True

    with requests.Session() as session:
        for rounds in range(1, 6):
            for op in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    @settings(max_examples=per_round, deadline=None, phases=[Phase.generate], database=None,
                              suppress_health_check=list(HealthCheck), derandomize=rounds == 1)
                    @given(case=op.as_strategy(generation_mode=mode))
                    def send(case: Any) -> None:
                        extra, unauthenticated = credentials()
                        if unauthenticated:
                            case.headers = {k: v for k, v in (case.headers or {}).items()
                                            if k.lower() != "authorization"}
                        call(case.method, op.path, case.body, unauthenticated,
                             lambda: case.call(base_url=url, session=session, timeout=30, headers=extra))
                        if op.path == "/v2/models/{name}/infer" and result.sent % 3 == 0:
                            # The versioned infer route (not in the schema) gets the same bodies.
                            name = (case.path_parameters or {}).get("name", "clf")
                            raw = isinstance(case.body, (bytes, str))
                            body = case.body if raw or isinstance(case.body, (dict, list)) else None
                            call("POST", "/v2/models/{name}/versions/{version}/infer", body, unauthenticated,
                                 lambda: session.post(f"{url}/v2/models/{name}/versions/1/infer",
                                                      data=body if raw else None, json=None if raw else body,
                                                      headers=extra, timeout=30))

                    try:
                        send()
                    except Exception as exc:  # no malformed variant exists (an operation without inputs)
                        if "Unsatisfiable" not in type(exc).__name__:
                            raise
                for path in ("/", "/metrics"):
                    extra, unauthenticated = credentials()
                    call("GET", path, None, unauthenticated,
                         lambda: session.get(f"{url}{path}", headers=extra, timeout=30))
                if result.sent >= total:
                    result.seconds = time.perf_counter() - t0
                    return result
    result.seconds = time.perf_counter() - t0
    return result


def fuzz_server(classifier: Path, pipeline: Path, total: int, api_key: str | None) -> tuple[FuzzResult, int]:
    """Serve ``classifier`` and ``pipeline`` on 127.0.0.1 (small limits), fuzz it, and return
    the result with the readiness status after the run."""
    import requests

    from enginekit.serve.app import create_app
    from enginekit.serve.settings import ServeSettings
    from enginekit.serve.testing import UvicornThread

    settings = ServeSettings(**LIMITS, api_keys=frozenset({api_key}) if api_key else frozenset())
    app = create_app({"clf": classifier, "sd": pipeline}, settings)
    with UvicornThread(app) as server:
        result = fuzz(server.url, total, api_key)
        health = requests.get(f"{server.url}/v2/health/ready", timeout=30).status_code
    return result, health


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", type=Path, required=True, help="An image-classification artifact.")
    parser.add_argument("--pipeline", type=Path, required=True, help="A text-to-image artifact (tiny-sd15 will do).")
    parser.add_argument("--requests", type=int, default=10_000, help="Requests per key setting.")
    parser.add_argument("--api-key", choices=["off", "on", "both"], default="both")
    args = parser.parse_args(argv)
    status = 0
    for mode in (("off", "on") if args.api_key == "both" else (args.api_key,)):
        result, health = fuzz_server(args.classifier, args.pipeline, args.requests, KEY if mode == "on" else None)
        print(f"api key {mode}: {result.line()}; ready after: {'yes' if health == 200 else f'no ({health})'}")
        for failure in result.failures[:10]:
            print(f"  {failure}")
        status |= int(bool(result.server_errors or result.failures or health != 200))
    return status


if __name__ == "__main__":
    sys.exit(main())
