"""The engines of a folder another tool wrote, read as they are: which file is a component's
engine, what it takes and gives (from the IR or ONNX graph itself), its weights' precision,
and how its interface meets the names enginekit's tasks use (:mod:`enginekit.interface`).

optimum-cli's OpenVINO export writes ``openvino_model.xml``/``.bin`` per component, optimum's
ONNX export ``model.onnx`` (and ``model.onnx_data`` past 2 GB). Both name tensors by optimum's
export configs: a CLIP text encoder gives ``last_hidden_state``, then ``pooler_output``
(``CLIPTextModel``) or ``text_embeds`` (``CLIPTextModelWithProjection``) and, where it was
exported for a pipeline that reads them, ``hidden_states.0`` .. ``hidden_states.N``; a UNet takes
``sample``, ``timestep`` (int64, one value for the batch), ``encoder_hidden_states`` and gives
``out_sample``; SD3's and FLUX's transformers take the latents as ``hidden_states``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from enginekit.errors import IntegrityError, SourceError, one_line
from enginekit.manifest import TensorSpec

__all__ = ["ENGINE_FILES", "Engine", "find_engine", "read_engine", "text_encoder_interface", "denoiser_interface",
           "single_interface", "name_dims"]

#: The engine file of a component folder -> the artifact kind it makes (checked in this order).
ENGINE_FILES = {"openvino_model.xml": "openvino", "model.onnx": "onnx"}
#: Names enginekit's tasks read: a port answering to one of them (an IR's tensor may carry several
#: names) is recorded under it.
_TASK_NAMES = ("input_ids", "last_hidden_state", "penultimate_hidden_state", "pooled", "sample", "timestep",
               "encoder_hidden_states", "out_sample", "latent_sample", "latent_parameters", "pixel_values", "logits")
#: What each denoiser input is fed from (the runtime layouts feed by these names).
DENOISER_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond",
                   "pooled_projections", "img_ids", "txt_ids", "guidance")
_HIDDEN = re.compile(r"hidden_states\.(\d+)$")
#: Constants this big or bigger are weights (smaller ones are shapes, ids, masks).
_WEIGHT_ELEMENTS = 1024


@dataclass(frozen=True)
class Engine:
    """One component's engine as its files say: entry, every file it reads, specs, precision."""

    entry: str
    kind: str
    files: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str

    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]


def find_engine(root: Path, folder: str) -> tuple[str, str] | None:
    """(entry relative to ``root``, kind) of the engine in ``root/folder`` ("" for the root), or None."""
    for name, kind in ENGINE_FILES.items():
        rel = PurePosixPath(folder, name).as_posix() if folder else name
        if (root / rel).is_file():
            return rel, kind
    return None


def read_engine(root: Path, entry: str, kind: str) -> Engine:
    """Read the engine ``entry`` (an IR or ONNX graph under ``root``): a truncated or unreadable
    file is a one-line :class:`IntegrityError` naming it."""
    reader = _read_ir if entry.endswith(".xml") else _read_onnx
    return reader(root, entry, kind)


def _read_ir(root: Path, entry: str, kind: str) -> Engine:
    import openvino as ov

    from enginekit.runtimes.openvino_shapes import specs

    weights = entry[: -len(".xml")] + ".bin"
    if not (root / weights).is_file():
        raise IntegrityError(f"{root}: {entry} has no {PurePosixPath(weights).name} beside it")
    try:
        model = ov.Core().read_model(str(root / entry))
    except Exception as exc:  # noqa: BLE001 - OpenVINO says "Incorrect weights in bin file!" for a truncated .bin
        raise IntegrityError(f"{root}: {entry} does not read as an OpenVINO IR ({one_line(exc)}): "
                             "a truncated or damaged file?") from exc
    preferred = [TensorSpec(n, "float32", ()) for n in _TASK_NAMES]
    kinds = {op.get_element_type().get_type_name() for op in model.get_ops()
             if op.get_type_name() == "Constant" and _elements(op.get_output_partial_shape(0)) >= _WEIGHT_ELEMENTS}
    return Engine(entry, kind, (entry, weights), tuple(specs(model.inputs, preferred)),
                  tuple(specs(model.outputs, preferred)), _precision(kinds, set()))


def _elements(shape: Any) -> int:
    if shape.is_dynamic:
        return 0
    n = 1
    for dim in shape.to_shape():
        n *= int(dim)
    return n


def _read_onnx(root: Path, entry: str, kind: str) -> Engine:
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from enginekit.artifact import check_onnx_external_data

    data = check_onnx_external_data(root, entry)  # a path that leaves the folder is refused here
    model = onnx.load(str(root / entry), load_external_data=False)
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            path = (root / entry).parent / info.get("location", "")
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
            if not path.is_file() or end > os.path.getsize(path):
                raise IntegrityError(f"{root}: {entry} reads {info.get('location')!r} up to byte {end}, past its "
                                     "end (a truncated or missing file)")
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = tuple(_onnx_spec(v) for v in graph.input if v.name not in weights)
    outputs = tuple(_onnx_spec(v) for v in graph.output)
    kinds = {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer
             if _count(t.dims) >= _WEIGHT_ELEMENTS}
    nbits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    return Engine(entry, kind, (entry, *data), inputs, outputs, _precision(kinds, nbits))


def _count(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _onnx_spec(value: Any) -> TensorSpec:
    from onnx.helper import tensor_dtype_to_np_dtype

    tensor = value.type.tensor_type
    shape: list[int | str] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                              for d in tensor.shape.dim]
    return TensorSpec(value.name, str(tensor_dtype_to_np_dtype(tensor.elem_type)), tuple(shape))


def _precision(kinds: set[str], nbits: set[int]) -> str:
    """The weights' precision from their element types (OpenVINO's or ONNX's spelling): weight
    compression to 4 or 8 bits, fp16 or bf16, else fp32."""
    low = {k.lower() for k in kinds}
    if 4 in nbits or low & {"u4", "i4", "uint4", "int4", "nf4"}:
        return "int4"
    if 8 in nbits or low & {"u8", "i8", "uint8", "int8"}:
        return "int8"
    if low & {"f16", "float16"}:
        return "fp16"
    if low & {"bf16", "bfloat16"}:
        return "bf16"
    return "fp32"


# --------------------------------------------------------------------------- interfaces


def _interface(inputs: Mapping[str, str], outputs: Mapping[str, str], one_row: Sequence[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if inputs:
        out["inputs"] = dict(inputs)
    if outputs:
        out["outputs"] = dict(outputs)
    if one_row:
        out["one_row"] = list(one_row)
    return out


def _names(engine: Engine) -> str:
    return ", ".join(engine.output_names())


def text_encoder_interface(where: str, name: str, engine: Engine, hidden_state: str, pooled: bool) -> dict[str, Any]:
    """A text encoder's interface: ``pooled`` from ``text_embeds`` or ``pooler_output``, the
    penultimate state from ``hidden_states.{N-1}`` (N the last), where the engine lacks
    enginekit's own names; an output the pipeline reads and the engine lacks is refused."""
    if len(engine.inputs) != 1:
        raise SourceError(f"{where}: {name} takes {', '.join(engine.input_names())}; enginekit feeds a text "
                          "encoder its token ids alone")
    outs = set(engine.output_names())
    if "last_hidden_state" not in outs:
        raise SourceError(f"{where}: {name} gives no last_hidden_state (it gives {_names(engine)})")
    alias: dict[str, str] = {}
    if "pooled" not in outs:
        found = next((n for n in ("text_embeds", "pooler_output") if n in outs), None)
        if found is not None:
            alias["pooled"] = found
        elif pooled:
            raise SourceError(f"{where}: the pipeline reads {name}'s pooled output, which it does not give "
                              f"(it gives {_names(engine)})")
    if "penultimate_hidden_state" not in outs:
        layers = sorted(int(m.group(1)) for n in outs if (m := _HIDDEN.match(n)))
        if len(layers) >= 2:
            alias["penultimate_hidden_state"] = f"hidden_states.{layers[-1] - 1}"
        elif hidden_state == "penultimate":
            raise SourceError(f"{where}: the pipeline reads {name}'s penultimate hidden state, which it does not "
                              f"give (it gives {_names(engine)}; optimum exports hidden_states.N for SDXL and SD3)")
    return _interface({}, alias)


def denoiser_interface(where: str, name: str, engine: Engine) -> dict[str, Any]:
    """A UNet's or transformer's interface: the latents as ``sample`` (a transformer's
    ``hidden_states``), its one output as ``out_sample``, a timestep fixed at one row."""
    ins = engine.input_names()
    alias_in: dict[str, str] = {}
    if "sample" not in ins and "hidden_states" in ins:
        alias_in["sample"] = "hidden_states"
    task_names = [next((t for t, e in alias_in.items() if e == n), n) for n in ins]
    unknown = [n for n in task_names if n not in DENOISER_INPUTS]
    missing = [n for n in ("sample", "timestep", "encoder_hidden_states") if n not in task_names]
    if unknown or missing:
        what = f"takes {unknown[0]!r}, which enginekit's pipelines do not feed" if unknown else f"takes no {missing[0]!r}"
        raise SourceError(f"{where}: {name} {what} (its inputs: {', '.join(ins)})")
    alias_out: dict[str, str] = {}
    outs = engine.output_names()
    if "out_sample" not in outs:
        if len(outs) != 1:
            raise SourceError(f"{where}: {name} gives {', '.join(outs)}; enginekit reads one noise prediction")
        alias_out["out_sample"] = outs[0]
    step = next(s for s in engine.inputs if s.name == "timestep")
    one_row = ["timestep"] if step.shape[:1] == (1,) else []
    return _interface(alias_in, alias_out, one_row)


def single_interface(where: str, name: str, engine: Engine, input_name: str, output_name: str) -> dict[str, Any]:
    """A one-input engine (a VAE half, a classifier): its input as ``input_name`` and ``output_name``
    from the output of that name or, where there is one output, that output."""
    if len(engine.inputs) != 1:
        raise SourceError(f"{where}: {name} takes {', '.join(engine.input_names())}; enginekit feeds it "
                          f"{input_name} alone")
    ins = engine.input_names()
    outs = engine.output_names()
    alias_in = {input_name: ins[0]} if ins[0] != input_name else {}
    alias_out: dict[str, str] = {}
    if output_name not in outs:
        if len(outs) != 1:
            raise SourceError(f"{where}: {name} gives {', '.join(outs)}, none of them {output_name!r}")
        alias_out[output_name] = outs[0]
    return _interface(alias_in, alias_out)


# --------------------------------------------------------------------------- symbolic dimensions

_LATENT = ("batch", None, "latent_height", "latent_width")
_STATES = ("batch", "sequence", None)
#: enginekit's export contract (``enginekit.export.diffusion.sd``): the symbolic dimensions of each
#: tensor a role's engine has, by the task's name (None: the engine's own). Static shapes, the
#: pipeline bench and the OpenVINO runner's specs name dimensions by these.
_CONTRACT: dict[str, dict[str, tuple[str | None, ...]]] = {
    "text_encoder": {"input_ids": ("batch", "sequence"), "last_hidden_state": _STATES,
                     "penultimate_hidden_state": _STATES, "hidden_states.": _STATES, "pooled": ("batch", None)},
    "denoiser": {"sample": _LATENT, "out_sample": _LATENT, "timestep": ("batch",), "encoder_hidden_states": _STATES,
                 "text_embeds": ("batch", None), "time_ids": ("batch", None), "timestep_cond": ("batch", None),
                 "pooled_projections": ("batch", None), "guidance": ("batch",), "txt_ids": ("sequence", None),
                 "img_ids": ("image_sequence", None)},
    # FLUX: latents packed into tokens.
    "packed": {"sample": ("batch", "image_sequence", None), "out_sample": ("batch", "image_sequence", None)},
    "vae_decoder": {"latent_sample": _LATENT, "sample": ("batch", None, "height", "width")},
    "vae_encoder": {"sample": ("batch", None, "height", "width"), "latent_parameters": _LATENT},
    "classifier": {"pixel_values": ("batch", None, "height", "width"), "logits": ("batch", None)},
}


def name_dims(engine: Engine, role: str, interface: Mapping[str, Any]) -> Engine:
    """``engine`` with its free dimensions named as enginekit's export names them for ``role``
    (``text_encoder``, ``denoiser``, ``vae_decoder``, ``vae_encoder``, ``classifier``); fixed sizes
    and tensors the contract does not know keep theirs."""
    task_in = {e: t for t, e in (interface.get("inputs") or {}).items()}
    task_out = {e: t for t, e in (interface.get("outputs") or {}).items()}
    table = dict(_CONTRACT[role])
    sample = next((s for s in engine.inputs if task_in.get(s.name, s.name) == "sample"), None)
    if role == "denoiser" and sample is not None and len(sample.shape) == 3:
        table.update(_CONTRACT["packed"])

    def named(spec: TensorSpec, task: str) -> TensorSpec:
        want = table.get(task) or (table.get("hidden_states.") if _HIDDEN.match(task) else None)
        if want is None or len(want) != len(spec.shape):
            return spec
        shape = tuple(d if isinstance(d, int) or w is None else w for d, w in zip(spec.shape, want))
        return TensorSpec(spec.name, spec.dtype, shape)

    return dataclasses.replace(
        engine, inputs=tuple(named(s, task_in.get(s.name, s.name)) for s in engine.inputs),
        outputs=tuple(named(s, task_out.get(s.name, s.name)) for s in engine.outputs))
