"""Read ONNX files: load with clear errors, find and validate ai.adntn generator nodes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from adntn_deploy.errors import ExportError, GeneratorError
from adntn_deploy.ir.program import GeneratorIR
from adntn_deploy.onnx_export.schema import (
    DOMAIN,
    DOMAIN_VERSION,
    METADATA_KEY,
    OP_FAMILIES,
    STREAM_FORMAT,
    STREAM_METADATA_KEY,
)


class OnnxModelError(ExportError):
    """An ONNX file is unreadable, malformed, or holds an ai.adntn node this version cannot run."""


@dataclass(frozen=True)
class OnnxGenerator:
    """One ai.adntn node: the weight tensor it produces, its op type, program and core initializers."""

    weight: str
    op_type: str
    ir: GeneratorIR
    cores: tuple[str, ...]
    layer: str


def node_attribute(node, name: str, default):
    """The value of attribute ``name`` of ONNX ``node`` (ints, floats, a tensor...), or ``default``."""
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def load_onnx(path: str | os.PathLike, check: bool = True):
    """Load an ONNX model, validate its ai.adntn nodes, then run the ONNX checker.

    The ai.adntn validation runs first because its messages name the real problem (a missing core, an
    unknown op) where the generic checker would only report an unsorted or dangling graph.

    Raises:
        OnnxModelError: missing file, truncated or non-ONNX bytes, an invalid ai.adntn node (see
            :func:`find_generators`), or a model the checker rejects.
    """
    import onnx

    path = Path(path)
    if path.is_dir():
        raise OnnxModelError(f"{path} is a folder, not an ONNX file")
    if not path.is_file():
        raise OnnxModelError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise OnnxModelError(f"{path} is not a valid ONNX file ({type(exc).__name__}); re-export it") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxModelError(f"{path} holds no graph (empty or truncated file); re-export it")
    stream_metadata(model, str(path))
    find_generators(model)
    if check:
        from adntn_deploy.onnx_export.schema import register_schemas

        register_schemas()
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxModelError(f"{path} fails the ONNX checker: {first}") from None
    return model


def find_generators(model) -> list[OnnxGenerator]:
    """Every ai.adntn node of ``model``, validated against its program and initializers.

    Raises:
        OnnxModelError: a newer ai.adntn opset, an unknown ai.adntn op, an unreadable program, a missing
            function body, a core initializer that is missing or has the wrong shape, attributes of the wrong
            type, or attributes / a function body that disagree with the program (a file edited after export).
    """
    from onnx import AttributeProto

    version = next((o.version for o in model.opset_import if o.domain == DOMAIN), None)
    if version is not None and version > DOMAIN_VERSION:
        raise OnnxModelError(
            f"the model uses {DOMAIN} opset {version}; this adntn-deploy runs up to {DOMAIN_VERSION}: upgrade adntn-deploy"
        )
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    functions = {(f.domain, f.name, f.overload): f for f in model.functions}
    summary = generator_summary(model)
    found = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type not in OP_FAMILIES:
            raise OnnxModelError(
                f"unknown op {DOMAIN}::{node.op_type} (node {node.name!r}); this adntn-deploy knows "
                f"{', '.join(sorted(OP_FAMILIES))}: upgrade adntn-deploy or re-export the model"
            )
        attrs = {a.name: a for a in node.attribute}
        if "program" not in attrs:
            raise OnnxModelError(f"{DOMAIN}::{node.op_type} node {node.name!r} has no 'program' attribute; re-export it")
        if len(node.output) != 1:
            raise OnnxModelError(f"node {node.name!r} has {len(node.output)} outputs, a generator has one; re-export the model")
        for name, kind in (("program", AttributeProto.STRING), ("weight_shape", AttributeProto.INTS), ("family", AttributeProto.STRING)):
            if name in attrs and attrs[name].type != kind:
                raise OnnxModelError(f"attribute {name!r} of node {node.name!r} has the wrong type; re-export the model")
        try:
            ir = GeneratorIR.from_json(attrs["program"].s)
        except GeneratorError as exc:
            raise OnnxModelError(f"node {node.name!r}: unreadable generator program ({exc})") from None
        if OP_FAMILIES[node.op_type] != ir.family:
            raise OnnxModelError(f"node {node.name!r} is {node.op_type} but its program is a {ir.family} generator")
        if (DOMAIN, node.op_type, node.overload) not in functions:
            raise OnnxModelError(f"node {node.name!r} has no function body in the file; re-export it with adntn-deploy")
        if len(node.input) != len(ir.cores):
            raise OnnxModelError(f"node {node.name!r} has {len(node.input)} inputs, its program needs {len(ir.cores)} cores")
        for name, core in zip(node.input, ir.cores):
            if name not in inits:
                raise OnnxModelError(f"core initializer {name!r} of node {node.name!r} is missing")
            if inits[name] != core.shape:
                raise OnnxModelError(f"core initializer {name!r} has shape {inits[name]}, the program expects {core.shape}")
        declared = [int(d) for d in attrs["weight_shape"].ints] if "weight_shape" in attrs else list(ir.weight_shape)
        family = attrs["family"].s.decode("utf-8", "replace") if "family" in attrs else ir.family
        if declared != list(ir.weight_shape) or family != ir.family:
            raise OnnxModelError(
                f"node {node.name!r}: its weight_shape/family attributes disagree with its program (the file was "
                "modified after export); re-export it with adntn-deploy"
            )
        _check_body(node, ir, functions[(DOMAIN, node.op_type, node.overload)])
        entry = summary.get(node.output[0])
        layer = entry.get("layer") if isinstance(entry, dict) and isinstance(entry.get("layer"), str) else node.overload
        found.append(OnnxGenerator(node.output[0], node.op_type, ir, tuple(node.input), layer))
    return found


def stream_metadata(model, path: str = "the model") -> dict | None:
    """The ``adntn.stream`` metadata of a streamed file (``export --stream``), or None for other files.

    Raises:
        OnnxModelError: a newer stream format than this adntn-deploy reads (upgrade), or malformed metadata.
    """
    from adntn_deploy.safejson import loads_bounded

    raw = next((p.value for p in model.metadata_props if p.key == STREAM_METADATA_KEY), None)
    if raw is None:
        return None
    try:
        meta = loads_bounded(raw, what=f"metadata {STREAM_METADATA_KEY}")
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or type(meta.get("format")) is not int:
        raise OnnxModelError(f"{path}: malformed {STREAM_METADATA_KEY} metadata; re-export it with adntn-deploy export --stream")
    if meta["format"] > STREAM_FORMAT:
        raise OnnxModelError(
            f"{path} was streamed by adntn-deploy {meta.get('writer', '?')} (stream format {meta['format']}); this "
            f"adntn-deploy reads stream format {STREAM_FORMAT} and older: upgrade adntn-deploy"
        )
    return meta


def generator_summary(model) -> dict[str, dict]:
    """The ``adntn.generators`` metadata (present in both the ai.adntn and the standard-ops form).

    The summary only informs (layer names, reports); a malformed or too deeply nested one reads as {}, and
    entries that are not objects are dropped.
    """
    from adntn_deploy.safejson import loads_bounded

    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), "{}") or "{}"
    try:
        summary = loads_bounded(raw, what=f"metadata {METADATA_KEY}")
    except ValueError:  # JsonLimitError, or json's own limits (huge integers)
        return {}
    if not isinstance(summary, dict):
        return {}
    return {k: v for k, v in summary.items() if isinstance(v, dict)}


#: default-domain opsets the lowering is valid for (ReduceSum takes axes as an input from 13 on)
_BODY_OPSETS = range(13, 24)


def _check_body(node, ir: GeneratorIR, function) -> None:
    """Refuse a function body that is not exactly what the exporter makes from ``ir``.

    Why: ONNX Runtime and ``--weights load`` run the body, ``--weights stream`` and the checkpoints run the
    program; a body edited after export would make them disagree silently. The body is rebuilt from the
    program with the file's own formal names and compared structurally (node names may differ).
    """
    from adntn_deploy.onnx_export.lowering import body_signature, lower_program

    versions = {o.domain: o.version for o in function.opset_import}
    same = (
        len(function.input) == len(ir.cores) and len(function.output) == 1
        and set(versions) == {""} and versions[""] in _BODY_OPSETS
    )
    if same:
        expected = lower_program(ir, list(function.input), function.output[0])
        same = body_signature(function.node) == body_signature(expected)
    if not same:
        raise OnnxModelError(
            f"node {node.name!r}: its function body does not compute its 'program' attribute (the file was modified "
            "after export); re-export it with adntn-deploy"
        )
