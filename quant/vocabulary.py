"""One quantization vocabulary for every artifact kind: optimum-cli's names.

``quantize -m NAME`` and ``export --weight-format NAME`` take ``fp32``, ``fp16``,
``bf16``, ``int8`` and ``int4`` for classifiers and pipelines alike; :data:`TABLE`
says what each name runs for a task on a backend (``int8``: the backend's best int8
for the task), or why it cannot and what to type instead. The specific methods
(``int8-dynamic``, ``int8-static``, ``int8-weight``, ``int4-weight``, ``int8-qdq``)
are rows of the same table: still accepted, each with the line that says what it is
in the vocabulary's terms (the CLI prints it once, to stderr).

The data-aware options (optimum-intel's ``--awq``, ``--scale-estimation``,
``--dataset``) are checked here too, before any work: they run in NNCF's OpenVINO
weight compression of int4 weights and need calibration data that is on this
machine (:func:`check_data_aware`, :func:`calibration_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass

from enginekit.errors import InputError, OptionError, QuantizationError

__all__ = ["VOCABULARY", "TABLE", "Resolved", "resolve", "names_for", "describe", "check_data_aware",
           "calibration_spec", "HUB_DATASETS", "DATA_AWARE_BACKEND", "help_text", "note"]

#: The names every task takes, as optimum-cli spells them.
VOCABULARY = ("fp32", "fp16", "bf16", "int8", "int4")

_CLS = "image-classification"
_T2I = "text-to-image"
#: The backend whose weight compression runs NNCF's data-aware algorithms.
DATA_AWARE_BACKEND = "openvino"


@dataclass(frozen=True)
class Row:
    """One spelling for one task on one backend."""

    task: str
    backend: str
    name: str
    #: The method the task's quantizer runs (quant/base.py METHODS for classifiers, the
    #: pipeline plan's method for pipelines); None: refused, ``note`` says why and what instead.
    method: str | None
    #: A specific (old) name: what it is in the vocabulary's terms. A refused name: why.
    note: str = ""
    #: Takes NNCF's data-aware options (AWQ, scale estimation): OpenVINO's int4 weight compression.
    data_aware: bool = False


def _rows() -> tuple[Row, ...]:
    fp32 = "fp32 keeps the float weights: compile the export as it is (enginekit compile ART -b {backend})"
    trt = ("tensorrt quantize writes explicit Q/DQ only (-m int8, fp8); TensorRT builds fp16/bf16 from the float "
           "export (compile -b tensorrt --fp16)")
    rows = [
        # classifiers, ONNX Runtime
        Row(_CLS, "onnxruntime", "fp16", "fp16"),
        Row(_CLS, "onnxruntime", "bf16", "bf16"),
        Row(_CLS, "onnxruntime", "int8", "int8-dynamic"),
        Row(_CLS, "onnxruntime", "int4", "int4-weight"),
        Row(_CLS, "onnxruntime", "fp32", None, fp32),
        Row(_CLS, "onnxruntime", "int8-dynamic", "int8-dynamic", "int8-dynamic is what -m int8 runs on onnxruntime"),
        Row(_CLS, "onnxruntime", "int8-static", "int8-static",
            "int8-static is onnxruntime's calibrated QDQ int8 (-m int8 there is int8-dynamic)"),
        Row(_CLS, "onnxruntime", "int4-weight", "int4-weight", "int4-weight is what -m int4 runs on onnxruntime"),
        # classifiers, OpenVINO (NNCF)
        Row(_CLS, "openvino", "fp16", "fp16"),
        Row(_CLS, "openvino", "int8", "int8-static"),
        Row(_CLS, "openvino", "int4", "int4-weight", data_aware=True),
        Row(_CLS, "openvino", "fp32", None, fp32),
        Row(_CLS, "openvino", "bf16", None, "openvino stores no bf16 weights: -m fp16 halves them, and compile "
                                            "--inference-precision bf16 computes in bf16"),
        Row(_CLS, "openvino", "int8-static", "int8-static", "int8-static is what -m int8 runs on openvino"),
        Row(_CLS, "openvino", "int8-weight", "int8-weight",
            "int8-weight is NNCF's int8 weight-only compression (-m int8 there is int8-static)"),
        Row(_CLS, "openvino", "int4-weight", "int4-weight", "int4-weight is what -m int4 runs on openvino",
            data_aware=True),
        # classifiers, TensorRT (a QDQ ONNX, validated on ONNX Runtime)
        # int8 is TensorRT's own recipe, NVIDIA Model Optimizer's placement (it says how to install it
        # where it is missing); ONNX Runtime's QDQ placement stays reachable by name.
        Row(_CLS, "tensorrt", "int8", "int8-modelopt"),
        Row(_CLS, "tensorrt", "fp8", "fp8-qdq"),
        Row(_CLS, "tensorrt", "int8-modelopt", "int8-modelopt", "int8-modelopt is what -m int8 runs for tensorrt"),
        Row(_CLS, "tensorrt", "fp8-qdq", "fp8-qdq", "fp8-qdq is what -m fp8 runs for tensorrt"),
        Row(_CLS, "tensorrt", "int8-qdq", "int8-qdq",
            "int8-qdq is ONNX Runtime's Q/DQ placement for TensorRT (-m int8 there is Model Optimizer's)"),
        *(Row(_CLS, "tensorrt", n, None, trt) for n in ("fp32", "fp16", "bf16", "int4")),
    ]
    # pipelines: the plan of quant/diffusion.py (the denoiser gets the name, the family the rest)
    for backend in ("onnxruntime", "openvino"):
        rows += [Row(_T2I, backend, n, n, data_aware=(backend, n) == (DATA_AWARE_BACKEND, "int4"))
                 for n in ("fp16", "int8", "int4")]
        rows += [Row(_T2I, backend, "fp32", None, fp32),
                 Row(_T2I, backend, "bf16", None, "bf16 pipeline weights are written by export: "
                                                 "enginekit export MODEL --weight-format bf16")]
    return tuple(rows)


#: (task, backend, name) -> row: the one table every command reads.
TABLE: dict[tuple[str, str, str], Row] = {(r.task, r.backend, r.name): r for r in _rows()}


@dataclass(frozen=True)
class Resolved:
    """What a name means for a task on a backend."""

    #: As asked.
    name: str
    #: The method that runs.
    method: str
    #: A specific (old) name's line saying what it is; "" for a vocabulary name.
    note: str


def resolve(task: str, backend: str, name: str) -> Resolved:
    """``name`` for ``task`` on ``backend``: the method it runs, or one line saying why not
    and what to type instead."""
    row = TABLE.get((task, backend, name))
    if row is None:
        offered = names_for(task, backend)
        if not offered:
            backends = sorted({b for t, b, _ in TABLE if t == task})
            raise QuantizationError(f"no quantization methods for backend {backend!r} ({task}); "
                                    f"use one of: {', '.join(backends)}")
        elsewhere = sorted({b for t, b, n in TABLE if t == task and n == name and TABLE[(t, b, n)].method})
        hint = f" ({name} exists for: {', '.join(elsewhere)})" if elsewhere else ""
        raise QuantizationError(f"backend {backend!r} cannot do {name!r} for {task}{hint}; it offers: "
                                f"{', '.join(offered)}")
    if row.method is None:
        raise QuantizationError(f"-m {name} on {backend}: {row.note.format(backend=backend)}")
    return Resolved(name, row.method, row.note)


def names_for(task: str, backend: str) -> list[str]:
    """What ``-m`` takes for ``task`` on ``backend``: the vocabulary first, then the specific names."""
    rows = [r for (t, b, _), r in TABLE.items() if t == task and b == backend and r.method]
    return [r.name for r in rows if r.name in VOCABULARY] + [r.name for r in rows if r.name not in VOCABULARY]


def describe(task: str, backend: str, name: str) -> str:
    """The line a specific (old) name prints: what it maps to; "" for a vocabulary name or an unknown one."""
    row = TABLE.get((task, backend, name))
    return row.note if row is not None and row.method is not None and row.name not in VOCABULARY else ""


def note(task: str, backend: str, name: str) -> str:
    """``note: ...`` for a specific (old) name, as the CLI prints it once to stderr; "" otherwise."""
    line = describe(task, backend, name)
    return f"note: {line}" if line else ""


def help_text() -> str:
    """The vocabulary per backend for ``--help``: what ``int8`` and ``int4`` run on each."""
    parts = []
    for backend in ("onnxruntime", "openvino", "tensorrt"):
        cls = {n: TABLE[(_CLS, backend, n)].method for n in ("int8", "int4") if (_CLS, backend, n) in TABLE
               and TABLE[(_CLS, backend, n)].method}
        parts.append(f"{backend}: " + ", ".join(f"{n}={m}" for n, m in cls.items()))
    return "; ".join(parts)


# -- data-aware weight compression (optimum-intel's --awq, --scale-estimation, --dataset) -----------

#: The datasets optimum-intel names and downloads from the Hugging Face Hub
#: (optimum/intel/openvino/utils.py: PREDEFINED_*_DATASETS; "auto" generates with the model).
HUB_DATASETS = frozenset({
    "wikitext2", "c4", "c4-new", "auto", "gsm8k",  # language models
    "conceptual_captions", "laion/220k-GPT4Vision-captions-from-LIVIS", "laion/filtered-wit",  # diffusion
    "contextual", "textvqa", "librispeech", "coco",  # visual LMs, speech, SAM
})

#: What calibration data is for each task, as --dataset takes it here.
_LOCAL_DATA = {
    _CLS: "an image folder, a preprocessed .npy, 'photos' or 'builtin'",
    _T2I: "a prompts file (one prompt per line) or 'builtin' (enginekit's prompt list)",
}


def calibration_spec(task: str, calibration: str | None, dataset: str | None) -> str | None:
    """The calibration data asked for, by ``--calibration`` or its optimum-intel name ``--dataset``
    (one of them); a dataset optimum-intel downloads is refused in one line (nothing is fetched)."""
    if calibration is not None and dataset is not None and calibration != dataset:
        raise OptionError(f"--calibration {calibration} and --dataset {dataset} disagree; give one")
    spec = dataset if dataset is not None else calibration
    if spec is not None and spec in HUB_DATASETS:
        raise InputError(f"--dataset {spec} is a Hugging Face Hub dataset optimum-intel downloads; it cannot be "
                         f"fetched offline: pass {_LOCAL_DATA.get(task, 'local calibration data')}")
    return spec


def check_data_aware(task: str, backend: str, name: str, *, awq: bool, scale_estimation: bool,
                     dataset: str | None) -> None:
    """Refuse, before any work, a data-aware option that cannot run as asked: AWQ and scale
    estimation are NNCF's, on OpenVINO, for int4 weights, and need calibration data."""
    asked = [flag for flag, on in (("--awq", awq), ("--scale-estimation", scale_estimation)) if on]
    if not asked:
        return
    what = " and ".join(asked)
    row = TABLE.get((task, backend, name))
    if row is None or not row.data_aware:
        if not any(r.data_aware for (t, b, _), r in TABLE.items() if (t, b) == (task, backend)):
            raise OptionError(f"{what}: NNCF's data-aware weight compression runs on OpenVINO, not {backend}; "
                              f"add -b {DATA_AWARE_BACKEND}")
        raise OptionError(f"{what} appl{'ies' if len(asked) == 1 else 'y'} to int4 weight compression (NNCF has none for {name}); use "
                          "--weight-format int4 (quantize: -m int4)")
    if dataset is None:
        raise OptionError(f"{what} need{'s' if len(asked) == 1 else ''} calibration data: add --dataset with "
                          f"{_LOCAL_DATA.get(task, 'local data')}")
