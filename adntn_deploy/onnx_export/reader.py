"""Read ONNX files: load with clear errors, find and validate ai.adntn generator nodes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from adntn_deploy.errors import GeneratorError
from adntn_deploy.ir.program import GeneratorIR
from adntn_deploy.onnx_export.schema import DOMAIN, DOMAIN_VERSION, METADATA_KEY, OP_FAMILIES


class OnnxModelError(GeneratorError):
    """An ONNX file is unreadable, malformed, or holds an ai.adntn node this version cannot run."""


@dataclass(frozen=True)
class OnnxGenerator:
    """One ai.adntn node: the weight tensor it produces, its op type, program and core initializers."""

    weight: str
    op_type: str
    ir: GeneratorIR
    cores: tuple[str, ...]
    layer: str


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
    if not path.is_file():
        raise OnnxModelError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise OnnxModelError(f"{path} is not a valid ONNX file ({type(exc).__name__}); re-export it") from None
    if not model.graph.node and not model.graph.output:
        raise OnnxModelError(f"{path} holds no graph (empty or truncated file); re-export it")
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
            function body, or a core initializer that is missing or has the wrong shape.
    """
    version = next((o.version for o in model.opset_import if o.domain == DOMAIN), None)
    if version is not None and version > DOMAIN_VERSION:
        raise OnnxModelError(
            f"the model uses {DOMAIN} opset {version}; this adntn-deploy runs up to {DOMAIN_VERSION}: upgrade adntn-deploy"
        )
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    functions = {(f.domain, f.name, f.overload) for f in model.functions}
    summary = json.loads(next((p.value for p in model.metadata_props if p.key == METADATA_KEY), "{}") or "{}")
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
        try:
            ir = GeneratorIR.from_json(attrs["program"].s.decode())
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
        layer = summary.get(node.output[0], {}).get("layer", node.overload)
        found.append(OnnxGenerator(node.output[0], node.op_type, ir, tuple(node.input), layer))
    return found


def generator_summary(model) -> dict[str, dict]:
    """The ``adntn.generators`` metadata (present in both the ai.adntn and the standard-ops form)."""
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), "{}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {}
