"""Open Inference Protocol (KServe v2) tensors: datatypes, request decoding, response encoding.

JSON tensors carry ``data`` flattened in row-major order or nested; the binary tensor data extension
(Triton's, used by tritonclient by default) carries raw little-endian bytes after the JSON header, whose
length is given by the ``Inference-Header-Content-Length`` header. Every malformed request raises
:class:`ProtocolError`, which the server answers with its ``status`` (400 unless a subclass says otherwise)
and ``{"error": message}``.

Requests are untrusted: the JSON header's nesting depth is measured before it is parsed, declared shapes
are bounded before anything is allocated, values must be JSON values of the declared datatype (no strings
for numbers, no NaN/Infinity tokens), and binary sizes must account for the body exactly. JSON responses
are strict JSON too: an output holding NaN or Infinity can only be returned as binary data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from typing import Any, Mapping, Sequence

import numpy as np

from adntn_deploy.errors import ServingError
from adntn_deploy.safejson import nesting_depth

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
HEADER_LENGTH = "inference-header-content-length"
#: JSON nesting a request may use (a rank-4 nested tensor needs 7 levels); deeper ones are refused unparsed
DEFAULT_MAX_DEPTH = 64
#: bytes one declared input tensor may take once decoded (the server derives its own from --max-request-bytes)
DEFAULT_MAX_TENSOR_BYTES = 1 << 30
MAX_RANK = 32  # numpy's own limit is 64; no model we serve comes near either
_KINDS = {"BOOL": ({bool}, "true/false"), "FP": ({int, float}, "numbers"), "INT": ({int}, "integers")}
_JSON_NAMES = {str: "strings", dict: "objects", type(None): "nulls", bool: "true/false", float: "fractional numbers",
               int: "integers", list: "lists"}


class ProtocolError(ServingError):
    """A request that does not follow the protocol or does not fit the model (HTTP ``status``, 400)."""

    status = 400


class NonFiniteOutputError(ProtocolError):
    """An output holds NaN or Infinity and the client asked for it as JSON, which cannot carry them (HTTP 422)."""

    status = 422


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


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def declared_shape(value: Any, name: str, itemsize: int, max_tensor_bytes: int) -> tuple[int, ...]:
    """The declared shape, refused before anything is allocated when its extent passes ``max_tensor_bytes``.

    Zero-sized axes count as 1 in that extent: ``[0, 2**62]`` holds no element, yet numpy cannot represent it.
    """
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers, not {_brief(value)}")
    if len(value) > MAX_RANK:
        raise ProtocolError(f"input {name!r}: 'shape' has {len(value)} axes; at most {MAX_RANK} are accepted")
    extent = itemsize
    for dim in value:
        extent *= max(dim, 1)
        if extent > max_tensor_bytes:
            raise ProtocolError(f"input {name!r}: shape {_brief(value)} declares more than max_tensor_bytes="
                                f"{max_tensor_bytes} bytes; send a smaller tensor (or raise the server's limit)")
    return tuple(value)


def _leaves(data: Any, name: str, datatype: str) -> tuple[list, tuple[int, ...]]:
    """The scalars of ``data`` (nested lists, or one scalar) in row-major order, and its nested shape.

    Every leaf must be a JSON value of ``datatype``'s kind: true/false for BOOL, integers for the integer
    types, numbers for the float types. Levels are flattened whole with C-level builtins, not per element.
    """
    family = "BOOL" if datatype == "BOOL" else ("FP" if datatype.startswith("FP") else "INT")
    allowed, what = _KINDS[family]
    if not isinstance(data, list):
        level, dims = [data], []
    else:
        level, dims = data, [len(data)]
        while level:
            types = set(map(type, level))
            if list not in types:
                break
            lengths = set(map(len, level)) if types == {list} else ()
            if len(lengths) != 1:
                raise ProtocolError(f"input {name!r}: 'data' must be (nested) lists of {datatype} values with "
                                    "equal-length rows")
            dims.append(lengths.pop())
            level = list(chain.from_iterable(level))
    types = set(map(type, level))
    if not types <= allowed:
        found = ", ".join(sorted(_JSON_NAMES.get(t, t.__name__) for t in types - allowed))
        raise ProtocolError(f"input {name!r}: 'data' must be (nested) lists of {datatype} values (JSON {what}), "
                            f"it holds {found}")
    return level, tuple(dims)


def _reject_constant(token: str):
    raise ProtocolError(f"{token} is not a JSON number; send non-finite values as binary tensor data")


def _flag(params: dict, key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(f"{where}: parameter {key!r} must be true or false, not {_brief(value)}")
    return value


def _params(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object, not {_brief(value)}")
    return value


def decode_request(
    body: bytes | bytearray,
    header_length: str | None,
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> InferRequest:
    """Parse an infer request body (JSON, optionally followed by binary tensor data).

    ``header_length`` is the Inference-Header-Content-Length header (None: the body is all JSON).
    ``max_tensor_bytes`` bounds each declared input (bytes, zero-sized axes counted as 1) and ``max_depth``
    the JSON nesting; both are checked before the costly steps.

    Raises:
        ProtocolError: malformed or too deeply nested JSON, NaN/Infinity tokens, missing or mistyped fields,
            unknown datatypes, shapes over the limit, values that are not JSON values of the datatype or do
            not fit it, element counts that do not match shapes, or binary sizes that do not match the body.
    """
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError("Inference-Header-Content-Length must be an integer") from None
        if not 0 < split <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length must be between 1 and the body's {len(body)} bytes")
        header, binary = bytes(body[:split]), memoryview(body)[split:]
    else:
        header, binary = body, memoryview(b"")
    if nesting_depth(header) > max_depth:
        raise ProtocolError(f"the request JSON nests arrays/objects deeper than {max_depth} levels")
    try:
        request = json.loads(header, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ProtocolError("malformed JSON: the request is not UTF-8 text") from None
    except ProtocolError:  # from _reject_constant (a ValueError too): keep its own message
        raise
    except ValueError:  # the only other one json.loads raises: int() refuses over 4,300 digits
        raise ProtocolError("malformed JSON: a number has more digits than Python converts (4300)") from None
    except RecursionError:  # cannot happen below the depth check; kept so that no traceback ever escapes
        raise ProtocolError(f"the request JSON nests arrays/objects deeper than {max_depth} levels") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request body must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' list")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    request_params = _params(request.get("parameters"), "the request")
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
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise ProtocolError(f"input {name!r}: datatype {_brief(datatype)} is not supported; "
                                f"use one of {', '.join(DATATYPES)}")
        dtype = DATATYPES[datatype]
        shape = declared_shape(item.get("shape"), name, dtype.itemsize, max_tensor_bytes)
        count = int(np.prod(shape, dtype=np.int64))  # exact: _shape bounded the product
        params = _params(item.get("parameters"), f"input {name!r}")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if (not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize
                    or offset + size > len(binary)):
                raise ProtocolError(f"input {name!r}: binary_data_size {_brief(size)} does not match its shape "
                                    f"{list(shape)} of {datatype} ({count * dtype.itemsize} bytes) or the body")
            raw = binary[offset : offset + size]
            if datatype == "BOOL":  # any non-zero byte is true; numpy would keep the raw byte otherwise
                array = np.frombuffer(raw, dtype=np.uint8) != 0
            else:
                array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
            arrays[name] = array.reshape(shape)
            offset += size
            continue
        if "data" not in item:
            raise ProtocolError(f"input {name!r} has no 'data'")
        leaves, nested = _leaves(item["data"], name, datatype)
        if len(leaves) != count:
            raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} values, 'data' has {len(leaves)}")
        # nested lists cannot show the axes after a zero-length one ([[]] is all a [1, 0, 0] tensor can be)
        truncated = not count and nested == shape[: len(nested)] and nested[-1:] == (0,)
        if len(nested) > 1 and nested != shape and not truncated:
            raise ProtocolError(f"input {name!r}: nested 'data' has shape {list(nested)}, not {list(shape)}")
        try:
            with np.errstate(over="ignore"):
                array = np.array(leaves, dtype=dtype)
        except (OverflowError, ValueError, TypeError):
            raise ProtocolError(f"input {name!r}: a value of 'data' is out of range for {datatype}") from None
        if datatype.startswith("FP") and not np.isfinite(array).all():  # JSON has no inf: this is overflow
            raise ProtocolError(f"input {name!r}: a value of 'data' is out of range for {datatype}")
        arrays[name] = array.reshape(shape)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data follow the JSON header that no input's "
                            "binary_data_size accounts for")
    binary_default = bool(_flag(request_params, "binary_data_output", "the request"))
    wanted = request.get("outputs")
    names, binary_outputs = None, set()
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in wanted):
            raise ProtocolError("'outputs' must be a list of objects with a 'name'")
        names = [o["name"] for o in wanted]
        for o in wanted:
            where = f"output {o['name']!r}"
            as_binary = _flag(_params(o.get("parameters"), where), "binary_data", where)
            if as_binary or (as_binary is None and binary_default):
                binary_outputs.add(o["name"])
    return InferRequest(request_id, arrays, names, binary_outputs, binary_default)


#: elements per json.dumps call: each call holds the GIL (tens of ms for 64k floats on a busy 2-core box), so
#: a big output is encoded in slices that let the server's event loop (health checks) run in between
_ENCODE_SLICE = 1 << 13
_PART_BYTES = 1 << 20


def _json_values(array: np.ndarray) -> list[bytes]:
    flat = array.ravel()
    if flat.size <= _ENCODE_SLICE:
        return [json.dumps(flat.tolist(), separators=(",", ":")).encode()]
    parts = [b"["]
    for i in range(0, flat.size, _ENCODE_SLICE):
        text = json.dumps(flat[i : i + _ENCODE_SLICE].tolist(), separators=(",", ":"))[1:-1]
        parts.append((b"," if i else b"") + text.encode())
    parts.append(b"]")
    return parts


def _coalesce(pieces: list[bytes]) -> list[bytes]:
    """``pieces`` joined into parts of about ``_PART_BYTES`` (each join a short GIL hold)."""
    parts, group, size = [], [], 0
    for piece in pieces:
        group.append(piece)
        size += len(piece)
        if size >= _PART_BYTES:
            parts.append(b"".join(group))
            group, size = [], 0
    if group:
        parts.append(b"".join(group))
    return parts


def encode_response_parts(
    model: str, version: str, request: InferRequest, outputs: Mapping[str, np.ndarray], order: Sequence[str]
) -> tuple[list[bytes], dict[str, str]]:
    """The response body as a list of parts (about 1 MiB each; their concatenation is the body) and headers.

    Outputs asked for binary data follow the JSON header. Outputs sent as JSON must be finite: JSON has no
    NaN or Infinity, so such an output is refused rather than written as a bare ``NaN`` token that strict
    clients cannot parse.

    Raises:
        NonFiniteOutputError: a JSON output holds NaN or Infinity; the message says how to ask for binary data.
    """
    response: dict[str, Any] = {"model_name": model, "model_version": version}
    if request.id is not None:
        response["id"] = request.id
    pieces = [json.dumps(response, separators=(",", ":"))[:-1].encode() + b',"outputs":[']
    blobs = []
    for k, name in enumerate(order):
        array = np.ascontiguousarray(outputs[name]) if np.ndim(outputs[name]) else np.asarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array.dtype)}
        comma = b"," if k else b""
        if name in request.binary_outputs or (request.binary_default and request.outputs is None):
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
            pieces.append(comma + json.dumps(entry, separators=(",", ":")).encode())
            continue
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise NonFiniteOutputError(
                f"output {name!r} holds NaN or Infinity, which JSON cannot carry; ask for it as binary data: "
                '"parameters": {"binary_data_output": true} in the request, or {"binary_data": true} on the output')
        pieces.append(comma + json.dumps(entry, separators=(",", ":"))[:-1].encode() + b',"data":')
        pieces.extend(_json_values(array))
        pieces.append(b"}")
    pieces.append(b"]}")
    if not blobs:
        return _coalesce(pieces), {"content-type": "application/json"}
    header_bytes = sum(map(len, pieces))
    return _coalesce(pieces) + blobs, {
        "content-type": "application/octet-stream", "Inference-Header-Content-Length": str(header_bytes),
    }


def encode_response(
    model: str, version: str, request: InferRequest, outputs: Mapping[str, np.ndarray], order: Sequence[str]
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers: :func:`encode_response_parts` joined.

    Raises:
        NonFiniteOutputError: see :func:`encode_response_parts`.
    """
    parts, headers = encode_response_parts(model, version, request, outputs, order)
    return b"".join(parts), headers
