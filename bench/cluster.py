"""Run one benchmark on every node of a Ray cluster and gather the records here.

``enginekit bench ART... --ray HOST:PORT`` connects to a running cluster (it
never starts one), ships each artifact through Ray's object store, and runs
:func:`~enginekit.bench.harness.bench_artifact` once per alive node, pinned to
that node. Records come back with a ``node`` object beside the usual fields;
each carries the worker's own hardware fingerprint, so a report groups them by
node type (``hardware_id``), not by node.

The artifacts need not exist on the other nodes, but enginekit and the
artifacts' backend must be installed there (the same versions as here), and
this process must run on a node of the cluster (Ray's ``ray.init(address=...)``
connects through the local node; Ray Client ``ray://`` addresses are refused).
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from enginekit.bench.harness import BenchConfig, bench_artifact, torch_baselines

from enginekit.errors import (
    BackendUnavailableError,
    EngineKitError,
    InputError,
    IntegrityError,
)
from enginekit.raytools import bounded_connect

__all__ = ["PackedArtifact", "bench_on_ray", "pack_artifact", "parse_address", "unpack_artifact"]

#: Seconds to wait for a TCP connection to the cluster address, and for Ray's GCS handshake.
CONNECT_TIMEOUT_S = 10.0
INSTALL_HINT = "pip install 'enginekit[ray]'"


@dataclass(frozen=True)
class PackedArtifact:
    """An artifact folder as bytes: ``manifest.json`` and every file it lists, by relative path."""

    name: str
    source: str
    files: dict[str, bytes]

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


def pack_artifact(path: str | Path) -> PackedArtifact:
    """Verify the artifact at ``path`` (sizes and sha256) and read its files into memory.

    Only ``manifest.json`` and the files the manifest lists travel; anything
    else in the folder is not part of the artifact.
    """
    from enginekit.artifact import verify_artifact
    from enginekit.manifest import MANIFEST_NAME, read_manifest

    root = Path(path)
    manifest = read_manifest(root)
    verify_artifact(root, manifest)
    rels = [MANIFEST_NAME, *sorted({f.path for c in manifest.components.values() for f in c.files})]
    return PackedArtifact(name=root.resolve().name, source=str(path),
                          files={rel: (root / rel).read_bytes() for rel in dict.fromkeys(rels)})


def unpack_artifact(packed: PackedArtifact, parent: str | Path) -> Path:
    """Write ``packed`` to ``parent/<name>`` and verify it there; return the folder.

    The sha256 check against the manifest proves the bytes arrived intact.
    """
    from enginekit.artifact import verify_artifact
    from enginekit.manifest import read_manifest

    root = Path(parent) / packed.name
    for rel, data in packed.files.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise IntegrityError(f"{packed.source}: packed file {rel!r} would land outside the artifact folder")
        target = root.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    verify_artifact(root, read_manifest(root))
    return root


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) of a Ray cluster's head (its GCS port, 6379 by default)."""
    if address.startswith("ray://"):
        raise InputError(
            f"--ray {address}: Ray Client addresses are not supported; run enginekit on a node of the "
            "cluster and give the head's HOST:PORT (the port `ray start --head` printed, 6379 by default)"
        )
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--ray {address!r}: give the cluster's head as HOST:PORT, e.g. 127.0.0.1:6379")
    return host, int(port)


def _check_reachable(address: str, timeout_s: float) -> None:
    """A plain TCP connect first: ``ray.init`` retries an unreachable address for minutes."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise InputError(
            f"no Ray cluster reachable at {address} ({exc.strerror or exc}); start one with "
            f"`ray start --head --port={port}` on that machine, or check the address"
        ) from exc


def _import_ray(connect_timeout_s: float) -> Any:
    with bounded_connect(connect_timeout_s):
        try:
            import ray
        except ImportError as exc:
            raise BackendUnavailableError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from exc
    return ray


def _bench_on_node(refs: list[Any], config: BenchConfig, device: str, backend: str | None,
                   baseline: bool, torch_baseline: bool = False) -> list[dict[str, Any]]:
    """The remote task: rebuild the artifacts in a temp folder, verify them, bench them
    (after PyTorch eager of their source models when ``torch_baseline``), drop them."""
    import ray

    node = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname()}
    records = []
    with tempfile.TemporaryDirectory(prefix="enginekit-bench-") as tmp:
        unpacked = []
        for i, ref in enumerate(refs):
            packed: PackedArtifact = ray.get(ref)
            unpacked.append((unpack_artifact(packed, Path(tmp) / str(i)), packed.source))
            del packed
        if torch_baseline:
            for rec in torch_baselines([path for path, _ in unpacked], config, progress=False):
                rec["node"] = dict(node)
                records.append(rec)
        for path, source in unpacked:
            for rec in bench_artifact(path, config, device, backend, baseline=baseline, progress=False):
                rec["engine"]["artifact"] = source  # the path the user gave, not the temp copy
                rec["node"] = dict(node)
                records.append(rec)
    return records


def _describe(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerHostname') or '?'} {node.get('NodeManagerAddress') or '?'} ({node['NodeID'][:8]})"


def _failure(exc: Exception) -> str:
    """One line from a Ray error: the task's own exception where Ray kept it, else Ray's last line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        lines = [ln for ln in str(cause).splitlines() if ln.strip()]
        return f"{type(cause).__name__}: {lines[0] if lines else ''}"
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def bench_on_ray(
    address: str,
    artifacts: Sequence[str | Path],
    config: BenchConfig,
    device: str = "cpu",
    backend: str | None = None,
    *,
    baseline: bool = False,
    torch_baseline: bool = False,
    shutdown: bool = True,
    whole_node: bool = True,
    num_cpus: float = 1.0,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    timeout_s: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Bench ``artifacts`` on every alive node of the Ray cluster at ``address``; return all records.

    Steps: 1. verify and pack each artifact here; 2. connect (bounded by
    ``connect_timeout_s``; never starts a cluster); 3. ``ray.put`` each artifact
    once; 4. one task per node, pinned with a hard node affinity, benching the
    artifacts in order exactly as a local run would; tasks on different nodes
    run at the same time, never two on one node; 5. gather, printing a line per
    node as it finishes.

    ``whole_node`` asks Ray for all of a node's CPUs, so no other Ray task
    shares the node while it is timed (nodes that offer no CPU, like a head
    started with ``--num-cpus=0``, are skipped); otherwise each task asks for
    ``num_cpus``. Either way the engine's thread count is ``config.threads``,
    as locally. Each record gains ``node``: ``{node_id, node_ip, hostname}``;
    ``engine.artifact`` is the path given here. A node that fails raises an
    error naming it once every node has finished; ``timeout_s`` bounds the whole wait.
    ``shutdown=False`` leaves the connection open for the caller to end (the CLI
    saves the records first, then exits without Ray's teardown, which has been
    seen to crash the driver process after all work is done).
    ``torch_baseline`` times PyTorch eager of each source model on every node first
    (``bench --baseline torch``), so each node's speed-ups are its own.
    """
    packs = [pack_artifact(p) for p in artifacts]  # 1. fail on a bad artifact before touching the cluster
    if not packs:
        raise InputError("no artifacts to bench")
    ray = _import_ray(connect_timeout_s)
    _check_reachable(address, connect_timeout_s)
    import logging

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    owned = not ray.is_initialized()
    if owned:  # 2.
        try:
            with bounded_connect(connect_timeout_s):
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise InputError(f"{address} answers but is not a Ray cluster's head (GCS port): {exc}") from exc
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = {n["NodeID"]: float((n.get("Resources") or {}).get("CPU", 0)) for n in nodes}
        want = {nid: (c if whole_node else num_cpus) for nid, c in cpus.items()}
        usable = [n for n in nodes if want[n["NodeID"]] > 0 and cpus[n["NodeID"]] >= want[n["NodeID"]]]
        skipped = [n for n in nodes if n not in usable]
        if not usable:
            raise InputError(f"the Ray cluster at {address} has no alive node with CPUs to run the bench on")
        refs = [ray.put(p) for p in packs]  # 3.
        task = ray.remote(max_calls=1)(_bench_on_node)  # a fresh worker process per run: clean peak RSS
        pending = {  # 4.
            task.options(num_cpus=want[n["NodeID"]], scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=n["NodeID"], soft=False)).remote(refs, config, device, backend, baseline, torch_baseline): n
            for n in usable
        }
        return _gather(ray, pending, skipped, timeout_s, progress)  # 5.
    finally:
        if owned and shutdown:
            ray.shutdown()


def _gather(ray: Any, pending: dict[Any, dict[str, Any]], skipped: list[dict[str, Any]],
            timeout_s: float | None, progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    failed: list[str] = []
    with tqdm(total=len(pending), desc="nodes", unit="node", file=sys.stderr, disable=not progress) as bar:
        for node in skipped:
            bar.write(f"skipped {_describe(node)}: it offers no CPU to Ray tasks", file=sys.stderr)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waiting = list(pending)
        while waiting:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, waiting = ray.wait(waiting, num_returns=1, timeout=left)
            if not done:
                for ref in waiting:
                    ray.cancel(ref, force=True)
                failed += [f"{_describe(pending[r])}: no result within {timeout_s:g} s" for r in waiting]
                break
            node = pending[done[0]]
            try:
                recs = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001  RayTaskError, WorkerCrashedError, NodeDiedError, ...
                failed.append(f"{_describe(node)}: {_failure(exc)}")
                bar.write(f"failed {_describe(node)}", file=sys.stderr)
            else:
                records += recs
                p50 = ", ".join(f"{r['engine']['name']} b{r['batch']} {r['latency_ms']['p50']:.2f} ms" for r in recs)
                bar.write(f"done {_describe(node)}: {p50}", file=sys.stderr)
            bar.update(1)
    if failed:
        raise EngineKitError(f"the bench failed on {len(failed)} of {len(pending)} node(s): " + "; ".join(failed))
    return records
