"""The KServe v2 / Triton gRPC messages (package ``inference``) we serve, built at import time.

Why no generated ``*_pb2.py``: ``grpcio-tools`` and ``tritonclient[grpc]`` need different protobuf major
versions, and generated code checks the runtime's version. Building the descriptors here works with any
protobuf >= 4.22 and needs no code generator. The messages live in a private descriptor pool, so a process
that also imports tritonclient (whose pool holds the same names) sees no clash.

The field names and numbers are those of the Open Inference Protocol's ``grpc_predict_v2.proto`` (the
subset of Triton's ``grpc_service.proto`` that the six methods below use), so stock clients interoperate.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"
#: method name -> (request message, response message)
METHODS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
}

#: an input tensor of a request and an output tensor of a response have the same fields
_TENSOR_FIELDS = [("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "repeated int64"),
                  ("parameters", 4, "map<InferParameter>"), ("contents", 5, "InferTensorContents")]
#: message -> fields (name, number, type); "repeated X" for lists, "map<V>" for map<string, V>; a dotted
#: message name is nested in its parent; "oneof" groups list the members of one oneof
_MESSAGES: dict[str, list[tuple]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool")],
    "ModelReadyRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelReadyResponse": [("ready", 1, "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string"), ("version", 2, "string"), ("extensions", 3, "repeated string")],
    "ModelMetadataRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelMetadataResponse": [("name", 1, "string"), ("versions", 2, "repeated string"), ("platform", 3, "string"),
                              ("inputs", 4, "repeated ModelMetadataResponse.TensorMetadata"),
                              ("outputs", 5, "repeated ModelMetadataResponse.TensorMetadata")],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, "string"), ("datatype", 2, "string"),
                                             ("shape", 3, "repeated int64")],
    "InferParameter": [("oneof", "parameter_choice", [("bool_param", 1, "bool"), ("int64_param", 2, "int64"),
                                                      ("string_param", 3, "string"), ("double_param", 4, "double"),
                                                      ("uint64_param", 5, "uint64")])],
    "InferTensorContents": [("bool_contents", 1, "repeated bool"), ("int_contents", 2, "repeated int32"),
                            ("int64_contents", 3, "repeated int64"), ("uint_contents", 4, "repeated uint32"),
                            ("uint64_contents", 5, "repeated uint64"), ("fp32_contents", 6, "repeated float"),
                            ("fp64_contents", 7, "repeated double"), ("bytes_contents", 8, "repeated bytes")],
    "ModelInferRequest": [("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
                          ("parameters", 4, "map<InferParameter>"),
                          ("inputs", 5, "repeated ModelInferRequest.InferInputTensor"),
                          ("outputs", 6, "repeated ModelInferRequest.InferRequestedOutputTensor"),
                          ("raw_input_contents", 7, "repeated bytes")],
    "ModelInferRequest.InferInputTensor": _TENSOR_FIELDS,
    "ModelInferRequest.InferRequestedOutputTensor": [("name", 1, "string"), ("parameters", 2, "map<InferParameter>")],
    "ModelInferResponse": [("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"),
                           ("parameters", 4, "map<InferParameter>"),
                           ("outputs", 5, "repeated ModelInferResponse.InferOutputTensor"),
                           ("raw_output_contents", 6, "repeated bytes")],
    "ModelInferResponse.InferOutputTensor": _TENSOR_FIELDS,
}

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "int32": _F.TYPE_INT32,
            "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT,
            "double": _F.TYPE_DOUBLE}


def _add_field(message: descriptor_pb2.DescriptorProto, full_name: str, name: str, number: int, kind: str,
               oneof: int | None = None) -> None:
    field = message.field.add(name=name, number=number, json_name=_camel(name))
    if kind.startswith("map<"):  # map<string, V>: a repeated nested XxxEntry message marked map_entry
        value = kind[4:-1]
        entry = message.nested_type.add(name=_camel(name, upper=True) + "Entry")
        entry.options.map_entry = True
        _add_field(entry, f"{full_name}.{entry.name}", "key", 1, "string")
        _add_field(entry, f"{full_name}.{entry.name}", "value", 2, value)
        field.label, field.type = _F.LABEL_REPEATED, _F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{full_name}.{entry.name}"
        return
    repeated = kind.startswith("repeated ")
    kind = kind.removeprefix("repeated ")
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
    if oneof is not None:
        field.oneof_index = oneof


def _camel(name: str, upper: bool = False) -> str:
    head, *rest = name.split("_")
    text = head + "".join(part.title() for part in rest)
    return text[:1].upper() + text[1:] if upper else text


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="adntn_deploy/grpc_predict_v2.proto", package=PACKAGE,
                                               syntax="proto3")
    built: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full in sorted(_MESSAGES, key=lambda n: n.count(".")):  # parents before their nested messages
        parent, _, short = full.rpartition(".")
        message = (built[parent].nested_type if parent else proto.message_type).add(name=short)
        built[full] = message
    for full, fields in _MESSAGES.items():
        message = built[full]
        for spec in fields:
            if spec[0] == "oneof":
                index = len(message.oneof_decl)
                message.oneof_decl.add(name=spec[1])
                for name, number, kind in spec[2]:
                    _add_field(message, full, name, number, kind, oneof=index)
            else:
                _add_field(message, full, *spec)
    service = proto.service.add(name=SERVICE.rpartition(".")[2])
    for method, (request, response) in METHODS.items():
        service.method.add(name=method, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}")
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(_file_descriptor().SerializeToString())


def message_class(name: str) -> type:
    """The message class of ``name`` (e.g. "ModelInferRequest" or "ModelInferResponse.InferOutputTensor").

    Raises:
        KeyError: no such message in the protocol.
    """
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))
