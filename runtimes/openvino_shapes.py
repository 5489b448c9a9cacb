"""OpenVINO's ports and shapes in enginekit's terms: tensor specs named after the source
component (convert_model drops symbolic dimension names), the ``dims`` compile option
checked, and the static shapes a compile binds."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from enginekit.errors import BackendError
from enginekit.manifest import Manifest, TensorSpec

__all__ = ["specs", "parse_dims", "static_shapes"]

# OpenVINO element type names -> numpy dtype names. ``Type.to_dtype()`` maps
# bf16 to float16, which would misdescribe a bf16 engine, so the table is ours.
_OV_DTYPES = {
    "f64": "float64",
    "f32": "float32",
    "f16": "float16",
    "bf16": "bfloat16",
    "i64": "int64",
    "i32": "int32",
    "i16": "int16",
    "i8": "int8",
    "u64": "uint64",
    "u32": "uint32",
    "u16": "uint16",
    "u8": "uint8",
    "boolean": "bool",
}


def _dtype(element_type: Any) -> str:
    name = element_type.get_type_name()
    return _OV_DTYPES.get(name, name)


def _spec(port: Any, source: dict[str, TensorSpec]) -> TensorSpec:
    """Spec of an OpenVINO port, named and dimensioned after the source component.

    convert_model keeps ONNX tensor names but drops symbolic dimension names
    (a dynamic ``batch`` comes back as ``?``), so those are taken from the
    source spec of the same name and rank.
    """
    names = port.get_names()
    name = next((n for n in source if n in names), None) or port.get_any_name()
    ref = source.get(name)
    pshape = port.get_partial_shape()
    if pshape.rank.is_dynamic:  # no rank to check against: keep what the source declared
        return TensorSpec(name=name, dtype=_dtype(port.get_element_type()), shape=ref.shape if ref else ())
    shape: list[int | str] = []
    for axis, dim in enumerate(pshape):
        if dim.is_static:
            shape.append(dim.get_length())
        elif ref is not None and len(ref.shape) == len(pshape) and isinstance(ref.shape[axis], str):
            shape.append(ref.shape[axis])
        else:
            shape.append("?")
    return TensorSpec(name=name, dtype=_dtype(port.get_element_type()), shape=tuple(shape))


def specs(ports: Sequence[Any], source: Sequence[TensorSpec]) -> list[TensorSpec]:
    by_name = {s.name: s for s in source}
    return [_spec(p, by_name) for p in ports]


def parse_dims(dims: Mapping[str, Any], manifest: Manifest) -> dict[str, dict[str, int]]:
    """``{"unet": {"batch": 2}, "*": {"latent_height": 64}}`` checked: known components, positive sizes."""
    out: dict[str, dict[str, int]] = {}
    for comp, bindings in dims.items():
        if comp != "*" and comp not in manifest.components:
            raise BackendError(f"openvino: dims names component {comp!r}, which this artifact does not have "
                               f"(it has: {', '.join(manifest.components)})")
        if not isinstance(bindings, Mapping):
            raise BackendError(f"openvino: dims[{comp!r}] must map dimension names to sizes")
        for dim, size in bindings.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise BackendError(f"openvino: dims[{comp!r}][{dim!r}] must be a positive integer, got {size!r}")
        out[comp] = {str(k): int(v) for k, v in bindings.items()}
    return out


def static_shapes(model: Any, comp: Any, static_batch: int, bound: Mapping[str, int]) -> dict[Any, list[Any]]:
    """New input shapes: symbolic dimensions named in ``bound`` set to their sizes,
    the first axis to ``static_batch`` when given, the rest as they were."""
    by_name = {s.name: s for s in comp.inputs}
    shapes = {}
    for port in model.inputs:
        spec = next((by_name[n] for n in port.get_names() if n in by_name), None)
        dims = list(port.get_partial_shape())
        new: list[Any] = []
        for axis, dim in enumerate(dims):
            name = spec.shape[axis] if spec is not None and axis < len(spec.shape) else None
            if isinstance(name, str) and name in bound:
                new.append(bound[name])
            elif axis == 0 and static_batch:
                new.append(static_batch)
            else:
                new.append(dim)
        shapes[port] = new
    return shapes
