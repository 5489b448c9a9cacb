"""Run a server app in tests and scripts: in process over httpx's ASGI transport
(:class:`AppRunner`), or as a real uvicorn server on an ephemeral loopback port
(:class:`UvicornThread`). Both start the app's lifespan, so models load as in production."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

import httpx

__all__ = ["AppRunner", "UvicornThread", "free_port"]

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppRunner:
    """The app on an event loop of its own thread; :meth:`request` is synchronous,
    :meth:`run` runs any coroutine (given the ``httpx.AsyncClient``) on that loop."""

    def __init__(self, app: Any, ready_timeout_s: float = 120.0, wait: bool = True) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="app-runner")
        self._thread.start()
        self._lifespan = app.router.lifespan_context(app)
        self.call(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                                        timeout=60.0)
        self.state = app.state.server
        if wait:
            self.call(asyncio.wait_for(self.state.loaded.wait(), ready_timeout_s))

    def call(self, coro: Awaitable[T], timeout: float | None = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[httpx.AsyncClient], Awaitable[T]], timeout: float | None = 120.0) -> T:
        return self.call(fn(self.client), timeout)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.call(self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def close(self) -> None:
        try:
            self.call(self.client.aclose(), 10)
            self.call(self._lifespan.__aexit__(None, None, None), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self) -> AppRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UvicornThread:
    """A real uvicorn server for ``app`` on 127.0.0.1 (an ephemeral port), in a thread."""

    def __init__(self, app: Any, ready_timeout_s: float = 120.0) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")
        self._thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.server.started and app.state.server.loaded.is_set():
                return
            time.sleep(0.05)
        self.close()
        raise TimeoutError("the server did not start in time")

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> UvicornThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
