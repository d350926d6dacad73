"""Open Inference Protocol (KServe v2) tensors: datatypes, request decoding, response encoding.

JSON tensors carry ``data`` flattened in row-major order or nested; the binary tensor data extension
(Triton's, used by tritonclient by default) carries raw little-endian bytes after the JSON header, whose
length is given by the ``Inference-Header-Content-Length`` header. Every malformed request raises
:class:`ProtocolError`, which the server answers with 400 and ``{"error": message}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from adntn_deploy.errors import GeneratorError

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
HEADER_LENGTH = "inference-header-content-length"


class ProtocolError(GeneratorError):
    """A request that does not follow the protocol or does not fit the model (HTTP 400)."""


def datatype_of(dtype: np.dtype) -> str:
    """The protocol datatype name of a numpy dtype."""
    for name, dt in DATATYPES.items():
        if dt == np.dtype(dtype):
            return name
    raise ProtocolError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


@dataclass
class InferRequest:
    """A decoded inference request: id, input arrays, requested outputs and which want binary data."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    binary_outputs: set[str]
    binary_default: bool


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return tuple(value)


def decode_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request body (JSON, optionally followed by binary tensor data).

    Raises:
        ProtocolError: malformed JSON, missing or mistyped fields, unknown datatypes, element counts that
            do not match shapes, or binary sizes that do not match the body.
    """
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length must be an integer") from None
        if not 0 < split <= len(body):
            raise ProtocolError("Inference-Header-Content-Length is larger than the request body")
        header, binary = body[:split], memoryview(body)[split:]
    else:
        header, binary = body, memoryview(b"")
    try:
        request = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request body must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for k, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise ProtocolError(f"inputs[{k}] must be an object with name, shape, datatype and data")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"inputs[{k}] needs a 'name' string")
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        shape = _shape(item.get("shape"), name)
        datatype = item.get("datatype")
        if datatype == "BYTES" or datatype not in DATATYPES:
            raise ProtocolError(f"input {name!r}: datatype {datatype!r} is not supported; use one of {', '.join(DATATYPES)}")
        dtype = DATATYPES[datatype]
        count = math.prod(shape)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"input {name!r}: 'parameters' must be an object")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
                raise ProtocolError(f"input {name!r}: binary_data_size does not match its shape, datatype or the body")
            arrays[name] = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
            offset += size
            continue
        if "data" not in item:
            raise ProtocolError(f"input {name!r} has no 'data'")
        try:
            array = np.asarray(item["data"], dtype=dtype)
        except (ValueError, TypeError, OverflowError):
            raise ProtocolError(f"input {name!r}: 'data' must be (nested) lists of {datatype} values") from None
        if array.size != count:
            raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} values, 'data' has {array.size}")
        if array.ndim not in (1, len(shape)) or (array.ndim == len(shape) and array.shape != shape and count):
            raise ProtocolError(f"input {name!r}: nested 'data' has shape {list(array.shape)}, not {list(shape)}")
        arrays[name] = array.reshape(shape)
    wanted = request.get("outputs")
    names, binary_outputs = None, set()
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
            raise ProtocolError("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in wanted]
        binary_outputs = {o["name"] for o in wanted if (o.get("parameters") or {}).get("binary_data")}
    binary_default = bool((request.get("parameters") or {}).get("binary_data_output", False)) if isinstance(
        request.get("parameters") or {}, dict) else False
    return InferRequest(request_id, arrays, names, binary_outputs, binary_default)


def encode_response(
    model: str, version: str, request: InferRequest, outputs: Mapping[str, np.ndarray], order: Sequence[str]
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers; outputs asked for binary data follow the JSON header."""
    items, blobs = [], []
    for name in order:
        array = np.ascontiguousarray(outputs[name]) if np.ndim(outputs[name]) else np.asarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array.dtype)}
        if name in request.binary_outputs or (request.binary_default and request.outputs is None):
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        items.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": items}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header)),
    }
