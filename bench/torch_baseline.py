"""The PyTorch eager fp32 baseline, timed through the same timer, feeds and records as the engines."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enginekit.bench.records import make_record
from enginekit.bench.timing import BenchConfig, _progress_bar, latency_stats, make_feeds, time_callable
from enginekit.hardware import fingerprint
from enginekit.manifest import Manifest, TensorSpec

__all__ = ["bench_torch", "bench_torch_artifact", "distinct_artifacts", "distinct_sources", "torch_baselines"]


def _any_batch(inputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The specs with a symbolic batch axis: PyTorch runs any batch, whatever the engine was built for."""
    from dataclasses import replace

    return [replace(s, shape=("batch", *s.shape[1:])) if s.shape else s for s in inputs]


def bench_torch(
    model: Any,
    inputs: Sequence[TensorSpec],
    config: BenchConfig,
    *,
    model_id: str | None = None,
    name: str = "pytorch-eager",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """PyTorch eager fp32 of ``model`` through the same timer, feeds and statistics as
    :func:`bench_artifact`: one baseline record per batch size.

    Threads: ``config.threads`` (0: torch's default), set for the run and restored.
    ``load_ms`` and ``peak_rss_bytes`` stay None (building a PyTorch model is not a
    load from disk, and this process may hold more than the model: for a peak of its
    own, :func:`enginekit.bench.session.bench_torch_isolated`); ``size_bytes`` is
    the parameters' bytes.
    """
    import torch

    previous = torch.get_num_threads()
    threads = config.threads or previous
    torch.set_num_threads(threads)
    model = model.eval()
    hw = fingerprint()
    results = []
    first_ms: float | None = None
    try:
        with torch.inference_mode():
            for batch in config.batch_sizes:
                args = [torch.from_numpy(v) for v in make_feeds(_any_batch(inputs), batch, config.seed).values()]
                if first_ms is None:
                    start = time.perf_counter()
                    model(*args)
                    first_ms = (time.perf_counter() - start) * 1e3
                with _progress_bar(f"{name} batch {batch}", config.runs, progress) as bar:
                    samples = time_callable(lambda: model(*args), config,  # noqa: B023 - called before the loop moves on
                                            on_progress=lambda _i: bar.update(1))
                stats = latency_stats(samples)
                results.append({"batch": int(batch), "latency_ms": stats, "runs": len(samples),
                                "throughput_ips": batch * 1000.0 / stats["p50"]})
    finally:
        torch.set_num_threads(previous)
    engine = {"artifact": None, "name": name, "kind": "pytorch", "backend": "pytorch", "device": "cpu",
              "method": "float", "precision": "fp32", "manifest_sha256": None, "inference_precision": "f32"}
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return [
        make_record(engine=engine, result=r, threads=threads, hardware=hw, first_inference_ms=first_ms,
                    size_bytes=size, fidelity={"top1_agreement": 1.0, "logits_cosine": 1.0, "logits_max_abs": 0.0},
                    baseline=True, model=model_id)
        for r in results
    ]


def distinct_artifacts(artifacts: Sequence[str | Path]) -> list[Path]:
    """The first artifact of each distinct source model among ``artifacts`` (same source,
    weights, seed and weights hash), each verified. Reads manifests only: no torch."""
    import json

    from enginekit.artifact import verify_artifact
    from enginekit.manifest import read_manifest

    distinct: dict[str, Path] = {}
    for path in artifacts:
        manifest = read_manifest(path)
        verify_artifact(path, manifest)
        key = json.dumps({k: manifest.provenance.get(k) for k in ("source", "weights", "seed", "weights_sha256")},
                         sort_keys=True, default=str)
        distinct.setdefault(key, Path(path))
    return list(distinct.values())


def distinct_sources(artifacts: Sequence[str | Path]) -> list[tuple[Manifest, Any]]:
    """(manifest, rebuilt source) per distinct source model among ``artifacts`` (:func:`distinct_artifacts`),
    rebuilt from its provenance (:func:`enginekit.export.sources.source_for_manifest`)."""
    from enginekit.export.sources import source_for_manifest
    from enginekit.manifest import read_manifest

    manifests = [read_manifest(path) for path in distinct_artifacts(artifacts)]
    return [(m, source_for_manifest(m.provenance)) for m in manifests]


def bench_torch_artifact(path: str | Path, config: BenchConfig, *, name: str = "pytorch-eager",
                         progress: bool = True, own_process: bool = False) -> list[dict[str, Any]]:
    """:func:`bench_torch` on the source model of the artifact at ``path``, rebuilt from its provenance.

    With ``own_process`` (the caller exec-ed this process for it,
    :func:`enginekit.bench.session.bench_torch_isolated`), ``peak_rss_bytes`` is the
    process's own peak (:class:`~enginekit.bench.memory.PeakMemory`: torch, the rebuilt
    model and its runs) and ``conditions`` say so, as on the engines' records.
    """
    from enginekit.bench.memory import PeakMemory
    from enginekit.export.sources import source_for_manifest
    from enginekit.manifest import read_manifest

    peak = PeakMemory() if own_process else None
    with peak or contextlib.nullcontext():
        manifest = read_manifest(path)
        src = source_for_manifest(manifest.provenance)
        records = bench_torch(src.model, manifest.component().inputs, config,
                              model_id=manifest.provenance.get("source"), name=name, progress=progress)
    for rec in records:
        rec["conditions"] = {**rec["conditions"], "own_process": own_process, "torch_in_process": True,
                             **({"peak_rss_how": peak.how} if peak is not None else {})}
        rec["peak_rss_bytes"] = peak.bytes if peak is not None else None
    return records


def torch_baselines(artifacts: Sequence[str | Path], config: BenchConfig, progress: bool = True) -> list[dict[str, Any]]:
    """:func:`bench_torch` once per distinct source model among ``artifacts`` (:func:`distinct_sources`)."""
    records: list[dict[str, Any]] = []
    for manifest, src in distinct_sources(artifacts):
        records += bench_torch(src.model, manifest.component().inputs, config,
                               model_id=manifest.provenance.get("source"), progress=progress)
    return records
