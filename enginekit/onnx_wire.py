"""Which external-data files an ONNX model reads, from its protobuf bytes, without the ``onnx`` package.

Loading an ONNX artifact checks that every tensor stored outside ``model.onnx`` lives in a file
the manifest lists and hashes, inside the artifact folder (:func:`enginekit.artifact.check_onnx_external_data`).
That check runs on every load, on the edge install too, where ``onnx`` (30 MB with its protobuf
classes) is not installed; it needs only the ``location`` of each tensor whose ``data_location``
is ``EXTERNAL``. This module walks the protobuf wire format along the only paths a tensor can sit
on (ModelProto → graphs, functions, training graphs → initializers, sparse initializers, node
attributes and their subgraphs) and skips every other field by its length; the weights are never
copied (the file is memory-mapped). The field numbers are onnx.proto's; a test checks them
against the ``onnx`` package's own descriptors.
"""

from __future__ import annotations

import mmap
from pathlib import Path

__all__ = ["WireError", "external_locations", "FIELDS"]

#: (message, field) -> (number, message type the field holds); only the fields on a path to a tensor.
FIELDS: dict[tuple[str, str], tuple[int, str]] = {
    ("ModelProto", "graph"): (7, "GraphProto"),
    ("ModelProto", "training_info"): (20, "TrainingInfoProto"),
    ("ModelProto", "functions"): (25, "FunctionProto"),
    ("TrainingInfoProto", "initialization"): (1, "GraphProto"),
    ("TrainingInfoProto", "algorithm"): (2, "GraphProto"),
    ("GraphProto", "node"): (1, "NodeProto"),
    ("GraphProto", "initializer"): (5, "TensorProto"),
    ("GraphProto", "sparse_initializer"): (15, "SparseTensorProto"),
    ("FunctionProto", "node"): (7, "NodeProto"),
    ("FunctionProto", "attribute_proto"): (11, "AttributeProto"),
    ("NodeProto", "attribute"): (5, "AttributeProto"),
    ("AttributeProto", "t"): (5, "TensorProto"),
    ("AttributeProto", "g"): (6, "GraphProto"),
    ("AttributeProto", "tensors"): (10, "TensorProto"),
    ("AttributeProto", "graphs"): (11, "GraphProto"),
    ("AttributeProto", "sparse_tensor"): (22, "SparseTensorProto"),
    ("AttributeProto", "sparse_tensors"): (23, "SparseTensorProto"),
    ("SparseTensorProto", "values"): (1, "TensorProto"),
    ("SparseTensorProto", "indices"): (2, "TensorProto"),
    ("TensorProto", "external_data"): (13, "StringStringEntryProto"),
}
#: TensorProto.data_location's field number and the value that means EXTERNAL.
DATA_LOCATION, EXTERNAL = 14, 1
#: StringStringEntryProto's key and value.
KEY, VALUE = 1, 2
_CHILDREN: dict[str, dict[int, str]] = {}
for (_msg, _field), (_num, _type) in FIELDS.items():
    _CHILDREN.setdefault(_msg, {})[_num] = _type
#: Nesting deeper than this is a crafted file, not a model (protobuf's own default limit is 100).
MAX_DEPTH = 100


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError(f"truncated or overlong varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) in order."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise WireError("truncated fixed-width field")
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise WireError(f"field {number} runs {pos + length - end} bytes past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        else:  # groups (3, 4) are not in onnx.proto; 6 and 7 do not exist
            raise WireError(f"wire type {wire} in field {number}")


def _tensor(buf: memoryview, span: tuple[int, int]) -> str | None:
    """The ``location`` of an external tensor, None for a tensor stored in the file."""
    external, location = False, None
    for number, wire, value in _fields(buf, *span):
        if number == DATA_LOCATION and wire == 0:
            external = value == EXTERNAL
        elif number == FIELDS[("TensorProto", "external_data")][0] and wire == 2:
            key = val = None
            for n, w, v in _fields(buf, *value):
                if w == 2 and n in (KEY, VALUE):
                    text = bytes(buf[v[0]:v[1]]).decode("utf-8", errors="strict")
                    key, val = (text, val) if n == KEY else (key, text)
            if key == "location":
                location = val
    if not external:
        return None
    return location or ""


def _walk(buf: memoryview, span: tuple[int, int], message: str, found: dict[str, None], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise WireError(f"messages nested more than {MAX_DEPTH} deep")
    children = _CHILDREN.get(message, {})
    for number, wire, value in _fields(buf, *span):
        child = children.get(number)
        if child is None:
            continue
        if wire != 2:
            raise WireError(f"{message} field {number} has wire type {wire}, not a message")
        if child == "TensorProto":
            location = _tensor(buf, value)
            if location is not None:
                found[location] = None
        else:
            _walk(buf, value, child, found, depth + 1)


def external_locations(path: str | Path) -> list[str]:
    """Every distinct ``location`` of the model's external tensors, in file order ("" for an
    external tensor with none); :class:`WireError` on bytes that are not an ONNX protobuf."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            return []
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                found: dict[str, None] = {}
                try:
                    _walk(view, (0, size), "ModelProto", found, 0)
                except UnicodeDecodeError as exc:
                    raise WireError(f"an external-data entry is not UTF-8 ({exc.reason})") from None
                return list(found)
            finally:
                view.release()
