"""NVIDIA Model Optimizer, run in a child process.

Model Optimizer's ONNX quantizer patches ``onnxruntime.quantization`` in place when it runs
(calibrators, the QDQ registry, ``quantize_static``'s checks: ``ort_patching.patch_ort_modules``)
and never puts it back, so in the same process ONNX Runtime's own static quantization then fails
("Quantization parameters are not specified for param ..."). It also imports torch. Both stay out
of enginekit's process: each AutoCast or Q/DQ job runs here, in ``python -m`` of this module, and
a failure comes back as its one-line message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["run_modelopt", "ModeloptFailed"]

_PREFIX = "enginekit-modelopt-error: "


class ModeloptFailed(RuntimeError):
    """The child's one-line reason (the caller wraps it in its own error type)."""


def run_modelopt(op: str, scratch: Path, calibration: Mapping[str, np.ndarray] | None = None,
                 **args: Any) -> None:
    """Run ``op`` ("autocast" or "quantize") with ``args`` in a child Python; calibration
    arrays travel through an .npz in ``scratch``."""
    scratch.mkdir(parents=True, exist_ok=True)
    request = {"op": op, "args": args}
    if calibration is not None:
        np.savez(scratch / "calibration.npz", **calibration)
        request["calibration"] = str(scratch / "calibration.npz")
    (scratch / "request.json").write_text(json.dumps(request))
    proc = subprocess.run([sys.executable, "-m", "enginekit.runtimes.tensorrt_modelopt", str(scratch / "request.json")],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = next((ln[len(_PREFIX):] for ln in lines if ln.startswith(_PREFIX)), lines[-1] if lines else
                      f"exit status {proc.returncode}")
        raise ModeloptFailed(reason.strip())


def _autocast(args: Mapping[str, Any]) -> None:
    import logging

    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.logging_config import configure_logging

    configure_logging(logging.ERROR)  # it logs every pass at INFO
    model = convert_to_mixed_precision(onnx_path=args["source"], low_precision_type=args["precision"],
                                       keep_io_types=True, providers=["cpu"])
    large = model.ByteSize() > 1_800_000_000
    onnx.save(model, args["dest"], save_as_external_data=large, all_tensors_to_one_file=True,
              location="model.onnx.data" if large else None)


def _quantize(args: Mapping[str, Any], calibration: Mapping[str, np.ndarray]) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(args["source"], quantize_mode=args["mode"], calibration_data=dict(calibration),
             calibration_method=args["method"], calibration_eps=["cpu"], output_path=args["dest"],
             nodes_to_exclude=args.get("exclude") or None, high_precision_dtype="fp32",
             use_external_data_format=bool(args.get("external")), log_level="ERROR")


def _main(path: str) -> int:
    from enginekit.errors import one_line

    request = json.loads(Path(path).read_text())
    try:
        if request["op"] == "autocast":
            _autocast(request["args"])
        else:
            with np.load(request["calibration"]) as data:
                calibration = {k: data[k] for k in data.files}
            _quantize(request["args"], calibration)
    except Exception as exc:  # the parent reads this line
        print(_PREFIX + one_line(exc, with_type=not str(exc).strip()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
