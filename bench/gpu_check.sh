#!/usr/bin/env bash
# The GPU path, checked and timed on one CUDA machine: installs what it needs into a fresh
# virtual environment, runs the GPU tests with ENGINEKIT_REQUIRE_GPU=1 (a missing GPU or
# TensorRT fails them instead of skipping), then times TensorRT, ONNX Runtime CUDA, PyTorch
# eager and torch.compile on vit_small_patch16_384 and SD 1.5 on the same card.
#
#   bash bench/gpu_check.sh                 # everything (SD 1.5's export and builds take a while)
#   GPU_CHECK_MODELS=vit bash bench/gpu_check.sh
#   GPU_CHECK_VENV=/path/to/venv bash bench/gpu_check.sh   # reuse an environment
#
# Results: out/gpu-check/{doctor.txt,tests.txt,bench.json,bench.md}. Nothing here has run yet:
# the first GPU box to run it is the first proof of the TensorRT and CUDA paths.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/gpu-check
VENV=${GPU_CHECK_VENV:-.venv-gpu}
MODELS=${GPU_CHECK_MODELS:-all}
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or lists none)" >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# onnxruntime-gpu instead of the CPU wheel (both install the `onnxruntime` module: never both);
# TensorRT and cuda-python from the tensorrt extra; Model Optimizer for fp16 AutoCast and Q/DQ.
"$PY" -m pip install -q -e ".[export,dev,tensorrt]" onnxruntime-gpu "nvidia-modelopt[onnx]"
"$PY" -m pip uninstall -q -y onnxruntime 2>/dev/null || true
"$PY" -m pip install -q --force-reinstall --no-deps onnxruntime-gpu

"$PY" -m enginekit.app.cli doctor | tee "$OUT/doctor.txt"

export ENGINEKIT_REQUIRE_GPU=1
"$PY" -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" \
    tests/runtimes/test_gpu.py tests/runtimes/test_tensorrt_gpu.py 2>&1 | tee "$OUT/tests.txt"
# The CPU-side checks of the same code, on the GPU box's versions.
"$PY" -m pytest -q -p no:cacheprovider tests/runtimes/test_tensorrt.py tests/runtimes/test_tensorrt_precision.py \
    2>&1 | tee -a "$OUT/tests.txt"

"$PY" -m benchmarks.gpu_bench --model "$MODELS" --work out/gpu-bench --json "$OUT/bench.json" | tee "$OUT/bench.md"
echo "gpu_check: done; results in $OUT"
