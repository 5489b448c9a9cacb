"""enginekit.serve: HTTP serving of artifacts (KServe v2, task endpoints, A1111 API).

Importing this package is cheap: FastAPI and uvicorn load with :mod:`enginekit.serve.app`.
"""

from __future__ import annotations

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str):  # lazy: `import enginekit.serve` needs no web stack
    if name == "create_app":
        from enginekit.serve.app import create_app

        return create_app
    if name == "ServeSettings":
        from enginekit.serve.settings import ServeSettings

        return ServeSettings
    raise AttributeError(f"module 'enginekit.serve' has no attribute {name!r}")
