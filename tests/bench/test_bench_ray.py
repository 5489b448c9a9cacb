"""`enginekit bench --ray`: artifacts shipped as bytes, and a real two-node Ray cluster on this machine.

Ray binds the machine's interface address whatever ``--node-ip-address`` says,
so the cluster runs in a fresh network namespace holding only loopback; a fresh
PID namespace too, so ``ray stop --force`` sees only this cluster and the
kernel ends every process in it when the test's shell exits (or is killed).
That needs root and ``unshare``; the test skips, saying why, where either is
missing, or where Ray is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from enginekit.bench.cluster import pack_artifact, parse_address, unpack_artifact
from enginekit.bench.store import ResultsStore

from enginekit.app.cli import cli
from enginekit.errors import InputError, IntegrityError

from ..conftest import ISOLATE, skip_unless_loopback_namespace

HAVE_RAY = importlib.util.find_spec("ray") is not None
NODES = 2  # a head with 2 CPUs and a worker with 1: two Ray nodes on one 2-core machine
CLUSTER_TIMEOUT_S = 150


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: ") and needle in lines[-1], result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- no Ray needed

def test_pack_unpack_round_trip(exported: dict, tmp_path: Path) -> None:
    packed = pack_artifact(exported["timm"])
    assert "manifest.json" in packed.files and packed.name == "timm" and packed.source == str(exported["timm"])
    root = unpack_artifact(packed, tmp_path / "a")
    assert root == tmp_path / "a" / "timm"
    assert {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()} == packed.files

    name = next(k for k in packed.files if k != "manifest.json")
    flipped = bytearray(packed.files[name])
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(IntegrityError, match="sha256"):
        unpack_artifact(replace(packed, files={**packed.files, name: bytes(flipped)}), tmp_path / "b")
    with pytest.raises(IntegrityError, match="outside"):
        unpack_artifact(replace(packed, files={**packed.files, "../escape": b"x"}), tmp_path / "c")
    assert not (tmp_path / "c" / "escape").exists()


def test_parse_address() -> None:
    assert parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert parse_address("[::1]:6379") == ("::1", 6379)
    for bad in ("10.0.0.5", "host:port", ":6379", "host:0", "host:70000"):
        with pytest.raises(InputError, match="HOST:PORT"):
            parse_address(bad)
    with pytest.raises(InputError, match="Ray Client"):
        parse_address("ray://10.0.0.5:10001")


def test_ray_missing_names_the_extra(exported: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(cli, ["bench", str(exported["timm"]), "--ray", "127.0.0.1:6379"])
    _one_line_error(result, "pip install 'enginekit[ray]'")


# ---------------------------------------------------------------- errors before a cluster

needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: pip install 'enginekit[ray]'")


@needs_ray
def test_unreachable_address_is_one_line_and_quick(exported: dict, tmp_path: Path) -> None:
    start = time.monotonic()
    result = CliRunner().invoke(cli, ["bench", str(exported["timm"]), "--ray", f"127.0.0.1:{_free_port()}",
                                      "--store", str(tmp_path / "r.jsonl")])
    _one_line_error(result, "no Ray cluster reachable at 127.0.0.1:")
    assert time.monotonic() - start < 45  # bounded: without the socket check Ray retried for minutes
    assert not (tmp_path / "r.jsonl").exists()


@needs_ray
def test_port_that_is_not_ray_fails_bounded(exported: dict, tmp_path: Path) -> None:
    """Something answers TCP but speaks no GCS: Ray alone would retry for many minutes."""
    # Outside a namespace Ray swaps 127.0.0.1 for the machine's address, so listen on all of them.
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    try:
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "enginekit.app.cli", "bench", str(exported["timm"]), "--ray",
                               f"127.0.0.1:{port}", "--store", str(tmp_path / "r.jsonl")],
                              check=False, capture_output=True, text=True, timeout=120, env=env)
        elapsed = time.monotonic() - start
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ") and "not a Ray cluster" in proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"


# ---------------------------------------------------------------- a real cluster

@pytest.fixture(scope="session")
def isolation() -> None:
    """Skip (before the session fixtures export anything) where the cluster cannot be made."""
    if not HAVE_RAY:
        pytest.skip("Ray is not installed: pip install 'enginekit[ray]'")
    if not (Path(sys.executable).parent / "ray").is_file():
        pytest.skip(f"no `ray` command beside {sys.executable}")
    skip_unless_loopback_namespace("the Ray cluster test")


def test_bench_on_a_two_node_cluster(isolation: None, exported: dict, tmp_path: Path) -> None:
    store, run_json = tmp_path / "results" / "results.jsonl", tmp_path / "run.json"
    artifacts = [exported["timm"], exported["hf"]]
    # Ray puts Unix sockets under its temp dir; pytest's tmp_path is too long for their 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="ekray-", dir="/tmp")
    bench = [sys.executable, "-m", "enginekit.app.cli", "bench", *map(str, artifacts), "--ray", "127.0.0.1:6379",
             "--batch", "1", "--runs", "3", "--warmup", "1", "--baseline", "torch", "--store", str(store),
             "--json", str(run_json)]
    memory = "--object-store-memory=100000000"
    script = "\n".join([
        "set -euo pipefail",
        "ip link set lo up",
        "trap 'ray stop --force >/dev/null 2>&1 || true' EXIT",
        # A fresh namespace: nothing else listens, so Ray's default port is free.
        ("ray start --head --port=6379 --num-cpus=2 --include-dashboard=false --disable-usage-stats "
         f"--temp-dir={shlex.quote(ray_tmp)} {memory}"),
        f"ray start --address=127.0.0.1:6379 --num-cpus=1 {memory}",
        shlex.join(bench),
    ])
    # RAY_AUTH_MODE: a token another local cluster left in ~/.ray would turn token auth on for the
    # head, and the worker's `ray start` would be refused; this cluster lives in a loopback-only namespace.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONFAULTHANDLER": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        proc = subprocess.run([*ISOLATE, "bash", "-c", script], check=False, capture_output=True, text=True,
                              env=env, timeout=CLUSTER_TIMEOUT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, output

    everything = json.loads(run_json.read_text())
    records = [r for r in everything if not r["baseline"]]
    baselines = [r for r in everything if r["baseline"]]
    nodes = {r["node"]["node_id"] for r in records}
    assert len(nodes) == NODES, output
    assert len(records) == NODES * len(artifacts)
    for node in nodes:
        mine = [r for r in records if r["node"]["node_id"] == node]
        assert sorted(r["engine"]["artifact"] for r in mine) == sorted(map(str, artifacts))
        # PyTorch eager of each source model ran on that node too, and speed-ups are against it
        bases = {r["model"]: r for r in baselines if r["node"]["node_id"] == node}
        assert len(bases) == len(artifacts) and all(b["engine"]["backend"] == "pytorch" for b in bases.values())
        for rec in mine:
            assert rec["speedup"] == pytest.approx(bases[rec["model"]]["latency_ms"]["p50"] / rec["latency_ms"]["p50"])
    for rec in records:
        assert rec["node"]["node_ip"] == "127.0.0.1" and rec["node"]["hostname"]
        assert rec["hardware"]["cpu_model"] and rec["hardware_id"]
        assert rec["runs"] == 3 and rec["batch"] == 1
        assert 0 < rec["latency_ms"]["p50"] <= rec["latency_ms"]["max"] and rec["throughput_ips"] > 0
    assert proc.stderr.count("done ") == NODES, output

    stored = ResultsStore(store).read()
    assert [(r["node"]["node_id"], r["engine"]["name"]) for r in stored] == \
        [(r["node"]["node_id"], r["engine"]["name"]) for r in everything]
    result = CliRunner().invoke(cli, ["bench", "report", str(store), "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = (tmp_path / "report" / "report.md").read_text()
    # Both nodes are this machine: one node type, so one hardware section.
    sections = [ln for ln in report.splitlines() if ln.startswith("## ")]
    assert len(sections) == 1 and records[0]["hardware_id"] in sections[0], report
