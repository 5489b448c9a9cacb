"""KServe v2 REST (Triton's and OpenVINO Model Server's protocol), with the binary-data
extension and Triton's classification extension, so ``tritonclient.http`` works unchanged.

Classifiers take ``pixel_values`` (FP32, N x 3 x H x W, preprocessed) or ``image``
(BYTES, N encoded images, preprocessed here) and give ``logits`` and ``embedding`` (with the
request parameter ``explain`` true/rollout/occlusion and ``image``, also ``explanation``,
``explanation_box`` and ``explanation_png``: each image's map, its box and a base64 PNG overlay);
pipelines take ``prompt`` (and ``negative_prompt``) as BYTES, generation settings as
request parameters, and give ``image`` (UINT8, N x H x W x 3).
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from enginekit.errors import EngineKitError, one_line
from enginekit.serve.errors import ApiError, status_for
from enginekit.serve.models import ModelSlot
from enginekit.serve.served import v2_dtype

__all__ = ["router"]

router = APIRouter(tags=["KServe v2"])

_DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
           "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
           "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}
HEADER = "inference-header-content-length"


def _state(request: Request) -> Any:
    return request.app.state.server


def metadata(slot: ModelSlot) -> dict[str, Any]:
    if slot.obj is None:
        return {"name": slot.name, "versions": ["1"], "platform": "enginekit", "inputs": [], "outputs": []}
    backend = getattr(slot.obj, "backend", "?")
    inputs, outputs = slot.served.kserve_io()
    return {"name": slot.name, "versions": ["1"], "platform": f"enginekit_{backend}", "inputs": inputs,
            "outputs": outputs}


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    from enginekit import __version__

    return {"name": "enginekit", "version": __version__,
            "extensions": ["binary_tensor_data", "classification", "statistics"]}


@router.get("/v2/health/live")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    state = _state(request)
    models = {s.name: s.describe() for s in state.slots.values()}
    body = {"ready": state.ready, "draining": state.draining, "models": models}
    return JSONResponse(body, status_code=200 if state.ready else 503)


@router.get("/v2/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"models": [s.describe() for s in _state(request).slots.values()]}


# Before /v2/models/{name}: "stats" is not a model's name here.
@router.get("/v2/models/stats")
@router.post("/v2/models/stats", include_in_schema=False)
@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def model_stats(request: Request, name: str = "", version: str = "") -> dict[str, Any]:
    """Triton's statistics extension: per model, requests answered and failed, time in the
    queue and in the engine, executions by batch size (see :mod:`enginekit.serve.stats`)."""
    state = _state(request)
    if name:
        request.state.model = name
        slots = [_version(state.slot(name), version)]
    else:
        slots = list(state.slots.values())
    return {"model_stats": [s.stats.triton(s.name) for s in slots]}


@router.post("/v2/repository/index")
async def repository_index(request: Request) -> list[dict[str, Any]]:
    """Triton's model repository index: every model with its state (READY, LOADING, or
    UNAVAILABLE with the reason); ``{"ready": true}`` lists the ready ones only."""
    body = await request.body()
    ready_only = False
    if body.strip():
        try:
            asked = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the request is not JSON (an index request is a JSON object, or empty)") from None
        if not isinstance(asked, dict) or not isinstance(asked.get("ready", False), bool):
            raise ApiError(400, "an index request is a JSON object whose 'ready' is true or false")
        ready_only = asked.get("ready", False)
    out = []
    for slot in _state(request).slots.values():
        if ready_only and not slot.ready:
            continue
        state = "READY" if slot.ready else "LOADING" if slot.state == "loading" else "UNAVAILABLE"
        entry = {"name": slot.name, "version": "1", "state": state}
        if state == "UNAVAILABLE":
            entry["reason"] = slot.reason
        out.append(entry)
    return out


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str = "1") -> dict[str, Any]:
    request.state.model = name
    slot = _version(_state(request).slot(name), version)
    return metadata(slot)


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str = "1") -> JSONResponse:
    request.state.model = name
    slot = _version(_state(request).slot(name), version)
    body: dict[str, Any] = {"name": name, "ready": slot.ready, "state": slot.state}
    if not slot.ready:
        body["reason"] = slot.reason
    return JSONResponse(body, status_code=200 if slot.ready else 503)


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def model_config(request: Request, name: str, version: str = "1") -> dict[str, Any]:
    request.state.model = name
    state = _state(request)
    slot = _version(state.slot(name), version)
    meta = metadata(slot)
    batching = slot.served.kserve_batching(state.settings) if slot.served is not None else {
        "max_batch_size": 0, "dynamic_batching": None}
    return {"name": name, "platform": meta["platform"], **batching,
            "input": [{"name": t["name"], "data_type": f"TYPE_{t['datatype'].replace('BYTES', 'STRING')}",
                       "dims": t["shape"]} for t in meta["inputs"]],
            "output": [{"name": t["name"], "data_type": f"TYPE_{t['datatype'].replace('BYTES', 'STRING')}",
                        "dims": t["shape"]} for t in meta["outputs"]]}


def _version(slot: ModelSlot, version: str) -> ModelSlot:
    if version not in ("1", ""):
        raise ApiError(404, f"model {slot.name!r} has one version, '1' (asked for {version!r})")
    return slot


@router.post("/v2/models/{name}/infer", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"],
                                              "properties": {"name": {"type": "string"},
                                                             "shape": {"type": "array", "items": {"type": "integer"}},
                                                             "datatype": {"type": "string"},
                                                             "data": {"type": "array"},
                                                             "parameters": {"type": "object"}}}},
        "outputs": {"type": "array", "items": {"type": "object"}},
        "parameters": {"type": "object"}}}}}}})
@router.post("/v2/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, name: str, version: str = "1") -> Response:
    """One inference: tensors in (JSON, or a JSON header followed by binary blobs), tensors out."""
    request.state.model = name
    state = _state(request)
    slot = _version(state.slot(name), version)
    body = await request.body()
    header, blobs = _split_body(body, request.headers.get(HEADER))
    slot = state.ready_slot(name)
    try:
        inputs = _read_inputs(header, blobs)
        outputs = await slot.served.kserve_infer(request, inputs, header.get("parameters") or {})
    except EngineKitError as exc:  # the task's own checks: bad tensors are the client's (400)
        raise ApiError(400 if status_for(exc) == 422 else status_for(exc), one_line(exc)) from None
    return _write_outputs(slot, header, outputs)


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"Inference-Header-Content-Length {header_length!r} does not fit a body of "
                                f"{len(body)} bytes")
        n = int(header_length)
        raw, blobs = body[:n], body[n:]
    else:
        raw, blobs = body, b""
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request is not JSON (an inference request is a JSON object)") from None
    except RecursionError:
        raise ApiError(400, "the request's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise ApiError(400, "the request must be a JSON object with 'inputs'")
    for key in ("parameters",):
        if key in header and not isinstance(header[key], dict):
            raise ApiError(400, f"'{key}' must be an object")
    return header, blobs


def _read_inputs(header: dict[str, Any], blobs: bytes) -> dict[str, np.ndarray]:
    items = header.get("inputs")
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'inputs' must be a non-empty list of tensors")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(400, f"inputs[{i}] must be an object")
        name, dtype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"inputs[{i}].name must be a string")
        if dtype not in _DTYPES:
            raise ApiError(400, f"input {name!r}: datatype {dtype!r} is not one of {', '.join(_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2**31 for d in shape)):
            raise ApiError(400, f"input {name!r}: shape must be a list of non-negative integers")
        count = int(np.prod(shape, dtype=np.float64))
        if count > 2**28:
            raise ApiError(413, f"input {name!r}: {count} elements is too many")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError(400, f"input {name!r}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(blobs):
                raise ApiError(400, f"input {name!r}: binary_data_size {size!r} runs past the binary data")
            raw = blobs[offset:offset + size]
            offset += size
            array = _from_binary(name, raw, dtype, shape, count)
        else:
            array = _from_json(name, item.get("data"), dtype, shape, count)
        if name in out:
            raise ApiError(400, f"input {name!r} is given twice")
        out[name] = array
    if offset != len(blobs):
        raise ApiError(400, f"{len(blobs) - offset} bytes of binary data belong to no input")
    return out


def _from_binary(name: str, raw: bytes, dtype: str, shape: list[int], count: int) -> np.ndarray:
    if dtype == "BYTES":
        values, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise ApiError(400, f"input {name!r}: BYTES element length runs past the data")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise ApiError(400, f"input {name!r}: BYTES element runs past the data")
            values.append(raw[pos:pos + n])
            pos += n
        if len(values) != count:
            raise ApiError(400, f"input {name!r}: {len(values)} elements for shape {shape}")
        return np.array(values, dtype=np.object_).reshape(shape)
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    if len(raw) != count * itemsize:
        raise ApiError(400, f"input {name!r}: {len(raw)} bytes for shape {shape} of {dtype} "
                            f"(expected {count * itemsize})")
    return np.frombuffer(raw, dtype=_DTYPES[dtype]).reshape(shape)


def _from_json(name: str, data: Any, dtype: str, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise ApiError(400, f"input {name!r}: give 'data' as a list (or binary data)")
    flat = _flatten(data, name)
    if len(flat) != count:
        raise ApiError(400, f"input {name!r}: {len(flat)} values for shape {shape}")
    if dtype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise ApiError(400, f"input {name!r}: BYTES data must be strings")
        return np.array([v.encode("utf-8") for v in flat], dtype=np.object_).reshape(shape)
    kind = np.dtype(_DTYPES[dtype]).kind
    ok = (lambda v: isinstance(v, bool)) if kind == "b" else (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and (kind == "f" or float(v).is_integer()))
    if not all(ok(v) for v in flat):
        raise ApiError(400, f"input {name!r}: data holds values that are not {dtype}")
    try:
        with np.errstate(all="ignore"):
            return np.array(flat, dtype=_DTYPES[dtype]).reshape(shape)
    except (OverflowError, ValueError):
        raise ApiError(400, f"input {name!r}: a value does not fit {dtype}") from None


def _flatten(data: list, name: str, depth: int = 0) -> list:
    if depth > 8:
        raise ApiError(400, f"input {name!r}: data is nested too deeply")
    out: list = []
    for v in data:
        if isinstance(v, list):
            out.extend(_flatten(v, name, depth + 1))
        else:
            out.append(v)
    return out


def _write_outputs(slot: ModelSlot, header: dict[str, Any], outputs: dict[str, np.ndarray]) -> Response:
    params = header.get("parameters") or {}
    all_binary = bool(params.get("binary_data_output", False))
    asked = header.get("outputs")
    if asked is None:
        wanted = [(name, {}) for name in outputs]
    else:
        if not isinstance(asked, list):
            raise ApiError(400, "'outputs' must be a list")
        wanted = []
        for i, item in enumerate(asked):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ApiError(400, f"outputs[{i}] must be an object with a name")
            p = item.get("parameters") or {}
            if not isinstance(p, dict):
                raise ApiError(400, f"outputs[{i}].parameters must be an object")
            if item["name"] not in outputs:
                raise ApiError(400, f"model {slot.name!r} has no output {item['name']!r} (it has {sorted(outputs)})")
            wanted.append((item["name"], p))
    tensors, blobs = [], []
    for name, p in wanted:
        array = outputs[name]
        k = p.get("classification")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ApiError(400, f"output {name!r}: classification must be a positive integer")
            array = slot.served.classification(name, array, k)
        dtype = "BYTES" if array.dtype == np.object_ else v2_dtype(array.dtype.name)
        tensor: dict[str, Any] = {"name": name, "datatype": dtype, "shape": list(array.shape)}
        if p.get("binary_data", all_binary):
            raw = _to_binary(array)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif dtype == "BYTES":
            tensor["data"] = [v.decode("utf-8") for v in array.reshape(-1)]
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": slot.name, "model_version": "1", "outputs": tensors}
    if isinstance(header.get("id"), str):
        body["id"] = header["id"]
    raw_json = json.dumps(body).encode()
    if not blobs:
        return Response(raw_json, media_type="application/json")
    return Response(raw_json + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(raw_json))})


def _to_binary(array: np.ndarray) -> bytes:
    if array.dtype == np.object_:
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return np.ascontiguousarray(array).tobytes()
