"""The Open Inference Protocol v2 gRPC endpoint (``inference.GRPCInferenceService``), beside the HTTP app.

Methods: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer, with inputs as
``raw_input_contents`` (what tritonclient sends) or typed ``contents``; outputs always come back as
``raw_output_contents``, as Triton sends them. It serves from the same :class:`InferenceEngine` as HTTP, so
admission limits and dynamic batching are shared. Status codes follow Triton's mapping: NOT_FOUND for an
unknown model or version, INVALID_ARGUMENT for malformed requests and inputs that do not fit the model,
UNAVAILABLE when a model is busy, RESOURCE_EXHAUSTED (from gRPC itself) for messages over the size limit,
INTERNAL for the server's own faults (logged as one line).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Callable

import numpy as np

from adntn_deploy.errors import ServingError
from adntn_deploy.serving.engine import (
    InferenceEngine, ModelBusyError, ModelNotFoundError, first_line, input_rejection_message, rejects_inputs,
)
from adntn_deploy.serving.grpc_messages import METHODS, SERVICE, message_class
from adntn_deploy.serving.protocol import DATATYPES, ProtocolError, datatype_of, declared_shape
from adntn_deploy.version import __version__

log = logging.getLogger("adntn_deploy.serving")
#: typed ``contents`` field of each datatype (FP16 travels only as raw bytes, as in Triton)
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}
#: requests up to this size are parsed on the event loop; bigger ones in a worker thread
INLINE_PARSE_BYTES = 256 * 1024


def decode_infer_request(request, max_tensor_bytes: int) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """The input arrays and requested output names (None: all) of a ModelInferRequest message.

    Raises:
        ProtocolError: no inputs, a duplicate name, an unknown datatype, a shape over ``max_tensor_bytes``
            (bytes), raw contents whose count or sizes do not match the inputs, typed contents with the wrong
            number of values or values out of the datatype's range, or both kinds of contents at once.
    """
    if not request.inputs:
        raise ProtocolError("the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                            "give one per input, in the inputs' order")
    arrays: dict[str, np.ndarray] = {}
    for k, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise ProtocolError(f"inputs[{k}] needs a name")
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        if tensor.datatype not in DATATYPES:
            raise ProtocolError(f"input {name!r}: datatype {tensor.datatype!r} is not supported; "
                                f"use one of {', '.join(DATATYPES)}")
        dtype = DATATYPES[tensor.datatype]
        shape = declared_shape(list(tensor.shape), name, dtype.itemsize, max_tensor_bytes)
        count = int(np.prod(shape, dtype=np.int64))
        if raw:
            if tensor.HasField("contents"):
                raise ProtocolError(f"input {name!r} has typed contents while the request uses raw_input_contents")
            data = raw[k]
            if len(data) != count * dtype.itemsize:
                raise ProtocolError(f"input {name!r}: raw_input_contents[{k}] has {len(data)} bytes; shape "
                                    f"{list(shape)} of {tensor.datatype} needs {count * dtype.itemsize}")
            if tensor.datatype == "BOOL":
                array = np.frombuffer(data, dtype=np.uint8) != 0
            else:
                array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise ProtocolError(f"input {name!r}: {tensor.datatype} data must be sent as raw_input_contents")
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise ProtocolError(f"input {name!r}: shape {list(shape)} needs {count} values, contents.{field} "
                                    f"has {len(values)}")
            try:
                array = np.array(values, dtype=dtype)
            except (OverflowError, ValueError):
                raise ProtocolError(f"input {name!r}: a value of contents.{field} is out of range for "
                                    f"{tensor.datatype}") from None
        arrays[name] = array.reshape(shape)
    outputs = [o.name for o in request.outputs] or None
    return arrays, outputs


def encode_infer_response(model_name: str, version: str, request_id: str, outputs: dict[str, np.ndarray]):
    """A ModelInferResponse message holding ``outputs`` as raw little-endian bytes (BOOL: one byte each).

    Raises:
        ProtocolError: an output dtype the protocol has no datatype for.
    """
    response = message_class("ModelInferResponse")(model_name=model_name, model_version=version, id=request_id)
    for name, value in outputs.items():
        array = np.ascontiguousarray(value)
        response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=list(array.shape))
        response.raw_output_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return response


class _Abort(Exception):
    def __init__(self, code, message: str) -> None:
        super().__init__(message)
        self.code = code


class InferenceService:
    """The six methods over ``engine``; ``on_request(model, status name, seconds)`` feeds metrics and logs."""

    def __init__(self, engine: InferenceEngine, max_tensor_bytes: int,
                 on_request: Callable[[str, str, float], None] | None = None) -> None:
        import grpc

        self.engine = engine
        self.max_tensor_bytes = max_tensor_bytes
        self.on_request = on_request
        self.codes = grpc.StatusCode

    def handler(self):
        """The generic RPC handler to add to a ``grpc.aio`` server (messages travel as bytes, parsed here)."""
        import grpc

        calls = {name: grpc.unary_unary_rpc_method_handler(self._method(name, *messages))
                 for name, messages in METHODS.items()}
        return grpc.method_handlers_generic_handler(SERVICE, calls)

    def _method(self, name: str, request_type: str, response_type: str):
        parse, make = message_class(request_type), message_class(response_type)
        logic = getattr(self, "_" + name)

        async def call(data: bytes, context):
            start, model, code = time.perf_counter(), "", self.codes.OK
            try:
                try:
                    request = parse.FromString(data) if len(data) <= INLINE_PARSE_BYTES else \
                        await asyncio.to_thread(parse.FromString, data)
                except Exception as exc:  # protobuf's DecodeError: bytes that are not this message
                    raise _Abort(self.codes.INVALID_ARGUMENT, f"malformed {request_type}: {first_line(exc)}") from None
                model = getattr(request, "model_name", None) or getattr(request, "name", "")
                fields = await logic(request)
                response = fields if not isinstance(fields, dict) else make(**fields)
                return response.SerializeToString()
            except _Abort as exc:
                code = exc.code
                await context.abort(code, str(exc))
            except ModelNotFoundError as exc:
                code = self.codes.NOT_FOUND
                await context.abort(code, str(exc))
            finally:
                if self.on_request is not None:
                    served = model if model in self.engine.models else ""  # client-chosen names never become labels
                    self.on_request(name, served, code.name, time.perf_counter() - start)

        return call

    async def _ServerLive(self, request):
        return {"live": True}

    async def _ServerReady(self, request):
        return {"ready": True}

    async def _ModelReady(self, request):
        try:  # as in Triton: a model that is not served is "not ready", not an error
            self.engine.find(request.name, request.version)
        except ModelNotFoundError:
            return {"ready": False}
        return {"ready": True}

    async def _ServerMetadata(self, request):
        return {"name": "adntn-deploy", "version": __version__, "extensions": ["binary_tensor_data"]}

    async def _ModelMetadata(self, request):
        model = self.engine.find(request.name, request.version)
        data = model.metadata(self.engine.versions(model.entry.name))
        response = message_class("ModelMetadataResponse")(name=data["name"], versions=data["versions"],
                                                          platform=data["platform"])
        for kind in ("inputs", "outputs"):
            for tensor in data[kind]:
                getattr(response, kind).add(**tensor)
        return response

    async def _ModelInfer(self, request):
        model = self.engine.find(request.model_name, request.model_version)
        try:
            with self.engine.admission(model):
                inputs, outputs = decode_infer_request(request, self.max_tensor_bytes)
                results = await self.engine.run(model, inputs, outputs)
                return encode_infer_response(model.entry.name, model.entry.version, request.id, results)
        except ModelBusyError as exc:
            raise _Abort(self.codes.UNAVAILABLE, str(exc)) from None
        except ProtocolError as exc:
            raise _Abort(self.codes.INVALID_ARGUMENT, str(exc)) from None
        except Exception as exc:
            if rejects_inputs(exc):
                raise _Abort(self.codes.INVALID_ARGUMENT, input_rejection_message(model, exc)) from None
            log.error(json.dumps({"ts": round(time.time(), 3), "grpc": "ModelInfer", "model": model.entry.name,
                                  "error": f"{type(exc).__name__}: {first_line(exc)}"}))
            raise _Abort(self.codes.INTERNAL, "internal server error (logged); retry, or report it if it persists") from None


async def start_grpc_server(service: InferenceService, host: str, port: int, max_message_bytes: int,
                            share_port: bool = False):
    """Start a ``grpc.aio`` server for ``service`` on ``host:port`` in the running event loop; the server.

    ``max_message_bytes`` bounds a request message (bigger ones get RESOURCE_EXHAUSTED); responses are not
    bounded. ``share_port`` lets several server processes (``serve --workers``) listen on one port.

    Raises:
        ServingError: the address cannot be bound (in use, or not an address of this machine).
    """
    import grpc

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", int(share_port))])
    server.add_generic_rpc_handlers((service.handler(),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise ServingError(f"cannot listen for gRPC on {host}:{port} (in use, or not this machine's address); "
                           "pick another serve --grpc-port")
    await server.start()
    return server
