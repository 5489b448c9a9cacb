"""What Ray's two users here (``bench --ray`` and ``serve --ray``) share: a bounded connect."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["bounded_connect"]


@contextlib.contextmanager
def bounded_connect(timeout_s: float) -> Iterator[None]:
    """Make ``ray.init`` give up after about ``2 * timeout_s`` on a port that answers but is no GCS.

    Ray reads ``py_gcs_connect_timeout_s`` when it is first imported, and
    ``gcs_server_port_wait_time_s`` (the number of one-second connect retries)
    on each init. Values the user set win; the environment is restored after.
    """
    knobs = {"RAY_py_gcs_connect_timeout_s": str(max(1, round(timeout_s))), "RAY_gcs_server_port_wait_time_s": "1"}
    added = [k for k in knobs if k not in os.environ]
    os.environ.update({k: knobs[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
