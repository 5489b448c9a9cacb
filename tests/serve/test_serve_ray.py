"""`enginekit serve --ray`: options and errors here; the real thing (a local Ray cluster,
two replicas, KServe v2, /v1 classify and generate, health, serve.status(), Ctrl-C) in
tests/serve/_serve_ray_inner.py, which this file runs in a fresh network and PID namespace
holding only loopback. Ray binds the machine's interface address whatever it is told,
so only there does it stay on 127.0.0.1; the PID namespace makes the kernel end every
Ray process when the run ends (or is killed). That needs root and ``unshare``: the test
skips, saying why, where either is missing, or where Ray Serve is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from enginekit.app.cli import cli
from enginekit.errors import InputError
from enginekit.serve.settings import ServeSettings
from ..conftest import ISOLATE, skip_unless_loopback_namespace

HAVE_SERVE = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("grpc") is not None
INNER_TIMEOUT_S = 300
INNER = Path(__file__).with_name("_serve_ray_inner.py")
INNER_TESTS = 7


def _one_line_error(result, needle: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: ") and needle in lines[-1], result.output


# ---------------------------------------------------------------- no cluster needed

def test_deployment_options_fixed_and_autoscaled() -> None:
    from enginekit.serve.ray import RayOptions, deployment_options

    settings = ServeSettings(max_batch=8, max_queue=64, drain_timeout_s=30)
    fixed = deployment_options(settings, RayOptions(replicas=3, replica_cpus=2))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["max_ongoing_requests"] == 64 + 8  # the app's own queue bounds what waits, not Ray's 5
    assert fixed["graceful_shutdown_timeout_s"] == 30
    scaled = deployment_options(settings, RayOptions(replicas=2, max_replicas=6))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 6,
                                            "target_ongoing_requests": 8}


def test_ray_options_refuse_bad_values() -> None:
    from enginekit.serve.ray import RayOptions

    for kwargs, needle in (({"replicas": 0}, "replicas"), ({"replicas": 4, "max_replicas": 2}, "max-replicas"),
                           ({"replica_cpus": -1}, "replica-cpus"), ({"address": "10.0.0.5"}, "HOST:PORT"),
                           ({"address": "ray://10.0.0.5:10001"}, "Ray Client")):
        with pytest.raises(InputError, match=needle):
            RayOptions(**kwargs)


def test_cli_ray_options_need_ray_and_workers_do_not_mix(exported: dict) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", str(exported["timm"]), "--replicas", "2"])
    _one_line_error(result, "--replicas only go with --ray", code=2)
    result = runner.invoke(cli, ["serve", str(exported["timm"]), "--ray", "--workers", "2"])
    _one_line_error(result, "use --replicas", code=2)


def test_cli_ray_missing_names_the_extra(exported: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(cli, ["serve", str(exported["timm"]), "--ray"])
    _one_line_error(result, "pip install 'enginekit[ray]'")


def test_cli_ray_refuses_a_bad_artifact_before_any_cluster(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", f"x={tmp_path / 'missing'}", "--ray"])
    _one_line_error(result, "missing")


@pytest.mark.skipif(not HAVE_SERVE, reason="Ray Serve is not installed: pip install 'enginekit[ray]'")
def test_cli_ray_address_unreachable_is_one_line(exported: dict) -> None:
    from enginekit.serve.testing import free_port

    result = CliRunner().invoke(cli, ["serve", str(exported["timm"]), "--ray", "--ray-address",
                                      f"127.0.0.1:{free_port()}"])
    _one_line_error(result, "no Ray cluster reachable at 127.0.0.1:")


# ---------------------------------------------------------------- a real cluster, in a namespace

def _skip_unless_isolated() -> None:
    if not HAVE_SERVE:
        pytest.skip("Ray Serve is not installed: pip install 'enginekit[ray]'")
    skip_unless_loopback_namespace("the Ray Serve test")


def test_ray_serve_two_replicas_in_a_loopback_namespace(exported: dict, tiny_pipelines: dict) -> None:
    _skip_unless_isolated()
    artifacts = {"clf": str(exported["timm"]), "sd": str(tiny_pipelines[("tiny-sd15", "onnx")])}
    # Ray puts Unix sockets under its temp dir; pytest's tmp_path is too long for their 107-byte limit.
    ray_tmp = tempfile.mkdtemp(prefix="ekserve-", dir="/tmp")
    env = {**os.environ, "ENGINEKIT_RAY_ARTIFACTS": json.dumps(artifacts), "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           # Requests and answers are all the object store holds here: 1 % of memory is plenty.
           "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.01",
           # Told, not guessed: Ray turns token auth on when ~/.ray/auth_token exists, so the
           # mode and the token are this cluster's own and nothing is written to $HOME.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": os.path.join(ray_tmp, "auth_token")}
    Path(env["RAY_AUTH_TOKEN_PATH"]).write_text(secrets.token_hex(32))
    root = Path(__file__).resolve().parents[2]
    inner = [sys.executable, "-m", "pytest", str(INNER), "-q", "-x", "-p", "no:cacheprovider",
             "--basetemp", os.path.join(ray_tmp, "pt"), "-o", "addopts=", "-p", "no:warnings"]
    script = f"ip link set lo up && exec {' '.join(map(_quote, inner))}"
    try:
        proc = subprocess.run([*ISOLATE, "bash", "-c", script], check=False, capture_output=True, text=True,
                              env=env, cwd=root, timeout=INNER_TIMEOUT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert re.match(rf"{INNER_TESTS} passed in ", summary), output  # every inner test ran; none skipped


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
