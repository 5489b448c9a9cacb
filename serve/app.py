"""The ASGI app: :func:`create_app` ``(models, settings)``.

Routes live in :mod:`.kserve` (KServe v2), :mod:`.tasks` (``/v1``), :mod:`.sdapi` and
:mod:`.sdapi_info` (the A1111 API) and here (the page, ``/metrics``). The middleware in this module
answers before any route: drain (503), authentication (401), body size (413),
and books every request into the metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from enginekit.errors import EngineKitError, one_line
from enginekit.serve.errors import ApiError, scrub, status_for
from enginekit.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from enginekit.serve.models import ModelSlot
from enginekit.serve.settings import ServeSettings

__all__ = ["create_app", "ServerState", "lifespan_of"]

log = logging.getLogger("enginekit.serve")

#: Paths anyone may call, with or without a key: health (for load balancers) and the page
#: itself (static HTML; it sends the key the user types with every API call).
PUBLIC = frozenset({"/v2/health/live", "/v2/health/ready", "/"})


class ServerState:
    """Everything the routes share: settings, models, metrics, drain and in-flight books."""

    def __init__(self, models: Mapping[str, str | Path], settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.slots: dict[str, ModelSlot] = {n: ModelSlot(n, Path(p), settings, self.metrics) for n, p in models.items()}
        self.draining = False
        self.in_flight = 0
        self.loaded = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.started = time.time()
        #: Task -> the model its endpoints run when a request names none and several are served
        #: (A1111's ``POST /sdapi/v1/options`` sets the pipeline's). Per server process.
        self.defaults: dict[str, str] = {}

    @property
    def ready(self) -> bool:
        return self.loaded.is_set() and not self.draining and all(s.ready for s in self.slots.values())

    def slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise ApiError(404, f"no model named {name!r} (GET /v2/models lists them)")
        return slot

    def ready_slot(self, name: str) -> ModelSlot:
        slot = self.slot(name)
        if not slot.ready:
            raise ApiError(503, f"model {name!r} is not ready: {slot.reason}", {"Retry-After": "5"}
                           if slot.state == "loading" else None)
        return slot

    def pick(self, task: str, name: str | None, field: str = "model") -> ModelSlot:
        """The model a task endpoint runs: the named one, else the task's default (:attr:`defaults`),
        else the only one of that task."""
        name = name or self.defaults.get(task)
        if name:
            slot = self.slot(name)
            if slot.task is not None and not slot.serves(task):
                raise ApiError(422, f"{field}: model {name!r} is a {slot.task} model, not {task}")
            return self.ready_slot(name)
        of_task = [s for s in self.slots.values() if s.serves(task) or (s.task is None and s.state == "loading")]
        if not of_task:
            raise ApiError(404, f"no {task} model is served")
        if len(of_task) > 1:
            raise ApiError(422, f"{field}: several {task} models are served; name one of "
                                f"{', '.join(s.name for s in of_task)}")
        return self.ready_slot(of_task[0].name)

    def scrub(self, message: str) -> str:
        return scrub(message, [kv for s in self.slots.values() for kv in s.known_paths()])

    def begin(self) -> None:
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.set(self.in_flight)

    def end(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if self.in_flight == 0:
            self.idle.set()

    async def load_all(self) -> None:
        """Load and warm every model (one at a time: loading is the machine's busiest moment)."""
        try:
            for slot in self.slots.values():
                await asyncio.to_thread(slot.load)
                if slot.state != "failed":
                    slot.start()
        finally:
            self.loaded.set()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Refuse new work, wait for requests in flight; True when all finished in time."""
        self.draining = True
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s or self.settings.drain_timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def close(self) -> None:
        for slot in self.slots.values():
            slot.close()


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def lifespan_of(state: ServerState, load_before_start: bool = False):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.get_running_loop().create_task(state.load_all())
        try:
            if load_before_start:  # a Ray Serve replica: not routed to until its models are in
                await asyncio.shield(loader)
            yield
        finally:
            loader.cancel()
            state.close()

    return lifespan


def create_app(models: Mapping[str, str | Path], settings: ServeSettings = ServeSettings(), *,
               load_before_start: bool = False) -> FastAPI:
    """The server for ``models`` (name -> artifact folder). Models load and warm in the
    background when the app starts (its lifespan); ``/v2/health/ready`` says when all are.
    ``load_before_start`` makes the lifespan's startup wait for them instead (Ray Serve
    counts a replica as running once its startup returns)."""
    from enginekit import __version__
    from enginekit.serve import classify, kserve, sdapi, sdapi_info, tasks

    state = ServerState(models, settings)
    app = FastAPI(title="enginekit serve", version=__version__, lifespan=lifespan_of(state, load_before_start),
                  docs_url="/docs", redoc_url=None,
                  description="KServe v2 REST, task endpoints and the A1111 API over enginekit artifacts.")
    app.state.server = state
    app.include_router(kserve.router)
    app.include_router(classify.router)
    app.include_router(tasks.router)
    app.include_router(sdapi.router)
    app.include_router(sdapi_info.router)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("enginekit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        for slot in state.slots.values():
            state.metrics.queue_depth.labels(slot.name).set(slot.depth)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, state.scrub(exc.message), exc.headers)

    @app.exception_handler(EngineKitError)
    async def _engine_error(request: Request, exc: EngineKitError) -> JSONResponse:
        return error_response(status_for(exc), state.scrub(one_line(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left before sending its whole body: no server error, and nobody reads this.
        return error_response(499, "client closed the connection before sending its body")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault; logged with its traceback, answered without one.
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal error (logged on the server)")

    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Inference-Header-Content-Length"])
    # Added last, so it runs first: nothing reaches a route past a drain, a bad key or a big body.
    app.add_middleware(GateMiddleware, state=state)
    return app


def validation_message(errors: Any) -> str:
    """FastAPI's validation errors as one line naming the field: ``steps: Input should be ...``."""
    parts = []
    for err in list(errors)[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form")]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class GateMiddleware:
    """Pure ASGI (no buffering): drain, authentication, body size, metrics."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, settings = self.state, self.state.settings
        path = scope.get("path", "")
        if state.draining and path not in ("/v2/health/live", "/v2/health/ready"):
            state.metrics.rejections.labels("", "draining").inc()
            return await _send_error(send, 503, "server is shutting down; retry on another instance",
                                     {"Retry-After": "1", "Connection": "close"})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if settings.api_keys and path not in PUBLIC:
            token = headers.get("authorization", "")
            scheme, _, key = token.partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k.encode())
                                                     for k in settings.api_keys):
                state.metrics.rejections.labels("", "unauthorized").inc()
                return await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                         {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_error(send, 400, "Content-Length is not a number")
            if int(length) > settings.max_body_bytes:
                state.metrics.rejections.labels("", "too_large").inc()
                return await _send_error(send, 413, f"request body of {int(length)} bytes is over the limit of "
                                                    f"{settings.max_body_bytes} bytes")
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > settings.max_body_bytes:
                    state.metrics.rejections.labels("", "too_large").inc()
                    raise ApiError(413, f"request body is over the limit of {settings.max_body_bytes} bytes")
            return message

        status = 500
        started = False

        async def booked_send(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        t0 = time.perf_counter()
        state.begin()
        try:
            await self.app(scope, limited_receive, booked_send)
        except ApiError as exc:  # raised from limited_receive outside any route
            if not started:
                status = exc.status
                await _send_error(send, exc.status, exc.message, exc.headers)
        finally:
            state.end()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or ("static" if path == "/" else "unmatched")
            model = (scope.get("state") or {}).get("model") or (scope.get("path_params") or {}).get("name", "")
            if model not in state.slots:
                model = ""
            if endpoint not in ("/metrics",):
                state.metrics.requests.labels(model, endpoint, str(status)).inc()
                state.metrics.latency.labels(model, endpoint).observe(time.perf_counter() - t0)


async def _send_error(send: Any, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
