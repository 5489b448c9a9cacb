"""Weight compression of an exported ONNX component, one tensor at a time.

:func:`compress_component` rewrites the MatMul and Gemm weights of ``model.onnx``
(its tensors inline or in one external data file) to int8 or int4 with ONNX
Runtime's block-wise quantizer (``DefaultWeightOnlyQuantizer.qbits_block_quant``,
the C++ ``quantize_matmul_4bits`` / ``quantize_matmul_8bits`` kernels that
``MatMulNBitsQuantizer`` runs): each weight is read memory-mapped from the data
file, quantized, written packed with its scales (and zero points when
asymmetric) to a new data file and released, so peak memory follows the largest
tensor, not the model. Other tensors are copied across without being held.

The form is ``com.microsoft::MatMulNBits`` (bits 4 or 8, blocks of ``group_size``
along K), for both backends: ONNX Runtime runs it natively, and OpenVINO's ONNX
front end (``src/frontends/onnx/frontend/src/op/com.microsoft/matmulnbits.cpp``,
cases 2/4/8 bits) reads it into u4/u8 constants with their scales, which
``ov.save_model`` keeps compressed in the IR. Opset-21 int4 ``DequantizeLinear``
with a block size is read by both as well, but has no int8 block form in ONNX
Runtime's quantizer, so one form (MatMulNBits) serves int8 and int4.

Which layers stay in higher precision (recorded in the result, one reason each):

- only MatMul and Gemm (alpha 1, no transposed A) with a constant 2-D float32 or
  float16 weight are compressed; Conv, Gather (embeddings) and every other
  tensor keep the source precision, since MatMulNBits covers MatMul only;
- a weight read by more than one node, or with K (rows) under ``group_size``
  (one block would be larger than the row), stays float;
- int4: the first and the last compressed layer in graph order are int8, as
  NNCF keeps a model's first and last layers in its backup precision;
- ``ratio`` < 1: the int4 candidates are ordered by NNCF's data-free criterion
  (``WEIGHT_QUANTIZATION_ERROR``: 1 / the int8 error, ascending) and taken into
  int4 until they hold ``ratio`` of the candidates' parameters; the rest are int8.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from enginekit.errors import OptionError, QuantizationError, one_line
from enginekit.export.external_data import DATA, INLINE_BYTES, Given, Reader, Writer

__all__ = ["WeightFormat", "compress_component", "compress_lazy_model", "compress_model", "WEIGHT_FORMATS",
           "COMPRESSED_FORMATS", "check_fp16_fits"]

#: What ``--weight-format`` takes for a component here. bf16 stores the weights in bfloat16 with a
#: ``Cast`` to float32 before their first use (ONNX Runtime's CPU kernels have no bf16 MatMul; it
#: folds the casts at load, OpenVINO computes in bf16 where the CPU has it).
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4")
COMPRESSED_FORMATS = ("int8", "int4")
#: Formats written by the tensor-by-tensor pass (:func:`compress_model`): also on the way in a streamed export.
PASS_FORMATS = COMPRESSED_FORMATS + ("bf16",)
#: bf16: float32 tensors of at least this many values are stored in bf16 (weights); smaller ones
#: (norm scales, biases, positions) stay float32.
BF16_MIN_VALUES = 1024
ENTRY = "model.onnx"


@dataclass(frozen=True)
class WeightFormat:
    """How a component's weights are stored: optimum-cli's ``--weight-format`` and its options.

    ``group_size``: weights per scale along K (a power of two >= 16, MatMulNBits' block);
    ``ratio``: the share of the int4 candidates' parameters in int4 (the rest int8);
    ``sym``: symmetric (no zero points) instead of asymmetric.
    """

    mode: str = "int8"
    group_size: int = 128
    ratio: float = 1.0
    sym: bool = False

    def __post_init__(self) -> None:
        if self.mode not in WEIGHT_FORMATS:
            raise OptionError(f"unknown weight format {self.mode!r}; use one of: {', '.join(WEIGHT_FORMATS)}")
        g = self.group_size
        if not isinstance(g, int) or g < 16 or g & (g - 1):
            raise OptionError(f"group_size must be a power of two >= 16 (the MatMulNBits block), got {g!r}")
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise OptionError(f"ratio must be between 0 and 1 (the share of int4 weights), got {self.ratio!r}")

    @property
    def compressed(self) -> bool:
        return self.mode in COMPRESSED_FORMATS

    @property
    def by_pass(self) -> bool:
        """Written tensor by tensor by :func:`compress_model` (int8, int4, bf16)."""
        return self.mode in PASS_FORMATS

    def record(self) -> dict[str, Any]:
        """The manifest's description of this format."""
        if not self.compressed:
            return {"format": self.mode}
        return {"format": self.mode, "group_size": self.group_size,
                "ratio": float(self.ratio) if self.mode == "int4" else None, "sym": self.sym}


@dataclass
class _Layer:
    """A MatMul/Gemm whose constant weight may be compressed."""

    node: Any
    weight: str
    k: int
    n: int
    #: Gemm with transB=1: the stored weight is (N, K).
    transposed: bool
    bits: int | None = None
    why: str = ""


# -- the pass -------------------------------------------------------------------------


def compress_component(component_dir: str | Path, fmt: WeightFormat, out_dir: str | Path, *,
                       entry: str = ENTRY, on_tensor: Callable[[str], None] = lambda name: None) -> dict[str, Any]:
    """Write ``component_dir/entry`` with its MatMul/Gemm weights in ``fmt`` (int8 or int4)
    into ``out_dir`` (``model.onnx`` + ``model.onnx.data``), one tensor at a time.

    Returns the manifest record: the format, group size, ratio, sym, the layer counts per
    precision, and each layer that stayed in higher precision with the reason. fp32 copies
    the files; fp16 converts with ONNX Runtime's float16 converter (in memory: meant for
    the small text encoders and VAEs).
    """
    src_dir, out = Path(component_dir), Path(out_dir)
    src = src_dir / entry
    if not src.is_file():
        raise QuantizationError(f"{src}: no such ONNX model")
    out.mkdir(parents=True, exist_ok=True)
    if fmt.mode == "fp32":
        return _copy_float(src, out)
    if fmt.mode == "fp16":
        return _fp16(src, out)
    import onnx

    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise QuantizationError(f"{src}: not a readable ONNX model ({one_line(exc)})") from exc
    with Reader(src_dir) as reader:
        return _compress(model, fmt, out, reader, entry, on_tensor)


def compress_model(model: Any, fmt: WeightFormat, out_dir: str | Path, tensors: Callable[[str], np.ndarray], *,
                   entry: str = ENTRY, on_tensor: Callable[[str], None] = lambda name: None) -> dict[str, Any]:
    """:func:`compress_component` for a graph whose weights come from ``tensors`` (name ->
    array), e.g. a streaming export's: ``model``'s initializers give names, types and
    shapes (their data is not read; the proto is rewritten in place). ``tensors`` is called once per initializer in order,
    and a second time for the int4 candidates when ``ratio`` < 1; each array may be
    dropped as soon as the next is asked for. Formats: int8, int4, bf16 and fp32 (written as it comes).
    """
    if fmt.mode == "fp16":
        raise OptionError("compress_model writes int8, int4, bf16 or fp32; convert to fp16 with compress_component")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _compress(model, fmt, out, Given(tensors), entry, on_tensor)


def compress_lazy_model(model: Any, path: Path, fmt: WeightFormat, on_tensor: Callable[[str], None] = lambda name: None,
                        ) -> dict[str, Any]:
    """Write ``model`` (an ``onnx_ir`` model whose large weights are ``LazyTensor``s, as the streaming
    export makes it) to ``path`` with its MatMul/Gemm weights compressed to ``fmt``:
    the graph goes to the compression pass with each lazy weight as a placeholder (name, type and
    shape, no data), and the pass asks for each tensor's data in turn."""
    import onnx_ir as ir
    from onnx import numpy_helper

    lazy: dict[str, Callable[[], Any]] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, ir.LazyTensor):
            lazy[name] = tensor.numpy
            # Serialised as an external reference to nowhere: its data is never read here.
            value.const_value = ir.ExternalTensor("<streamed>", None, None, tensor.dtype, shape=tensor.shape,
                                                  name=name)
    proto = ir.serde.serialize_model(model)
    inline = {t.name: t for t in proto.graph.initializer if t.name not in lazy}

    def tensors(name: str) -> Any:
        if name in lazy:
            return lazy[name]()
        return numpy_helper.to_array(inline[name])

    return compress_model(proto, fmt, path.parent, tensors, entry=path.name, on_tensor=on_tensor)


def _compress(model: Any, fmt: WeightFormat, out: Path, source: Any, entry: str,
              on_tensor: Callable[[str], None]) -> dict[str, Any]:
    """The pass: plan the layers, then each initializer in order: quantized, or copied as it is."""
    import onnx

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    layers, kept = _candidates(graph, inits, fmt) if fmt.compressed else ([], [])
    kept += _assign(layers, fmt, inits, source) if fmt.compressed else []
    chosen = {lay.weight: lay for lay in layers if lay.bits}
    halves = _bf16_weights(graph) if fmt.mode == "bf16" else set()
    with open(out / DATA, "wb") as sink:
        writer = Writer(sink)
        new_inits = []
        for init in graph.initializer:
            lay = chosen.get(init.name)
            if init.name in halves:
                on_tensor(init.name)
                new_inits.append(writer.tensor(f"{init.name}_bf16", _BFLOAT16, _to_bf16(source.array(init))))
                source.release()
                continue
            if lay is None:
                new_inits.append(writer.copy(init, source))
                continue
            on_tensor(init.name)
            new_inits += _quantize(lay, init, fmt, source, writer)
            source.release()
    if not (out / DATA).stat().st_size:  # every tensor stayed inline
        (out / DATA).unlink()
    _rewrite(model, list(chosen.values()), fmt)
    _cast_back(model, halves)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    try:
        onnx.save_model(model, str(out / entry))
    except Exception as exc:
        raise QuantizationError(f"could not write {out / entry}: {one_line(exc)}") from exc
    if fmt.mode == "bf16":
        return {"method": "bf16", "format": "bf16", "form": "bfloat16 initializers, each Cast to float32",
                "tensors_bf16": len(halves), "parameters_bf16": sum(_numel(inits[n]) for n in halves),
                "rule": f"float32 initializers of at least {BF16_MIN_VALUES} values; smaller ones (norm scales, "
                        "biases) stay float32; rounded to nearest even"}
    return _record(fmt, layers, kept) if fmt.compressed else {"method": fmt.mode, "format": fmt.mode}


def _candidates(graph: Any, inits: dict[str, Any], fmt: WeightFormat) -> tuple[list[_Layer], list[dict[str, Any]]]:
    """The compressible layers in graph order, and the weighted layers that stay float (with why)."""
    from onnx import TensorProto, helper

    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    layers: list[_Layer] = []
    kept: list[dict[str, Any]] = []
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        transposed = node.op_type == "Gemm" and bool(attrs.get("transB", 0))
        why = ""
        if len(w.dims) != 2:
            why = f"{len(w.dims)}-D weight"
        elif w.data_type not in floats:
            why = f"{helper.tensor_dtype_to_np_dtype(w.data_type)} weight (float32 and float16 are compressed)"
        elif node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                         or (len(node.input) > 2 and node.input[2] and attrs.get("beta", 1.0) != 1.0)):
            why = "Gemm with transA, alpha or beta"
        elif readers.get(w.name, 0) > 1:
            why = "weight shared by several nodes"
        else:
            k, n = (w.dims[1], w.dims[0]) if transposed else (w.dims[0], w.dims[1])
            if k < fmt.group_size:
                why = f"K {k} < group size {fmt.group_size}"
            else:
                layers.append(_Layer(node, w.name, int(k), int(n), transposed))
                continue
        kept.append({"node": node.name, "weight": w.name, "precision": "float", "why": why})
    return layers, kept


def _assign(layers: list[_Layer], fmt: WeightFormat, inits: dict[str, Any], reader: Reader) -> list[dict[str, Any]]:
    """Set each layer's bits; returns the layers kept in int8 under int4, with why."""
    kept: list[dict[str, Any]] = []
    if fmt.mode == "int8":
        for lay in layers:
            lay.bits = 8
        return kept
    for lay in layers:
        lay.bits = 4
    edges = {0: "first layer", len(layers) - 1: "last layer"} if layers else {}
    for i, why in edges.items():
        layers[i].bits, layers[i].why = 8, why + " (NNCF's backup precision)"
    pool = [lay for i, lay in enumerate(layers) if i not in edges]
    if fmt.ratio < 1.0 and pool:
        scores = {lay.weight: _nncf_score(lay, inits[lay.weight], reader) for lay in pool}
        total = sum(lay.k * lay.n for lay in pool)
        taken, in_int4 = 0, set()
        for lay in sorted(pool, key=lambda x: scores[x.weight]):
            # NNCF's rule (MixedPrecisionCriterion.apply): stop at the first layer that would reach the ratio.
            if (taken + lay.k * lay.n) / total >= fmt.ratio:
                break
            taken += lay.k * lay.n
            in_int4.add(lay.weight)
        for lay in pool:
            if lay.weight not in in_int4:
                lay.bits, lay.why = 8, f"ratio {fmt.ratio} (NNCF data-free order)"
    kept += [{"node": lay.node.name, "weight": lay.weight, "precision": "int8", "why": lay.why}
             for lay in layers if lay.bits == 8]
    return kept


def _nncf_score(lay: _Layer, init: Any, reader: Reader) -> float:
    """NNCF's data-free mixed-precision score of one weight: 1 / its int8 (asymmetric,
    per output channel) quantization error, as ``DataFreeCriterion`` computes it."""
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig
    from nncf.quantization.algorithms.weight_compression.weight_lowering import get_integer_quantization_error
    from nncf.tensor import Tensor

    w = np.asarray(reader.array(init), dtype=np.float32)
    axis = 1 if lay.transposed else 0  # K, the reduction axis
    err = get_integer_quantization_error(Tensor(w), (axis,), WeightCompressionConfig(), reduction="max_mean")
    del w
    reader.release()
    return 1.0 / (float(err) + float(np.finfo(np.float32).eps))


def _quantize(lay: _Layer, init: Any, fmt: WeightFormat, reader: Reader, writer: Writer) -> list[Any]:
    """Quantize one weight with ORT's block kernel; returns its packed, scales (and zero points) tensors."""
    from onnx import TensorProto
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    w = reader.array(init)
    w = np.ascontiguousarray(w.T if lay.transposed else w)  # (K, N), as the kernel reads it
    config = DefaultWeightOnlyQuantConfig(block_size=fmt.group_size, is_symmetric=fmt.sym, bits=lay.bits)
    try:
        packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)
    except Exception as exc:
        raise QuantizationError(f"onnxruntime's block quantizer failed on {init.name}: {one_line(exc)}") from exc
    del w
    base = init.name
    out = [writer.tensor(f"{base}_Q{lay.bits}", TensorProto.UINT8, packed),
           writer.tensor(f"{base}_scales", TensorProto.FLOAT16 if scales.dtype == np.float16 else TensorProto.FLOAT,
                         scales)]
    if not fmt.sym:
        out.append(writer.tensor(f"{base}_zero_points", TensorProto.UINT8, zero_points))
    return out


def _rewrite(model: Any, layers: list[_Layer], fmt: WeightFormat) -> None:
    """Each compressed MatMul/Gemm becomes MatMulNBits (+ Add for a Gemm's bias)."""
    from onnx import helper

    if not layers:
        return
    by_node = {id(lay.node): lay for lay in layers}
    nodes = []
    for node in model.graph.node:
        lay = by_node.get(id(node))
        if lay is None:
            nodes.append(node)
            continue
        ins = [node.input[0], f"{lay.weight}_Q{lay.bits}", f"{lay.weight}_scales"]
        if not fmt.sym:
            ins.append(f"{lay.weight}_zero_points")
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        out = node.output[0] + "_nbits" if bias else node.output[0]
        nodes.append(helper.make_node("MatMulNBits", ins, [out], name=f"{node.name}_Q{lay.bits}",
                                      domain="com.microsoft", K=lay.k, N=lay.n, bits=lay.bits,
                                      block_size=fmt.group_size))
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # The float weights are gone: drop what still describes them (dynamo's value_info, old-IR inputs).
    gone = {lay.weight for lay in layers}
    for field in (model.graph.value_info, model.graph.input):
        keep = [v for v in field if v.name not in gone]
        del field[:]
        field.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _record(fmt: WeightFormat, layers: list[_Layer], kept: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {"int4": sum(lay.bits == 4 for lay in layers), "int8": sum(lay.bits == 8 for lay in layers),
              "float": sum(k["precision"] == "float" for k in kept)}
    params = {"int4": sum(lay.k * lay.n for lay in layers if lay.bits == 4),
              "int8": sum(lay.k * lay.n for lay in layers if lay.bits == 8)}
    return {"method": fmt.mode, **fmt.record(), "form": "MatMulNBits (com.microsoft)",
            "algorithm": "RTN, blocks along K (onnxruntime DefaultWeightOnlyQuantizer.qbits_block_quant)",
            "layers": counts, "parameters": params, "higher_precision": kept,
            "rule": ("MatMul/Gemm with a constant 2-D weight and K >= group size; int4 keeps the first and last "
                     "layers int8; ratio < 1 picks int4 layers in NNCF's data-free order; Conv, Gather and the "
                     "other tensors keep the source precision"),
            "library": "onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime_version": _ort_version()}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# -- float formats ------------------------------------------------------------------

_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def _numel(init: Any) -> int:
    return int(np.prod(init.dims)) if len(init.dims) else 1


def _bf16_weights(graph: Any) -> set[str]:
    """The float32 initializers stored in bf16: at least :data:`BF16_MIN_VALUES` values, read by a
    node and not a graph output."""
    from onnx import TensorProto

    outputs = {o.name for o in graph.output}
    read = {name for node in graph.node for name in node.input}
    return {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and _numel(t) >= BF16_MIN_VALUES
            and t.name in read and t.name not in outputs}


def _to_bf16(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as uint16 (``ml_dtypes``, as onnx and torch round: to nearest even)."""
    import ml_dtypes

    return np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def _cast_back(model: Any, names: set[str]) -> None:
    """Each bf16 weight ``W`` is ``W_bf16`` in the file and a ``Cast`` to float32 named ``W``
    ahead of the graph's nodes, so every reader of ``W`` is unchanged."""
    from onnx import TensorProto, helper

    if not names:
        return
    casts = [helper.make_node("Cast", [f"{name}_bf16"], [name], name=f"{name}_cast", to=TensorProto.FLOAT)
             for name in sorted(names)]
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    keep = [v for v in model.graph.input if v.name not in names]  # old-IR inputs naming the initializers
    del model.graph.input[:]
    model.graph.input.extend(keep)



def _copy_float(src: Path, out: Path) -> dict[str, Any]:
    """The model file and the external data files it names, as they are."""
    import onnx

    proto = onnx.load(str(src), load_external_data=False)
    names = {src.name} | {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    del proto
    for name in sorted(names):
        shutil.copyfile(src.parent / name, out / name)
    return {"method": "fp32", "format": "fp32"}


def check_fp16_fits(name: str, fp32_bytes: int) -> None:
    """Refuse an fp16 conversion that cannot fit: ONNX Runtime's converter holds the float model and
    then its fp16 copy in memory (a full-size FLUX transformer is 48 GB in fp32), and a kill half
    way would waste the export before it."""
    import psutil

    free = psutil.virtual_memory().available
    if 1.5 * fp32_bytes > free:
        raise QuantizationError(f"{name}: fp16 conversion holds the whole component in memory "
                                f"({fp32_bytes / 2**30:.1f} GiB of fp32, {free / 2**30:.1f} GiB available); store "
                                "it as bf16 (converted tensor by tensor), int8 or int4 instead")


def _fp16(src: Path, out: Path) -> dict[str, Any]:
    from enginekit.quant.ort_graph import ort_errors, over_size_limit, quiet

    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    check_fp16_fits(src.parent.name, sum(p.stat().st_size for p in src.parent.iterdir() if p.is_file()))

    with quiet(), ort_errors("onnxruntime fp16 conversion"):
        model = onnx.load(str(src))
        converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=over_size_limit(model))
        del model
        onnx.save_model(converted, str(out / src.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA, size_threshold=INLINE_BYTES)
    return {"method": "fp16", "format": "fp16", "library": "onnxruntime.transformers.float16",
            "io": "float32", "note": "converted in memory (the whole component at once)"}


def written_files(out: Path, entry: str = ENTRY) -> list[str]:
    """The files :func:`compress_component` wrote into ``out``: ``entry`` and the external data
    files it names."""
    import onnx

    proto = onnx.load(str(out / entry), load_external_data=False)
    names = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return [entry] + sorted(names)
