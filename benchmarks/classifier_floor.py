"""Where a classifier pick's batch-1 time goes, and how far it is from this CPU's floor.

For :mod:`benchmarks.peers`' classifier runs: the model's FLOPs at batch 1
(``torch.utils.flop_counter`` on the PyTorch model), the arithmetic floor per precision at
this CPU's clock and units (:func:`benchmarks.pipeline_targets.flops_per_cycle`), and the
pick's OpenVINO per-operation counters (``PERF_COUNT``) summed by operation type, so a report
that misses its target says which part holds it back::

    .venv/bin/python -m benchmarks.classifier_floor WORK/vit-best WORK/vit-model timm
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def model_flops(folder: Path, library: str, size: int) -> float:
    """FLOPs of one batch-1 forward of the saved PyTorch model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if library == "timm":
        import timm

        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        call = model
    else:
        from transformers import ViTForImageClassification

        model = ViTForImageClassification.from_pretrained(folder).eval()

        def call(x: Any) -> Any:
            return model(pixel_values=x).logits

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call(torch.randn(1, 3, size, size))
    return float(counter.get_total_flops())


def op_profile(artifact: Path, runs: int = 20) -> dict[str, float]:
    """The pick's OpenVINO per-operation time at batch 1 (median run), ms by operation type."""
    import openvino as ov

    from enginekit.manifest import read_manifest

    manifest = read_manifest(artifact)
    comp = next(iter(manifest.components.values()))
    core = ov.Core()
    config: dict[str, Any] = {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"}
    hint = manifest.target.get("inference_precision_hint")
    if hint and hint != "default":
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = core.compile_model(str(artifact / comp.entry), "CPU", config)
    request = compiled.create_infer_request()
    shape = [d if isinstance(d, int) else 1 for d in comp.inputs[0].shape]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    samples = []
    for _ in range(runs):
        request.infer({0: x})
        by_type: collections.Counter[str] = collections.Counter()
        for info in request.profiling_info:
            by_type[info.node_type] += info.real_time.total_seconds() * 1e3
        samples.append(by_type)
    totals = sorted(samples, key=lambda c: sum(c.values()))[len(samples) // 2]
    return dict(totals.most_common())


def floor(artifact: Path, model: Path, library: str, flags: list[str], cores: int) -> dict[str, Any]:
    from benchmarks.pipeline_targets import clock_ghz, flops_per_cycle
    from enginekit.manifest import read_manifest

    manifest = read_manifest(artifact)
    size = int(next(iter(manifest.components.values())).inputs[0].shape[-1])
    flops = model_flops(model, library, size)
    ghz = clock_ghz()
    per_cycle = flops_per_cycle(flags)
    floors = {p: flops / (cores * ghz * 1e9 * n) * 1e3 for p, (n, _) in per_cycle.items()} if ghz else {}
    return {"gflop": flops / 1e9, "clock_ghz": ghz, "cores": cores, "floor_ms": floors,
            "ops_ms": op_profile(artifact)}


def render(fl: dict[str, Any], pick_ms: float | None) -> list[str]:
    """Report lines: the floors, the pick against them, its five largest operation types."""
    if not fl.get("floor_ms"):
        return []
    ops = fl.get("ops_ms") or {}
    total = sum(ops.values()) or None
    lines = [f"model: {fl['gflop']:.1f} GFLOP per image; floor at {fl['cores']} cores x {fl['clock_ghz']:.2f} GHz: "
             + ", ".join(f"{p} {v:.1f} ms" for p, v in fl["floor_ms"].items())
             + (f"; the pick runs at {pick_ms / fl['floor_ms']['int8']:.1f}x the int8 floor, "
                f"{pick_ms / fl['floor_ms']['bf16']:.1f}x the bf16 floor" if pick_ms else "")]
    if total:
        lines.append("where the pick's time goes (OpenVINO counters by operation type, ms of "
                     f"{total:.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in list(ops.items())[:6]))
    return lines


if __name__ == "__main__":
    from enginekit.hardware import fingerprint

    hw = fingerprint()
    result = floor(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], hw.get("flags") or [],
                   int(hw.get("physical_cores") or 1))
    print(json.dumps(result, indent=1))
    print("\n".join(render(result, None)))
