"""Run the app under uvicorn, with a graceful drain: on SIGTERM (or Ctrl-C) the server
answers new requests 503, finishes those in flight, then exits; a second signal exits at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Mapping

from enginekit.serve.settings import ServeSettings

__all__ = ["run_server", "app_from_env"]

log = logging.getLogger("enginekit.serve")

_ENV = "ENGINEKIT_SERVE_CONFIG"


def _server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, draining through the app's own books before it stops listening."""

        state: Any = None

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            self._draining = False
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if getattr(self, "_draining", False) or self.state is None:  # a second signal: stop now
                self.force_exit = self.should_exit = True
                return
            self._draining = True
            self.state.draining = True
            log.warning("signal %d: draining (%d in flight); a second signal exits at once", sig, self.state.in_flight)
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

        async def _drain(self) -> None:
            finished = await self.state.drain()
            if not finished:
                log.error("drain timed out with %d requests in flight", self.state.in_flight)
            self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # As uvicorn's, without re-raising the signal at the end: a drained server exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return DrainingServer


def run_server(models: Mapping[str, str | Path], settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
               workers: int = 1, log_level: str = "info") -> None:
    """Serve ``models`` until a signal drains the server."""
    import uvicorn

    if workers > 1:
        # Each worker process builds its own app (and loads every model) from the environment.
        os.environ[_ENV] = json.dumps({"models": {k: str(v) for k, v in models.items()},
                                       "settings": _settings_json(settings)})
        uvicorn.run("enginekit.serve.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_graceful_shutdown=int(settings.drain_timeout_s))
        return
    from enginekit.serve.app import create_app

    app = create_app(models, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(settings.drain_timeout_s))
    server = _server_class()(config)
    server.state = app.state.server
    server.run()


def _settings_json(settings: ServeSettings) -> dict[str, Any]:
    data = asdict(settings)
    data["api_keys"] = sorted(settings.api_keys)
    data["image_formats"] = sorted(settings.image_formats)
    data["cors_origins"] = list(settings.cors_origins)
    return data


def app_from_env() -> Any:
    """uvicorn's factory for ``--workers N``: the app described by ``$ENGINEKIT_SERVE_CONFIG``."""
    from enginekit.serve.app import create_app

    config = json.loads(os.environ[_ENV])
    raw = config["settings"]
    raw["api_keys"] = frozenset(raw["api_keys"])
    raw["image_formats"] = frozenset(raw["image_formats"])
    raw["cors_origins"] = tuple(raw["cors_origins"])
    return create_app(config["models"], ServeSettings(**raw))
