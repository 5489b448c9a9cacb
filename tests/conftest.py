"""Shared fixtures: tiny seeded ViTs in timm's and transformers' on-disk formats,
exported once per test session. No downloads; seconds on 2 CPU cores."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

TINY_TIMM_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
TIMM_LABELS = ["cat", "dog", "bird", "fish"]
HF_LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """The whole run (session fixtures and the subprocesses they start included) keeps its
    compiled-model and verified-file caches under the run's temp folder, never in ~/.cache."""
    saved = {k: os.environ.get(k) for k in ("ENGINEKIT_CACHE_DIR", "HF_HUB_OFFLINE")}
    os.environ["ENGINEKIT_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "cache")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], dict]) -> dict:
    """A session fixture's folders, built once per run: ``build(root)`` returns {key: path under
    root}. Under pytest-xdist the first worker to ask builds them in the run's shared temp folder
    while the others wait on a lock, then all read the same folders (tests never change them)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "shared"
    shared.mkdir(exist_ok=True)
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if done.exists():
            return {(tuple(k) if isinstance(k, list) else k): Path(v) for k, v in json.loads(done.read_text())}
        root = shared / name
        if root.exists():  # a worker that failed half-way
            shutil.rmtree(root)
        root.mkdir()
        out = build(root)
        done.write_text(json.dumps([[list(k) if isinstance(k, tuple) else k, str(v)] for k, v in out.items()]))
        return out


@pytest.fixture(scope="session")
def tiny_timm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny timm ViT saved with timm's own save_for_hf (config.json + model.safetensors)."""
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(TIMM_LABELS), **TINY_TIMM_ARGS)
    # A 0.875 crop and bicubic resize, as most timm ImageNet configs use.
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 0.875,
                            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    out = tmp_path_factory.mktemp("tiny-timm")
    save_for_hf(model, out, model_config={"label_names": TIMM_LABELS}, model_args=TINY_TIMM_ARGS, safe_serialization=True)
    for stale in out.glob("*.bin"):
        stale.unlink()
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers ViTForImageClassification saved with save_pretrained, with its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3, id2label=HF_LABELS,
                       label2id={v: k for k, v in HF_LABELS.items()})
    model = ViTForImageClassification(config).eval()
    out = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_timm_dir: Path, tiny_hf_dir: Path) -> dict[str, Path]:
    """ONNX artifacts of both tiny models: {'timm': path, 'hf': path}."""
    from enginekit.export.vit import export_classifier

    def build(root: Path) -> dict:
        out = {}
        for name, src in (("timm", tiny_timm_dir), ("hf", tiny_hf_dir)):
            export_classifier(str(src), root / name)
            out[name] = root / name
        return out

    return built_once(tmp_path_factory, "exported", build)


def installed_backends() -> list[str]:
    from enginekit.registry import backend_class, backend_names

    return [n for n in backend_names() if backend_class(n).is_available()]


def _with_engines(root: Path, exports: dict[str, Path]) -> dict[tuple[str, str], Path]:
    """Each ONNX export compiled for every installed backend: {(name, "onnx" or backend): path}."""
    from enginekit.api import compile_artifact

    out: dict[tuple[str, str], Path] = {}
    for name, onnx_dir in exports.items():
        out[(name, "onnx")] = onnx_dir
        for backend in installed_backends():
            compile_artifact(onnx_dir, backend, root / f"{name}-{backend}")
            out[(name, backend)] = root / f"{name}-{backend}"
    return out


def _pipelines_with_engines(root: Path, names: tuple[str, ...]) -> dict[tuple[str, str], Path]:
    from enginekit.export.diffusion.sd import export_pipeline

    for name in names:
        export_pipeline(name, root / name)
    return _with_engines(root, {name: root / name for name in names})


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory, exported: dict[str, Path]) -> dict[tuple[str, str], Path]:
    """Every (source, artifact kind) pair: the exported ONNX plus one engine per installed backend."""
    return built_once(tmp_path_factory, "compiled", lambda root: _with_engines(root, exported))


def make_photo(size: tuple[int, int], seed: int, mode: str = "RGB") -> "object":
    """A seeded synthetic photo: gradients, a disc, noise and fine stripes."""
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 128 + 100 * np.sin(xx / 3.0) * np.cos(yy / 5.0)
    disc = ((xx - w * 0.6) ** 2 + (yy - h * 0.4) ** 2) < (min(w, h) * 0.2) ** 2
    img = np.stack([r, g, b], axis=-1)
    img[disc] = [250, 30, 60]
    img += rng.normal(0, 12, img.shape)
    arr = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """The built-in tiny pipelines exported once per session and compiled for every
    installed backend: {(name, kind): path}, name in tiny-sd15 / tiny-sdxl / tiny-sd3 / tiny-flux, kind onnx or a backend."""
    names = ("tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux")
    return built_once(tmp_path_factory, "pipelines", lambda root: _pipelines_with_engines(root, names))


@pytest.fixture(scope="session")
def inpainting(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """The built-in tiny inpainting pipelines (9-channel UNets), exported once per session and
    compiled for every installed backend: {(name, kind): path}."""
    names = ("tiny-sd15-inpainting", "tiny-sdxl-inpainting")
    return built_once(tmp_path_factory, "inpainting", lambda root: _pipelines_with_engines(root, names))


def make_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> "object":
    """An inpainting mask: white (repaint) inside ``box`` (x1, y1, x2, y2), black elsewhere, soft-edged."""
    from PIL import Image, ImageDraw, ImageFilter

    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(2))


def diffusers_twin(name: str) -> "object":
    """The seeded diffusers pipeline an exported built-in came from (rebuilt, identical weights)."""
    from enginekit.export.diffusion.sources import resolve_pipeline

    return resolve_pipeline(name).pipeline


def twin_cache() -> Callable[[str], object]:
    """A module's own memo of :func:`diffusers_twin` (progress bars off): one build per name per
    module, and no module sees another's changes to its twins (schedulers, hooks)."""
    twins: dict[str, object] = {}

    def twin(name: str) -> object:
        if name not in twins:
            pipe = diffusers_twin(name)
            pipe.set_progress_bar_config(disable=True)
            twins[name] = pipe
        return twins[name]

    return twin


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of ``image`` against ``reference``, both floats in [0, 1]."""
    from enginekit.fidelity import psnr as _psnr

    return _psnr(reference, image)


#: A loopback-only network namespace (and its own PIDs): Ray binds 127.0.0.1 there.
ISOLATE = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]


def skip_unless_loopback_namespace(what: str) -> None:
    """Skip, saying why, where ``what`` cannot run in a loopback-only network namespace."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        pytest.skip(f"{what} runs Ray in its own network namespace, which needs root")
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{what} needs `{tool}` (util-linux / iproute2)")
    try:
        probe = subprocess.run([*ISOLATE, "ip", "link", "set", "lo", "up"], check=False, capture_output=True,
                               text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.skip("`unshare` did not return within 15 s")
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network and PID namespace here ({probe.stderr.strip() or probe.returncode})")


# --- markers and backends ------------------------------------------------------------------
# `gpu` tests need a CUDA GPU, `tensorrt` tests need TensorRT; both are skipped with a reason
# where the hardware or library is missing, and ENGINEKIT_REQUIRE_GPU=1 (set on a GPU box)
# turns those skips into failures so a GPU run cannot pass by skipping everything.

def _cuda_gpu() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


_FOUND: dict[str, bool] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    needs = {"gpu": ("a CUDA GPU", _cuda_gpu), "tensorrt": ("TensorRT", _tensorrt)}
    for mark, (what, probe) in needs.items():
        if item.get_closest_marker(mark) is None:
            continue
        if mark not in _FOUND:
            _FOUND[mark] = bool(probe())
        if _FOUND[mark]:
            continue
        if os.environ.get("ENGINEKIT_REQUIRE_GPU") == "1":
            pytest.fail(f"ENGINEKIT_REQUIRE_GPU=1 but {what} is missing", pytrace=False)
        pytest.skip(f"needs {what} (none here)")


def backend_params(*extra: str) -> list:
    """Every registered backend as a pytest param, so a missing one shows as a skip with its
    reason instead of a silently shorter list (plus ``extra`` kinds such as "onnx")."""
    from enginekit.registry import backend_class, backend_names

    params = [pytest.param(k, id=k) for k in extra]
    for name in backend_names():
        available = backend_class(name).is_available()
        params.append(pytest.param(name, id=name, marks=() if available else
                                   pytest.mark.skip(reason=f"backend {name} is not installed here")))
    return params


def cli_ok(result: Any) -> Any:
    """A CliRunner result that succeeded (its output shown when it did not)."""
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result: Any, *needles: str) -> str:
    """The command failed with exactly one line, ``Error: ...``, naming every needle."""
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[0]
