"""Time ``optimize``'s classifier candidates side by side in one process, interleaved.

``optimize`` times each candidate once, in turn; when other jobs share the machine, its order is
the load's. This re-times chosen candidates from its work folder on the same batch-1 input,
round-robin, so a drift of the machine hits all of them alike::

    .venv/bin/python -m benchmarks.candidate_timing /tmp/peers-det/optimize \\
        --inputs /tmp/peers-det/vit-inputs.npy openvino-int8-qdq-bf16 openvino-bf16 "openvino-bf16+tome:32"

Prints each candidate's median over ``--rounds`` of the per-round median of ``--calls`` calls.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="optimize's --work folder (its candidates/ inside)")
    parser.add_argument("names", nargs="+", help="candidate names, as optimize's report lists them")
    parser.add_argument("--inputs", type=Path, required=True, help="an .npy of preprocessed images; the first is used")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)

    import enginekit

    x = np.load(args.inputs)[:1].astype(np.float32)
    engines = {n: enginekit.load(args.work / "candidates" / n) for n in args.names}
    for engine in engines.values():
        for _ in range(args.warmup):
            engine.run_pixels(x)
    rounds: dict[str, list[float]] = {n: [] for n in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                engine.run_pixels(x)
                times.append(time.perf_counter() - start)
            rounds[name].append(float(np.median(times)) * 1000)
    for name, ms in rounds.items():
        print(f"{name:36s} {np.median(ms):7.1f} ms  (rounds: {' '.join(f'{m:.1f}' for m in ms)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
