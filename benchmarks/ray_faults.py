"""Kill one Ray Serve replica under load, on a two-host cluster the script builds itself,
and count what happened to the requests.

    sudo python -m benchmarks.ray_faults --classifier out/clf [--requests 600 --rate 20]

1. Two network namespaces joined by a veth pair, 10.213.0.1/30 (the "head" host) and
   10.213.0.2/30 (the "worker" host): the addresses exist only inside them, so Ray's
   traffic goes between those two and loopback, nowhere else. Each host also gets its
   own PID namespace, so everything Ray starts there ends with it.
2. A Ray head on one (1 CPU), a Ray worker on the other (1 CPU), and ``enginekit serve
   --ray --replicas 2 --replica-cpus 1`` on the head: one replica per host.
3. A bounded load (``--requests`` classify requests at ``--rate`` per second from
   ``--concurrency`` clients, stopped at ``--time-limit`` seconds) through the head's
   proxy; once ``--kill-at`` of them are sent, the head's replica process gets SIGKILL.
4. Counts: requests, answered (200), refused (503 with Retry-After), lost (anything
   else: a 5xx, a 503 without Retry-After, a dropped connection, a timeout), the first
   answer after the kill, and the recovery time (the kill until ``serve.status()``
   counts two running replicas again, after it counted one fewer).

Needs root, ``ip`` and ``unshare``, and Ray Serve (``enginekit[ray]``). Prints a table,
or ``--json`` one JSON object. Exit status 0 when the run completed (whatever it counted).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

__all__ = ["main", "HEAD_IP", "WORKER_IP"]

HEAD_IP, WORKER_IP = "10.213.0.1", "10.213.0.2"
GCS_PORT, HTTP_PORT = 6379, 8000
RESULT = "RESULT "
REPLICA_HEADER = "x-enginekit-replica"


def _ray_cli(*args: str) -> list[str]:
    # The ray console script may not be on PATH in a venv that was not activated.
    return [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()",
            *args]


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------- 1. the two hosts (outer process)

@contextlib.contextmanager
def two_hosts(tag: str) -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair; removed (with their links) at the end."""
    head, worker = f"ekf-head-{tag}", f"ekf-work-{tag}"
    veth_h, veth_w = f"ekfh{tag}"[:15], f"ekfw{tag}"[:15]
    made: list[str] = []
    try:
        for ns in (head, worker):
            _run(["ip", "netns", "add", ns])
            made.append(ns)
        _run(["ip", "link", "add", veth_h, "netns", head, "type", "veth", "peer", "name", veth_w, "netns", worker])
        for ns, dev, ip in ((head, veth_h, HEAD_IP), (worker, veth_w, WORKER_IP)):
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        yield head, worker
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


def _in_host(ns: str, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Run ``argv`` in namespace ``ns`` and a PID namespace of its own (ended with it)."""
    cmd = ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *argv]
    with log.open("w") as sink:
        return subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def ray_token_env(folder: Path) -> dict[str, str]:
    """One token for this cluster, in ``folder``, named to every process explicitly. Ray >= 2.5x
    turns token auth on by itself when ``~/.ray/auth_token`` exists (which any earlier local
    ``ray.init()`` writes), so a process that looked before another wrote it disagrees with the
    cluster: every process here is told the mode and the token instead of guessing."""
    path = folder / "auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def outer(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("ray_faults.py makes network namespaces, which needs root")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            raise SystemExit(f"ray_faults.py needs `{tool}`")
    work = Path(tempfile.mkdtemp(prefix="ekf-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.01", **ray_token_env(work)}
    me = [sys.executable, str(Path(__file__).resolve())]
    procs: list[subprocess.Popen] = []
    try:
        with two_hosts(str(os.getpid())) as (head, worker):
            common = ["--classifier", str(Path(args.classifier).resolve()), "--requests", str(args.requests),
                      "--rate", str(args.rate), "--concurrency", str(args.concurrency), "--kill-at",
                      str(args.kill_at), "--time-limit", str(args.time_limit)]
            head_env = {**env, "RAY_TMPDIR": str(work / "h")}
            worker_env = {**env, "RAY_TMPDIR": str(work / "w")}
            procs.append(_in_host(head, [*me, "--role", "head", *common], work / "head.log", head_env))
            procs.append(_in_host(worker, [*me, "--role", "worker"], work / "worker.log", worker_env))
            deadline = time.monotonic() + args.time_limit + 400
            while procs[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            head_log = (work / "head.log").read_text(errors="replace")
            line = next((ln for ln in reversed(head_log.splitlines()) if ln.startswith(RESULT)), None)
            if line is None:
                tail = head_log[-3000:] + "\n--- worker ---\n" + (work / "worker.log").read_text(errors="replace")[-1500:]
                raise SystemExit(f"the head gave no result (exit {procs[0].poll()}):\n{tail}")
            return json.loads(line[len(RESULT):])
    finally:
        for proc in procs:  # the PID namespace's first process: its end kills the rest
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- 2. the worker host

def worker_role() -> int:
    """Join the head once it answers, then stay (the outer process ends this namespace)."""
    for _ in range(240):
        code = subprocess.run(_ray_cli("start", f"--address={HEAD_IP}:{GCS_PORT}", f"--node-ip-address={WORKER_IP}",
                                       "--num-cpus=1", "--disable-usage-stats"), check=False).returncode
        if code == 0:
            break
        time.sleep(1)
    else:
        return 1
    while True:
        time.sleep(3600)


# ---------------------------------------------------------------- 3. the head host: cluster, serve, load

def _wait_nodes(count: int, timeout_s: float) -> None:
    import ray

    ray.init(address=f"{HEAD_IP}:{GCS_PORT}", logging_level="WARNING", log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout_s
        while sum(1 for n in ray.nodes() if n["Alive"]) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {sum(1 for n in ray.nodes() if n['Alive'])} of {count} Ray nodes joined")
            time.sleep(1)
    finally:
        ray.shutdown()


def _local_replica_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if b"ServeReplica" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _image() -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def head_role(args: argparse.Namespace) -> int:
    subprocess.run(_ray_cli("start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={GCS_PORT}", "--num-cpus=1",
                            "--include-dashboard=false", "--disable-usage-stats"), check=True)
    t0 = time.monotonic()
    _wait_nodes(2, 300)
    serve_log = Path(os.environ["RAY_TMPDIR"]) / "serve.log"
    cmd = [sys.executable, "-m", "enginekit.app.cli", "serve", f"clf={args.classifier}", "--ray", "--replicas", "2",
           "--replica-cpus", "1", "--ray-address", f"{HEAD_IP}:{GCS_PORT}", "--host", HEAD_IP, "--port",
           str(HTTP_PORT), "--device", "cpu", "--max-batch", "4", "--log-level", "warning"]
    with serve_log.open("w") as sink:
        served = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        while "through Ray Serve" not in serve_log.read_text(errors="replace"):
            if served.poll() is not None or time.monotonic() - t0 > 400:
                raise SystemExit(f"serve --ray did not come up: {serve_log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        startup_s = time.monotonic() - t0
        with ReplicaMonitor() as monitor:
            result = load_and_kill(f"http://{HEAD_IP}:{HTTP_PORT}", args)
            kill_t = result.pop("kill_t")
            result["recovery_s"] = monitor.recovery(kill_t, timeout_s=120) if kill_t else None
        result["startup_s"] = round(startup_s, 1)
        print(RESULT + json.dumps(result), flush=True)
    finally:
        served.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            served.wait(60)
    return 0


class ReplicaMonitor:
    """Polls the deployment's replica states (``serve.status()``) from a driver of its own."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ReplicaMonitor:
        import ray

        ray.init(address=f"{HEAD_IP}:{GCS_PORT}", logging_level="WARNING", log_to_driver=False)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        self._stop.set()
        self._thread.join(30)
        ray.shutdown()

    def _poll(self) -> None:
        from ray import serve

        from enginekit.serve.ray import replica_states

        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the controller busy or restarting: the next poll tells
                self.samples.append((time.monotonic(), replica_states(serve).get("RUNNING", 0)))
            time.sleep(0.25)

    def recovery(self, kill_t: float, timeout_s: float) -> float | None:
        """Seconds from the kill until two replicas run again, after the deployment saw one fewer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            after = [(t, n) for t, n in list(self.samples) if t >= kill_t]
            dip = next((t for t, n in after if n < 2), None)
            back = next((t for t, n in after if dip is not None and t > dip and n >= 2), None)
            if back is not None:
                return round(back - kill_t, 1)
            time.sleep(0.5)
        return None


def load_and_kill(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The bounded load, the kill, and the counts."""
    import httpx

    body = {"images": [_image()], "top_k": 1}
    lock = threading.Lock()
    counts = {"requests": 0, "answered": 0, "refused": 0, "lost": 0}
    lost_reasons: dict[str, int] = {}
    seen: set[str | None] = set()
    state: dict[str, Any] = {"kill_t": None, "killed_pid": None, "answered_t": None, "last_failure_t": None}
    next_index = iter(range(args.requests))
    kill_index = int(args.requests * args.kill_at)
    start = time.monotonic()
    stop_at = start + args.time_limit

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None or time.monotonic() > stop_at:
                    return
                delay = start + i / args.rate - time.monotonic()  # an open-loop schedule at --rate
                if delay > 0:
                    time.sleep(delay)
                if i == kill_index:
                    kill()
                with lock:
                    counts["requests"] += 1
                outcome, replica = "lost", None
                try:
                    r = http.post(f"{url}/v1/classify", json=body)
                    replica = r.headers.get(REPLICA_HEADER, "").split(" pid=")[0] or None
                    if r.status_code == 200:
                        outcome = "answered"
                    elif r.status_code == 503 and "retry-after" in r.headers:
                        outcome = "refused"
                    else:
                        reason = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    reason = type(exc).__name__
                now = time.monotonic()
                with lock:
                    counts[outcome] += 1
                    if outcome == "lost":
                        lost_reasons[reason] = lost_reasons.get(reason, 0) + 1
                    if outcome != "answered" and state["kill_t"] is not None:
                        state["last_failure_t"] = now
                    if outcome == "answered":
                        seen.add(replica)
                        if state["kill_t"] is not None and state["answered_t"] is None:
                            state["answered_t"] = now

    def kill() -> None:
        pids = _local_replica_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            with lock:
                state["kill_t"], state["killed_pid"] = time.monotonic(), pids[0]

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_s = time.monotonic() - start
    kill_t = state["kill_t"]
    return {
        **counts,
        "lost_reasons": lost_reasons,
        "replicas_answering": len(seen),
        "killed": state["killed_pid"] is not None,
        "kill_t": kill_t,
        "first_answer_after_kill_s": round(state["answered_t"] - kill_t, 2) if kill_t and state["answered_t"] else None,
        "failures_until_s": round(state["last_failure_t"] - kill_t, 1) if kill_t and state["last_failure_t"] else 0.0,
        "load_s": round(load_s, 1),
        "rate": args.rate,
        "concurrency": args.concurrency,
    }


# ---------------------------------------------------------------- the table

def render(result: dict[str, Any]) -> str:
    rows = [("requests", result["requests"]), ("answered (200)", result["answered"]),
            ("refused (503 + Retry-After)", result["refused"]), ("lost", result["lost"]),
            ("lost, by reason", ", ".join(f"{k} {v}" for k, v in result["lost_reasons"].items()) or "-"),
            ("replicas that answered", result["replicas_answering"]),
            ("first answer after the kill", f"{result['first_answer_after_kill_s']} s"),
            ("recovery (kill -> 2 replicas running)", f"{result['recovery_s']} s" if result["recovery_s"] is not None
             else "not within 120 s"),
            ("failures seen until", f"{result['failures_until_s']} s after the kill"),
            ("load", f"{result['load_s']} s at {result['rate']}/s, {result['concurrency']} clients"),
            ("cluster + serve startup", f"{result.get('startup_s')} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classifier", type=Path, help="An image-classification artifact.")
    parser.add_argument("--requests", type=int, default=600, help="Requests to send (the load's bound).")
    parser.add_argument("--rate", type=float, default=20.0, help="Requests per second.")
    parser.add_argument("--concurrency", type=int, default=4, help="Clients sending at once.")
    parser.add_argument("--kill-at", type=float, default=0.3, help="Kill once this fraction of requests is sent.")
    parser.add_argument("--time-limit", type=float, default=120.0, help="Stop sending after this many seconds.")
    parser.add_argument("--json", action="store_true", help="Print the counts as one JSON object.")
    parser.add_argument("--role", choices=["outer", "head", "worker"], default="outer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "worker":
        return worker_role()
    if args.classifier is None:
        parser.error("--classifier is required")
    if args.role == "head":
        return head_role(args)
    result = outer(args)
    print(json.dumps(result) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
