"""``enginekit serve``: artifacts over HTTP, on one machine or on Ray Serve."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from enginekit.app.cli.common import Params, cli


@cli.command()
@click.argument("artifacts", nargs=-1, required=True, metavar="ARTIFACT... [NAME=ARTIFACT]...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--max-batch", default=8, show_default=True, help="Classifiers: images per engine call (1: no batching).")
@click.option("--max-delay-ms", default=5.0, show_default=True, help="Classifiers: wait this long to fill a batch.")
@click.option("--max-queue", default=64, show_default=True, help="Requests waiting per model before 503s.")
@click.option("--timeout-s", default=30.0, show_default=True, help="Answer 504 (and cancel) past this.")
@click.option("--api-key-file", type=click.Path(path_type=Path),
              help="Bearer keys, one a line: every endpoint but health then needs one.")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow this origin (CORS); repeatable.")
@click.option("--verify-with", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public key (PEM): a model whose signature does not verify with it is not ready.")
@click.option("--max-body-mb", default=32.0, show_default=True, help="Largest request body.")
@click.option("--max-pixels", type=click.IntRange(64), default=None,
              help="Pixels a generation may ask for (height x width x images) [default: the model's own size x 4].")
@click.option("--max-upload-pixels", default=16_000_000, show_default=True, help="Largest uploaded image (width x height).")
@click.option("--max-images", default=16, show_default=True, help="Images per request.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, gpu.")
@click.option("--lora-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="LoRA files (.safetensors) clients may apply by name: /v1/generate's \"loras\", A1111 "
                   "prompts' <lora:NAME:WEIGHT>; /sdapi/v1/loras lists them.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes (each loads every model).")
@click.option("--ray", "on_ray", is_flag=True, help="Serve through Ray Serve: each replica loads every model.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 1024), help="--ray: replicas.")
@click.option("--max-replicas", type=click.IntRange(1, 1024),
              help="--ray: autoscale from --replicas up to this many.")
@click.option("--replica-cpus", default=1.0, show_default=True, type=click.FloatRange(0, 1024),
              help="--ray: CPUs Ray reserves per replica.")
@click.option("--ray-address", metavar="HOST:PORT",
              help="--ray: a running cluster's head (default: start a local cluster).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(**params: Any) -> None:
    """Serve artifacts over HTTP: KServe v2 (/v2), /v1/classify, /v1/generate, the A1111
    API (/sdapi/v1), /metrics and a web page at /. Each artifact is served under its
    folder's name; NAME=ARTIFACT picks another; ARTIFACT@sha256:HEX pins its digest (a model that
    does not match is not ready). SIGTERM drains (finishes what is in flight).
    --ray serves the same app through Ray Serve, on --replicas replicas."""
    from enginekit.serve.settings import ServeSettings, parse_model_pins, parse_model_specs, read_api_keys

    o = Params(params)
    ray_only = {"--replicas": o.replicas != 1, "--max-replicas": o.max_replicas is not None,
                "--replica-cpus": o.replica_cpus != 1.0, "--ray-address": o.ray_address is not None}
    if not o.on_ray and any(ray_only.values()):
        raise click.UsageError(f"{', '.join(k for k, v in ray_only.items() if v)} only go with --ray")
    if o.on_ray and o.workers != 1:
        raise click.UsageError("--workers is for one machine; with --ray, use --replicas")

    models = parse_model_specs(o.artifacts)
    settings = ServeSettings(max_batch=o.max_batch, max_delay_ms=o.max_delay_ms, max_queue=o.max_queue,
                             timeout_s=o.timeout_s,
                             api_keys=read_api_keys(o.api_key_file) if o.api_key_file else frozenset(),
                             cors_origins=o.cors_origins, max_body_bytes=int(o.max_body_mb * 1024 * 1024),
                             max_pixels=o.max_pixels, max_upload_pixels=o.max_upload_pixels, max_images=o.max_images, device=o.device,
                             pins=parse_model_pins(o.artifacts),
                             verify_with=str(o.verify_with.resolve()) if o.verify_with else None,
                             host=o.host, port=o.port,
                             lora_dir=str(o.lora_dir.resolve()) if o.lora_dir else None)
    logging.basicConfig(level=getattr(logging, o.log_level.upper()), format="%(name)s: %(message)s")
    if o.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        click.echo(f"warning: serving on {o.host} without --api-key-file: anyone who reaches it can use it", err=True)
    if o.on_ray:
        from enginekit.serve.ray import RayOptions, serve_on_ray

        options = RayOptions(replicas=o.replicas, max_replicas=o.max_replicas, replica_cpus=o.replica_cpus,
                             address=o.ray_address)
        where = "cluster " + o.ray_address if o.ray_address else "a local cluster"
        click.echo(f"starting Ray Serve ({where})", err=True)
        serve_on_ray(models, settings, options, host=o.host, port=o.port, on_ready=lambda m: click.echo(m, err=True))
        return
    click.echo(f"serving {', '.join(models)} on http://{o.host}:{o.port} (ready: /v2/health/ready)", err=True)
    from enginekit.serve.server import run_server

    run_server(models, settings, host=o.host, port=o.port, workers=o.workers, log_level=o.log_level)
