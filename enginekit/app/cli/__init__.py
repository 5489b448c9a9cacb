"""The ``enginekit`` command line.

Thin by design: each command parses options and calls one library function.
Errors from the library (:class:`EngineKitError`) become one line on stderr and
exit status 1; a missing optional dependency names the extra to install.
"""

from __future__ import annotations

from typing import Any

from enginekit.app.cli.common import cli

# Each module adds its commands to ``cli`` when imported.
from enginekit.app.cli import bench, build, imports, inspect, optimize, run, serve  # noqa: E402,F401

__all__ = ["cli", "main"]


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM / SIGHUP end a command as Ctrl-C does, so the same cleanup runs (no partial
    output left behind); a second signal kills at once."""
    import signal

    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    """Route SIGTERM and SIGHUP (where not ignored, as under nohup) to :func:`_terminate`."""
    import signal

    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _terminate)


def main() -> None:
    _install_signal_handlers()
    cli(prog_name="enginekit")


