"""The Ray Serve deployment: each replica runs the same FastAPI app as ``enginekit serve``.

Imported only where Ray Serve is installed (by :mod:`enginekit.serve.ray` and, on
every node, by the replicas themselves): it imports ``ray.serve`` at the top, so the
class below is defined once, at module level, and Ray ships it by reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ray import serve

from enginekit.serve.settings import ServeSettings

__all__ = ["EngineKitReplica", "REPLICA_HEADER"]

#: Every answer says which replica gave it (Ray's replica id), so a client (and the
#: tests) can tell replicas apart; the process id says which worker process that is.
REPLICA_HEADER = "x-enginekit-replica"


class _ReplicaHeader:
    """Pure ASGI: adds ``x-enginekit-replica: <replica id> pid=<pid>`` to every HTTP answer."""

    def __init__(self, app: Any, value: str) -> None:
        self.app = app
        self.value = value.encode("latin-1")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


@serve.ingress()
class EngineKitReplica:
    """One replica: its own app, so its own models (loaded once, here), batcher and metrics.

    Ray runs the app's lifespan before it routes any request to the replica; the
    lifespan loads and warms every model first (``load_before_start``), so a replica
    counts as running only once it can answer. A model that fails to load stays
    listed as failed, as in one process: ``/v2/health/ready`` then answers 503.
    """

    async def __init__(self, models: Mapping[str, str], settings: ServeSettings) -> None:
        from enginekit.serve.app import create_app

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._app = create_app({name: Path(path) for name, path in models.items()}, settings, load_before_start=True)
        self._app.add_middleware(_ReplicaHeader, value=f"{self.replica_id} pid={os.getpid()}")

    def __serve_build_asgi_app__(self) -> Any:
        return self._app
