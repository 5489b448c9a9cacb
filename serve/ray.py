"""``enginekit serve ART... --ray``: the same app, scaled out on Ray Serve.

Each replica is one Ray actor running :func:`~enginekit.serve.app.create_app` on the
same artifacts (see :mod:`enginekit.serve.ray_replica`): it loads every model once,
when it starts, and keeps it; its classifier requests are batched by the app's own
:class:`~enginekit.serve.batching.Batcher`, exactly as in one process (``@serve.batch``
is not used: one batcher, one set of limits and metrics for both ways of serving).
Ray's proxy spreads requests over the replicas; every route, KServe v2, ``/v1``,
the A1111 API, ``/metrics`` (of the replica that answered) and the page, is the same.

Steps of :func:`serve_on_ray`: 1. check the artifacts here; 2. connect to the cluster
at ``address`` (bounded), or start a local one; 3. start Serve's HTTP proxy on
``host:port``; 4. deploy and wait until every replica loaded its models; 5. serve
until SIGINT / SIGTERM; 6. delete the application (Ray drains each replica), and
stop Serve and the cluster if this process started them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from enginekit.errors import BackendUnavailableError, EngineKitError, InputError
from enginekit.raytools import bounded_connect
from enginekit.serve.settings import ServeSettings

__all__ = ["RayOptions", "APP_NAME", "DEPLOYMENT_NAME", "deployment_options", "serve_on_ray"]

INSTALL_HINT = "pip install 'enginekit[ray]'"
APP_NAME = "enginekit"
DEPLOYMENT_NAME = "EngineKitReplica"
#: Seconds to wait for a TCP connection to a named cluster, and for Ray's GCS handshake.
CONNECT_TIMEOUT_S = 10.0

log = logging.getLogger("enginekit.serve")


@dataclass(frozen=True)
class RayOptions:
    """How the app is deployed on Ray Serve; every field has a ``serve --ray`` option."""

    #: Replicas to run; with ``max_replicas`` above it, the autoscaler's minimum (and start).
    replicas: int = 1
    #: Autoscale between ``replicas`` and this many; ``None`` keeps ``replicas`` fixed.
    max_replicas: int | None = None
    #: CPUs Ray reserves for each replica (its ``ray_actor_options``); the engine's own
    #: thread count is the backend's, as in one process.
    replica_cpus: float = 1.0
    #: ``HOST:PORT`` of a running cluster's head; ``None`` starts a local cluster.
    address: str | None = None
    #: CPUs of a local cluster (``None``: all of this machine's).
    num_cpus: int | None = None
    #: Bytes of Ray's object store on a local cluster (``None``: Ray's default, 30 % of memory);
    #: requests and answers pass through it, models never do.
    object_store_bytes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or not 1 <= self.replicas <= 1024:
            raise InputError(f"replicas must be an integer from 1 to 1024, got {self.replicas!r}")
        if self.max_replicas is not None and (not isinstance(self.max_replicas, int)
                                              or not self.replicas <= self.max_replicas <= 1024):
            raise InputError(f"max-replicas must be an integer from --replicas ({self.replicas}) to 1024, "
                             f"got {self.max_replicas!r}")
        if not isinstance(self.replica_cpus, (int, float)) or not 0 <= self.replica_cpus <= 1024:
            raise InputError(f"replica-cpus must be a number from 0 to 1024, got {self.replica_cpus!r}")
        if self.address is not None:
            parse_address(self.address)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) of a Ray cluster's head (its GCS port, 6379 by default)."""
    if address.startswith("ray://"):
        raise InputError(f"--ray-address {address}: Ray Client addresses are not supported; run enginekit on a "
                         "node of the cluster and give the head's HOST:PORT (6379 by default)")
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--ray-address {address!r}: give the cluster's head as HOST:PORT, e.g. 127.0.0.1:6379")
    return host, int(port)


def deployment_options(settings: ServeSettings, options: RayOptions) -> dict[str, Any]:
    """Ray Serve's options for the deployment (``serve.deployment(...).options(**these)``)."""
    out: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": options.replica_cpus},
        # The app bounds its own queue (503 + Retry-After) and batches what waits in it, so
        # Ray must let that many requests reach a replica, not its default of 5.
        "max_ongoing_requests": settings.max_queue + settings.max_batch,
        # Ray drains a replica it stops (finishes what it holds) as SIGTERM drains one process.
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
        # A constructor that fails (a bug: a model that fails to load only marks itself failed)
        # fails the deploy after a few tries, not Ray's default of 20.
        "max_constructor_retry_count": 3,
    }
    if options.max_replicas is not None and options.max_replicas > options.replicas:
        out["autoscaling_config"] = {
            "min_replicas": options.replicas, "initial_replicas": options.replicas,
            "max_replicas": options.max_replicas,
            # A replica is "full" once a batch's worth of requests waits on it.
            "target_ongoing_requests": max(2, settings.max_batch),
        }
    else:
        out["num_replicas"] = options.replicas
    return out


def _import_serve() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as exc:  # ray missing, or ray without its serve extra (grpc, ...)
        raise BackendUnavailableError(f"--ray needs Ray Serve, which is not installed ({exc.name or exc}): "
                                      f"{INSTALL_HINT}") from None
    return ray, serve


def _check_artifacts(models: Mapping[str, Path]) -> None:
    """Fail here, in one line, on a path that is no artifact: before any cluster starts."""
    from enginekit.manifest import read_manifest

    for name, path in models.items():
        read_manifest(Path(path))  # raises ManifestError naming the path


def _connect(ray: Any, options: RayOptions) -> bool:
    """Connect (or start a local cluster); True when this process started the cluster."""
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if options.address is None:
        ray.init(num_cpus=options.num_cpus, object_store_memory=options.object_store_bytes,
                 include_dashboard=False, **quiet)
        return True
    host, port = parse_address(options.address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise InputError(f"no Ray cluster reachable at {options.address} ({exc.strerror or exc}); start one with "
                         f"`ray start --head --port={port}`, or leave out --ray-address to start a local one") from None
    try:
        with bounded_connect(CONNECT_TIMEOUT_S):
            ray.init(address=options.address, **quiet)
    except ConnectionError as exc:
        raise InputError(f"{options.address} answers but is not a Ray cluster's head (GCS port): {exc}") from None
    return False


def _one_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def deploy(models: Mapping[str, str | Path], settings: ServeSettings, options: RayOptions,
           host: str = "127.0.0.1", port: int = 8000) -> None:
    """Steps 3 and 4: start Serve's proxy on ``host:port`` and deploy; returns once every
    replica runs (has loaded its models). Needs a connected Ray (``ray.init``)."""
    _, serve = _import_serve()
    from enginekit.serve.ray_replica import EngineKitReplica

    serve.start(http_options={"host": host, "port": port})
    app = serve.deployment(EngineKitReplica).options(**deployment_options(settings, options))
    paths = {name: str(Path(path).resolve()) for name, path in models.items()}
    try:
        serve.run(app.bind(paths, settings), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:  # noqa: BLE001  RayServeException, RayActorError, ... from the replicas
        raise EngineKitError(f"Ray Serve could not deploy the replicas: {_deploy_failure(serve, exc)}") from None


def _deploy_failure(serve: Any, exc: BaseException) -> str:
    """The replicas' own last error line where Serve kept it (its status message), else Ray's."""
    with contextlib.suppress(Exception):
        app = serve.status().applications.get(APP_NAME)
        message = app.deployments[DEPLOYMENT_NAME].message if app and DEPLOYMENT_NAME in app.deployments else ""
        lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
        if errors:
            return errors[-1][:500]
    return _one_line(exc)


def replica_states(serve: Any) -> dict[str, int]:
    """``{"RUNNING": 2}``: the deployment's replicas by state, as ``serve.status()`` tells them."""
    app = serve.status().applications.get(APP_NAME)
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    return {str(getattr(k, "value", k)): int(v) for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}


def serve_on_ray(models: Mapping[str, str | Path], settings: ServeSettings, options: RayOptions,
                 host: str = "127.0.0.1", port: int = 8000,
                 on_ready: Callable[[str], None] = lambda message: None) -> None:
    """Serve ``models`` on Ray Serve until SIGINT or SIGTERM, then shut down cleanly."""
    _check_artifacts({k: Path(v) for k, v in models.items()})  # 1.
    ray, serve = _import_serve()
    # Serve's own logger prints INFO lines whatever the root level: follow this server's.
    logging.getLogger("ray.serve").setLevel(max(logging.INFO, log.getEffectiveLevel()))
    owned = _connect(ray, options)  # 2.
    stop = {"signal": None}

    def _stop(signum: int, frame: Any) -> None:
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    deployed = False
    try:
        deploy(models, settings, options, host, port)  # 3. 4.
        deployed = True
        states = replica_states(serve)
        on_ready(f"serving {', '.join(models)} on http://{host}:{port} through Ray Serve "
                 f"({states.get('RUNNING', 0)} replicas running; Ctrl-C stops)")
        while stop["signal"] is None:  # 5.
            time.sleep(0.2)
        log.warning("signal %s: deleting the application (Ray drains each replica)", stop["signal"])
    finally:
        for sig, handler in previous.items():  # a second signal now interrupts the cleanup
            signal.signal(sig, handler)
        try:  # 6.
            if deployed or owned:
                with contextlib.suppress(Exception):
                    serve.delete(APP_NAME)
            if owned:
                with contextlib.suppress(Exception):
                    serve.shutdown()
        finally:
            ray.shutdown()
