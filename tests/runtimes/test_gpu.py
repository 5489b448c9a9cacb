"""The GPU path: run only where a CUDA GPU (and, for the second test, TensorRT) is present.

Both are marked, so a CPU box shows them as skips with the reason, and a GPU box run with
ENGINEKIT_REQUIRE_GPU=1 fails instead of skipping them when the hardware is not seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ..conftest import make_photo


@pytest.mark.gpu
def test_onnxruntime_on_the_gpu_matches_the_cpu(exported: dict[str, Path], tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    import enginekit
    from enginekit.api import compile_artifact
    from enginekit.engine import CompileOptions

    gpu_dir = tmp_path / "gpu"
    compile_artifact(exported["timm"], "onnxruntime", gpu_dir, CompileOptions(device="gpu"))
    photos = [make_photo((96, 80), seed) for seed in range(4)]
    on_cpu = enginekit.load(exported["timm"], device="cpu").predict(photos)
    on_gpu = enginekit.load(gpu_dir, device="gpu").predict(photos)
    assert [p.label for p in on_gpu] == [p.label for p in on_cpu]
    assert np.allclose([p.score for p in on_gpu], [p.score for p in on_cpu], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnx(exported: dict[str, Path], tmp_path: Path) -> None:
    import enginekit
    from enginekit.api import compile_artifact
    from enginekit.engine import CompileOptions

    plan = tmp_path / "trt"
    compile_artifact(exported["timm"], "tensorrt", plan, CompileOptions(device="gpu"))
    photos = [make_photo((96, 80), seed) for seed in range(4)]
    reference = enginekit.load(exported["timm"], device="cpu").predict(photos)
    got = enginekit.load(plan, device="gpu").predict(photos)
    assert [p.label for p in got] == [p.label for p in reference]
