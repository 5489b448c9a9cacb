"""Load test of ``enginekit serve``: throughput and p50/p99 latency against the number of
concurrent clients, with dynamic batching on and off, on loopback.

    python -m benchmarks.serve_load out/digits out/vit-small --concurrency 1,2,4,8 \\
        --requests 300 --max-batch 8 --max-delay-ms 5 [--json results.json]

For each artifact and each mode (batching off: ``--max-batch 1``; on: ``--max-batch N``)
a fresh server process runs on 127.0.0.1; after a warm-up, each concurrency level sends
a fixed number of ``POST /v1/classify`` requests (one image each, JSON base64) from that
many concurrent clients. The clients share the machine with the server: on a small box
the numbers include their cost. Prints a markdown table; the target line compares batched
against unbatched at the highest concurrency, beside the engine's own batching gain measured
first (images/s at ``--max-batch`` over images/s at batch 1, ``run_pixels`` alone, no server):
the most dynamic batching can give on this machine, since it only turns single calls into
batched ones.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["main", "measure"]


def _images(n: int, size: int = 224) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size]
        base = np.stack([xx * 255 / size, yy * 255 / size, np.full_like(xx, 40 * i % 255)], axis=-1)
        arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


@contextlib.contextmanager
def _server(artifact: Path, max_batch: int, max_delay_ms: float) -> Iterator[str]:
    import httpx

    from enginekit.serve.testing import free_port

    port = free_port()
    cmd = [sys.executable, "-c", "from enginekit.app.cli import main; main()", "serve", f"clf={artifact}",
           "--port", str(port), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms),
           "--max-queue", "4096", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("server not ready after 300 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _load(url: str, images: list[str], concurrency: int, requests: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            for i in counter:
                body = {"images": [images[i % len(images)]], "top_k": 1}
                t0 = time.perf_counter()
                r = await client.post("/v1/classify", json=body)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    ms = sorted(x * 1000 for x in latencies)
    return {"concurrency": concurrency, "requests": requests, "errors": errors, "seconds": wall,
            "throughput_rps": requests / wall, "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]}


def engine_gain(artifact: Path, batch: int, seconds: float = 5.0) -> dict[str, float]:
    """The engine's images/s at ``batch`` and at 1 (``run_pixels`` on zeros, after a warm-up),
    and their ratio: the ceiling of what batching requests can give."""
    import enginekit

    clf = enginekit.load(artifact)
    try:
        h, w = clf.preprocessing.size
        rates = {}
        for n in (1, batch):
            x = np.zeros((n, 3, h, w), np.float32)
            clf.run_pixels(x)
            done, t0 = 0, time.perf_counter()
            while done < 3 or time.perf_counter() - t0 < seconds / 2:
                clf.run_pixels(x)
                done += 1
            rates[n] = done * n / (time.perf_counter() - t0)
    finally:
        clf.close()
    return {"batch": batch, "images_per_s_1": rates[1], "images_per_s_batch": rates[batch],
            "gain": rates[batch] / rates[1]}


def measure(artifact: Path, concurrency: list[int], requests: int, max_batch: int,
            max_delay_ms: float) -> list[dict[str, Any]]:
    images = _images(16)
    rows = []
    ceiling = engine_gain(artifact, max_batch)
    print(f"{artifact.name} engine alone: {ceiling['images_per_s_1']:.1f} images/s at batch 1, "
          f"{ceiling['images_per_s_batch']:.1f} at batch {max_batch}: {ceiling['gain']:.2f}x", file=sys.stderr)
    for mode, batch in (("off", 1), ("on", max_batch)):
        with _server(artifact, batch, max_delay_ms) as url:
            asyncio.run(_load(url, images, max(concurrency), min(requests, 50)))  # warm-up
            for c in concurrency:
                row = asyncio.run(_load(url, images, c, requests))
                row.update(model=artifact.name, batching=mode, max_batch=batch, max_delay_ms=max_delay_ms,
                           engine_gain=ceiling)
                rows.append(row)
                print(f"{artifact.name} batching {mode:3} c={c:2}: {row['throughput_rps']:7.1f} req/s "
                      f"p50 {row['p50_ms']:7.2f} ms p99 {row['p99_ms']:7.2f} ms errors {row['errors']}",
                      file=sys.stderr)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | batching | clients | req/s | p50 ms | p99 ms | errors |",
             "|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batching']} (max {r['max_batch']}) | {r['concurrency']} | "
                     f"{r['throughput_rps']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Batched throughput at the top concurrency >= 1.5x unbatched, at p99 < 2x single-request latency."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        top = max(r["concurrency"] for r in mine)
        single = next((r for r in mine if r["batching"] == "off" and r["concurrency"] == 1), None)
        off = next(r for r in mine if r["batching"] == "off" and r["concurrency"] == top)
        on = next(r for r in mine if r["batching"] == "on" and r["concurrency"] == top)
        gain = on["throughput_rps"] / off["throughput_rps"]
        line = f"{model}: {top} clients, batching gives {gain:.2f}x the unbatched throughput (target 1.5x)"
        if on.get("engine_gain"):
            eg = on["engine_gain"]
            line += f"; the engine alone gains {eg['gain']:.2f}x at batch {eg['batch']} (the ceiling)"
        if single is not None:
            ratio = on["p99_ms"] / single["p50_ms"]
            line += f"; p99 {on['p99_ms']:.1f} ms = {ratio:.2f}x the single-request p50 {single['p50_ms']:.1f} ms (target < 2x)"
            # Little's law for a closed loop: each of `top` clients waits top / throughput on average.
            line += (f"; {top} clients at {on['throughput_rps']:.1f} req/s wait {top / on['throughput_rps'] * 1000:.0f} ms "
                     f"on average (Little's law), {top / on['throughput_rps'] * 1000 / single['p50_ms']:.1f}x the "
                     "single-request p50")
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = [row for a in args.artifacts for row in measure(a, levels, args.requests, args.max_batch, args.max_delay_ms)]
    print(table(rows))
    print()
    for line in targets(rows):
        print(f"- {line}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
