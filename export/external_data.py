"""ONNX initializers read and written one at a time, through external data.

:class:`Reader` maps each external tensor's bytes on its own and lets the map go
when asked (a map left open keeps its pages resident, and counted); :class:`Given`
takes them from a caller's function instead; :class:`Writer` appends tensors to one
new external data file, in onnx's layout (tensors from 1 MB on a 64 KiB boundary).
"""

from __future__ import annotations

import contextlib
import mmap
from pathlib import Path
from typing import Any, Callable

import numpy as np

from enginekit.errors import QuantizationError

__all__ = ["Reader", "Given", "Writer", "DATA", "INLINE_BYTES"]

DATA = "model.onnx.data"
#: Tensors smaller than this stay inside model.onnx (ORT's compile uses the same floor).
INLINE_BYTES = 1024
_ALIGN_FROM, _ALIGN = 1 << 20, 1 << 16
_COPY_CHUNK = 16 << 20


class Reader:
    """Reads initializers: external ones through a memory map of just their bytes, released
    by :meth:`release` (a map left open keeps its pages resident and counted)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, Any] = {}
        self._maps: list[mmap.mmap] = []

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
        for f in self._files.values():
            f.close()

    def where(self, init: Any) -> tuple[Path, int, int] | None:
        """(file, offset, length) of an external initializer, None for an inline one."""
        from onnx import TensorProto

        if init.data_location != TensorProto.EXTERNAL:
            return None
        info = {e.key: e.value for e in init.external_data}
        path = (self.folder / info["location"]).resolve()
        if self.folder.resolve() not in path.parents:
            raise QuantizationError(f"{init.name}: external data {info['location']!r} points outside the model folder")
        return path, int(info.get("offset", 0)), int(info["length"]) if "length" in info else path.stat().st_size

    def _file(self, path: Path) -> Any:
        if str(path) not in self._files:
            self._files[str(path)] = open(path, "rb")
        return self._files[str(path)]

    def array(self, init: Any) -> np.ndarray:
        """The initializer's values: a view of a private memory map for external data."""
        from onnx import helper, numpy_helper

        loc = self.where(init)
        if loc is None:
            return numpy_helper.to_array(init)
        path, offset, length = loc
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(self._file(path).fileno(), length + offset - start, access=mmap.ACCESS_READ, offset=start)
        self._maps.append(m)
        return np.frombuffer(m, dtype=dtype, count=length // dtype.itemsize, offset=offset - start).reshape(
            tuple(init.dims))

    def release(self) -> None:
        for m in self._maps:
            with contextlib.suppress(BufferError):  # a view still alive: closed when it goes
                m.close()
        self._maps.clear()

    def copy_to(self, init: Any, sink: Any) -> int:
        """Copy an external initializer's bytes to ``sink`` in chunks; returns the length."""
        path, offset, length = self.where(init)
        f = self._file(path)
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(_COPY_CHUNK, left))
            if not chunk:
                raise QuantizationError(f"{init.name}: external data in {path.name} ends early")
            sink.write(chunk)
            left -= len(chunk)
        return length


class Given:
    """Initializers from a caller's function (name -> array), checked against the graph's
    declared type and shape."""

    def __init__(self, tensors: Callable[[str], np.ndarray]) -> None:
        self.tensors = tensors

    def where(self, init: Any) -> None:
        return None

    def array(self, init: Any) -> np.ndarray:
        from onnx import helper

        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
        value = np.asarray(self.tensors(init.name))
        if tuple(value.shape) != tuple(init.dims):
            raise QuantizationError(f"{init.name}: the tensor given has shape {tuple(value.shape)}, "
                                    f"the graph declares {tuple(init.dims)}")
        return value if value.dtype == dtype else value.astype(dtype)

    def release(self) -> None:
        pass


class Writer:
    """Appends tensors to the new external data file and makes their TensorProtos."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def _start(self, length: int) -> int:
        pos = self.sink.tell()
        if length >= _ALIGN_FROM and pos % _ALIGN:
            self.sink.write(b"\0" * (_ALIGN - pos % _ALIGN))
            pos = self.sink.tell()
        return pos

    @staticmethod
    def _external(t: Any, offset: int, length: int) -> None:
        from onnx import TensorProto

        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", DATA), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value

    def tensor(self, name: str, dtype: int, array: np.ndarray) -> Any:
        from onnx import TensorProto

        t = TensorProto()
        t.name, t.data_type = name, dtype
        t.dims.extend(array.shape)
        data = np.ascontiguousarray(array)
        if data.nbytes < INLINE_BYTES:
            t.raw_data = data.tobytes()
            return t
        offset = self._start(data.nbytes)
        self.sink.write(memoryview(data).cast("B"))
        self._external(t, offset, data.nbytes)
        return t

    def copy(self, init: Any, reader: Any) -> Any:
        """``init`` as it is, its bytes moved to the new data file; small ones (shapes, axes)
        inline, where shape inference reads them."""
        from onnx import TensorProto

        t = TensorProto()
        t.CopyFrom(init)
        if init.data_type == TensorProto.STRING:
            return t
        loc = reader.where(init)
        if loc is not None and loc[2] >= INLINE_BYTES:  # a big external tensor: copied in chunks, never held
            offset = self._start(loc[2])
            reader.copy_to(init, self.sink)
            self._external(t, offset, loc[2])
            return t
        raw = np.ascontiguousarray(reader.array(init)).tobytes()
        reader.release()
        for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data"):
            t.ClearField(fld)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        if len(raw) < INLINE_BYTES:
            t.raw_data = raw
            return t
        offset = self._start(len(raw))
        self.sink.write(raw)
        self._external(t, offset, len(raw))
        return t
