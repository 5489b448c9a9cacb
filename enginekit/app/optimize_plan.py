"""Classifier ``optimize``'s plan: the candidate engines it tries and the config that judges them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from enginekit.bench.harness import BenchConfig

__all__ = ["PRECISIONS", "Candidate", "OptimizeConfig", "plan_candidates", "token_merged_candidate"]

#: Precision families a user can ask for; "fp16" covers bf16 too.
PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class Candidate:
    """One engine to try: how to build it and what runs it."""

    name: str
    #: The backend that runs the engine.
    backend: str
    #: What the engine computes in: fp32, bf16, fp16, int8, int4 (weights for weight-only methods).
    precision: str
    #: The family it belongs to in :data:`PRECISIONS`.
    family: str
    #: ``quantize`` method and the backend it quantizes for; None for float engines.
    method: str | None = None
    quant_backend: str | None = None
    #: ``compile`` for ``backend`` with these extras after quantizing (None: run the result as it is).
    compile_extra: Mapping[str, Any] | None = None
    description: str = ""
    #: Token pairs each ViT block merges in the export it is built from (ToMe; 0: the plain export).
    token_merge: int = 0

    @property
    def base(self) -> str:
        """The quantized (or exported) artifact this candidate is built from; shared between variants."""
        base = f"{self.quant_backend}-{self.method}" if self.method else "onnx"
        return f"{base}-tome{self.token_merge}" if self.token_merge else base


def token_merged_candidate(cand: Candidate, r: int) -> Candidate:
    """``cand`` built from the export whose blocks merge ``r`` token pairs each."""
    from dataclasses import replace

    return replace(cand, name=f"{cand.name}+tome:{r}", token_merge=r,
                   description=f"{cand.description}; {r} token pairs merged per block (ToMe)")


@dataclass(frozen=True)
class OptimizeConfig:
    """What ``optimize`` tries and how it judges."""

    #: Backends to try (None: every installed one).
    backends: tuple[str, ...] | None = None
    precisions: tuple[str, ...] = PRECISIONS
    #: Batch size the engine is picked for; OpenVINO engines are compiled for it (static shape).
    batch: int = 1
    min_agreement: float = 0.99
    min_cosine: float = 0.999
    #: Data spec for calibration and held-out samples (None: builtin for the default model, else photos).
    data: str | None = None
    #: The second, differently made held-out set every candidate is also judged on
    #: (None: :func:`second_spec` of the calibration source). The budget holds on both.
    second_data: str | None = None
    calibration_size: int = 64
    eval_size: int = 128
    static_shape: bool = True
    warmup: int = 5
    runs: int | None = 30
    duration_s: float | None = None
    threads: int = 0
    #: int4 weight-only: weights per scale.
    group_size: int = 128
    #: Held-out samples whose reference top-2 logit gap is under ``tie_margin`` x the
    #: standard deviation of the reference logits are ties: no engine can be faulted
    #: for ranking them differently, so the agreement budget counts the other samples
    #: only. 0 (the default) counts every sample. Both agreements are reported.
    tie_margin: float = 0.0
    #: ViTs: token pairs per block to also try merging (ToMe), each on every candidate that passed
    #: unmerged; judged by the same budget against the unmerged PyTorch model. Empty: none.
    token_merge: tuple[int, ...] = ()

    def bench_config(self) -> BenchConfig:
        return BenchConfig(batch_sizes=(self.batch,), warmup=self.warmup, runs=self.runs,
                           duration_s=self.duration_s, threads=self.threads)


def _bf16_capable(flags: Sequence[str]) -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def plan_candidates(backends: Sequence[str], precisions: Sequence[str], batch: int, *,
                    static_shape: bool = True, cpu_flags: Sequence[str] = ()) -> list[Candidate]:
    """The candidates for ``backends`` × ``precisions`` on a CPU with ``cpu_flags``.

    ONNX Runtime runs its own quantized graphs; OpenVINO runs NNCF's IR and the
    TensorRT-ready QDQ graph (symmetric int8, which its CPU plugin executes as
    int8), each compiled for a static batch when ``static_shape``. bf16 variants
    appear only where the CPU computes in bf16 (AMX or AVX512-BF16).
    """
    ov_static = {"static_batch": batch} if static_shape else {}
    bf16 = _bf16_capable(cpu_flags)
    out: list[Candidate] = []
    if "onnxruntime" in backends:
        out += [
            Candidate("onnxruntime-fp32", "onnxruntime", "fp32", "fp32", compile_extra={},
                      description="float graph, ONNX Runtime offline optimizations"),
            Candidate("onnxruntime-fp16", "onnxruntime", "fp16", "fp16", "fp16", "onnxruntime",
                      description="fp16 weights and compute, float32 inputs and outputs"),
            Candidate("onnxruntime-int8-dynamic", "onnxruntime", "int8", "int8", "int8-dynamic", "onnxruntime",
                      description="int8 weights, activations quantized on the fly"),
            Candidate("onnxruntime-int8-static", "onnxruntime", "int8", "int8", "int8-static", "onnxruntime",
                      description="int8 QDQ, calibrated"),
            Candidate("onnxruntime-int4-weight", "onnxruntime", "int4", "int4", "int4-weight", "onnxruntime",
                      description="int4 MatMulNBits weights"),
        ]
    if "openvino" in backends:
        out.append(Candidate("openvino-fp32", "openvino", "fp32", "fp32",
                             compile_extra={**ov_static, "inference_precision": "f32"},
                             description="float IR, f32 inference"))
        if bf16:
            out.append(Candidate("openvino-bf16", "openvino", "bf16", "fp16",
                                 compile_extra={**ov_static, "inference_precision": "bf16"},
                                 description="float IR, bf16 inference (AMX/AVX512-BF16)"))
        out.append(Candidate("openvino-fp16", "openvino", "fp16", "fp16", "fp16", "openvino",
                             compile_extra={**ov_static}, description="NNCF fp16 weights, device's precision"))
        for method, precision, desc in (("int8-static", "int8", "NNCF int8 post-training quantization"),
                                        ("int8-weight", "int8", "NNCF int8 weights, float activations"),
                                        ("int4-weight", "int4", "NNCF int4 weights")):
            out.append(Candidate(f"openvino-{method}", "openvino", precision, precision, method, "openvino",
                                 compile_extra={**ov_static, "inference_precision": "f32"},
                                 description=f"{desc}, f32 elsewhere"))
            if bf16 and method == "int8-static":
                out.append(Candidate(f"openvino-{method}-bf16", "openvino", precision, precision, method, "openvino",
                                     compile_extra={**ov_static, "inference_precision": "bf16"},
                                     description=f"{desc}, bf16 elsewhere"))
        out.append(Candidate("openvino-int8-qdq", "openvino", "int8", "int8", "int8-qdq", "tensorrt",
                             compile_extra={**ov_static, "inference_precision": "f32"},
                             description="symmetric int8 QDQ graph (TensorRT-ready), f32 elsewhere"))
        if bf16:
            out.append(Candidate("openvino-int8-qdq-bf16", "openvino", "int8", "int8", "int8-qdq", "tensorrt",
                                 compile_extra={**ov_static, "inference_precision": "bf16"},
                                 description="symmetric int8 QDQ graph (TensorRT-ready), bf16 elsewhere"))
    return [c for c in out if c.family in precisions]
