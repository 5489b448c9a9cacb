"""The bookkeeping the peer benchmarks share: a timestamped log line, and stages whose finished
results are kept in a JSON state file so a rerun only runs what is missing or asked for."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def log(msg: str, started: float = time.monotonic()) -> None:
    print(f"[{time.monotonic() - started:7.0f}s] {msg}", file=sys.stderr, flush=True)


def stage_runner(state: dict[str, Any], state_path: Path, redo: set[str]) -> Any:
    """``stage(name, run)``: a finished stage's result kept in ``state`` (unless in ``redo`` or it
    failed), else ``run()``'s, stored and written to ``state_path`` at once."""

    def stage(name: str, run: Any) -> dict[str, Any]:
        if name in state.get("stages", {}) and name not in redo and "error" not in state["stages"][name]:
            log(f"{name}: kept from an earlier run")
            return state["stages"][name]
        log(f"{name} ...")
        result = run()
        state.setdefault("stages", {})[name] = result
        state_path.write_text(json.dumps(state, indent=1, default=str))
        log(f"{name}: " + json.dumps({k: v for k, v in result.items() if k != "pairs_s"}, default=str)[:300])
        return result

    return stage
