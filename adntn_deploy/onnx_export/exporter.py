"""Export a PyTorch model with generated layers to ONNX with ai.adntn generator nodes.

How: the model is copied, every generated layer is swapped for its dense twin (``to_dense``), and torch's
dynamo exporter exports the whole model (convolutions, pooling, attention, ...). In the exported graph each
dense weight initializer is then replaced by the cores (initializers) and one ai.adntn node that produces
the weight; its function body replays the program with standard ops. The file therefore holds the cores,
never the dense weight. If the exporter folded a weight into a transposed constant, that constant is
found by value and produced by a Transpose of the generator's output.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adntn_deploy.errors import ExportError
from adntn_deploy.ir.program import GeneratorIR
from adntn_deploy.onnx_export.lowering import body_signature, lower_program
from adntn_deploy.onnx_export.pooling import swap_adaptive_pools
from adntn_deploy.onnx_export.schema import DOMAIN, DOMAIN_VERSION, FAMILY_OPS, METADATA_KEY, register_schemas

DEFAULT_OPSET = 18


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote: the path, its size in bytes and the generators it holds."""

    path: Path
    bytes: int
    generators: dict[str, dict[str, Any]] = field(default_factory=dict)
    standard_ops: bool = False
    #: per generated layer, what ``stream`` decided (empty when not streaming): StreamedLayer.as_dict()
    streamed: list[dict[str, Any]] = field(default_factory=list)


def _swap_generated_layers(model):
    """A copy of ``model`` with dense twins of its generated layers; returns (copy, {layer: (ir, weight)})."""
    from adntn_deploy.nn import generated_layers

    clone = copy.deepcopy(model).eval()
    swapped: dict[str, tuple[GeneratorIR, np.ndarray]] = {}
    for layer_name, gw in list(generated_layers(clone)):
        owner = clone.get_submodule(layer_name) if layer_name else clone
        if not hasattr(owner, "to_dense"):
            raise ExportError(f"layer {layer_name!r} ({type(owner).__name__}) has a generated weight but no dense twin to export")
        dense = owner.to_dense()
        swapped[layer_name] = (gw.ir, dense.weight.detach().numpy().astype(np.float32))
        if not layer_name:
            return dense, swapped
        parent_name, _, child = layer_name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, dense)
    return clone, swapped


def _torch_export(model, example_inputs, input_names, output_names, dynamic_batch, opset):
    import torch

    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = tuple({0: torch.export.Dim("batch", min=1, max=65536)} for _ in example_inputs)
    sink = io.StringIO()
    # torch logs warnings (missing torchvision ops) and, on failure, whole tracebacks through handlers
    # bound to the real stderr; our one-line error says what matters, so silence logging meanwhile
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), torch.no_grad():
            program = torch.onnx.export(
                model, tuple(example_inputs), dynamo=True, input_names=list(input_names),
                output_names=list(output_names) if output_names else None, opset_version=opset,
                dynamic_shapes=dynamic_shapes, verbose=False, report=False,
            )
    except Exception as exc:  # torch wraps the real reason; report the innermost cause's first line
        root = exc
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        text = str(root).strip()
        first = text.splitlines()[0] if text else ""
        raise ExportError(f"torch could not export the model ({type(root).__name__}: {first}); check the input shapes") from None
    finally:
        logging.disable(logging.NOTSET)
    return program.model_proto


def _find_weight(graph, layer: str, weight: np.ndarray):
    """(initializer, transposed?) holding ``weight`` in the exported graph, by name then by value."""
    from onnx import numpy_helper

    by_name = {init.name: init for init in graph.initializer}
    init = by_name.get(f"{layer}.weight" if layer else "weight")
    if init is not None and tuple(init.dims) == weight.shape:
        return init, False
    for init in graph.initializer:
        if tuple(init.dims) == weight.shape and np.array_equal(numpy_helper.to_array(init), weight):
            return init, False
        if weight.ndim == 2 and tuple(init.dims) == weight.shape[::-1] and np.array_equal(numpy_helper.to_array(init), weight.T):
            return init, True
    raise ExportError(f"the exported graph has no initializer holding the weight of layer {layer!r}")


def _attach_generators(proto, swapped, cores_by_layer, opset: int) -> dict[str, dict[str, Any]]:
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    front, functions, summary = [], [], {}
    # (op, body signature) -> overload: layers whose bodies compute alike (same program and scale: copies,
    # tied layers) share one function body
    bodies: dict[tuple, str] = {}
    for layer, (ir, weight) in swapped.items():
        init, transposed = _find_weight(graph, layer, weight)
        weight_name = init.name
        graph.initializer.remove(init)
        for inp in [i for i in graph.input if i.name == weight_name]:
            graph.input.remove(inp)
        prefix = f"{layer}.adntn." if layer else "adntn."
        core_names = [prefix + name for name in ir.core_names]
        for name, core in zip(core_names, ir.core_names):
            graph.initializer.append(numpy_helper.from_array(cores_by_layer[layer][core].astype(np.float32), name))
        op = FAMILY_OPS[ir.family]
        formal = [f"core{k}" for k in range(len(core_names))]
        body = lower_program(ir, formal, "weight")
        key = (op, tuple(body_signature(body)))
        overload = bodies.setdefault(key, layer or "model")
        generated = weight_name if not transposed else f"{weight_name}.generated"
        front.append(helper.make_node(
            op, core_names, [generated], name=f"{prefix}generate", domain=DOMAIN, overload=overload,
            program=ir.to_compact_json(), weight_shape=list(ir.weight_shape), family=ir.family,
        ))
        if transposed:
            front.append(helper.make_node("Transpose", [generated], [weight_name], name=f"{prefix}transpose", perm=[1, 0]))
        graph.value_info.append(helper.make_tensor_value_info(generated, TensorProto.FLOAT, list(ir.weight_shape)))
        if overload == (layer or "model"):
            for node in body:  # names are optional inside a function; its value names stay unique
                node.ClearField("name")
            functions.append(helper.make_function(
                DOMAIN, op, formal, ["weight"], body, [helper.make_opsetid("", opset)],
                attributes=["program", "weight_shape", "family"], overload=overload,
            ))
        report = ir.report()
        summary[generated] = {
            "layer": layer, "family": ir.family, "op": f"{DOMAIN}::{op}", "params": report.params,
            "dense_params": report.dense_params, "ratio": report.compression_ratio,
        }
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    proto.functions.extend(functions)
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    proto.ir_version = max(proto.ir_version, 10)  # function overloads need IR version 10
    return summary


def _set_metadata(proto, key: str, value: str) -> None:
    for prop in proto.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value


def to_standard_ops(proto):
    """Inline the ai.adntn functions: the same model with standard ONNX ops only (no custom domain)."""
    import onnx.inliner

    inlined = onnx.inliner.inline_local_functions(proto)
    del inlined.functions[:]
    keep = [o for o in inlined.opset_import if o.domain != DOMAIN]
    del inlined.opset_import[:]
    inlined.opset_import.extend(keep)
    _set_metadata(inlined, "adntn.form", "standard-ops")
    return inlined


def save_model_atomically(proto, path: Path) -> int:
    """Write ``proto`` to ``path`` via a temporary file and rename; returns the size in bytes."""
    data = proto.SerializeToString()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(data)


def export_onnx(
    model,
    example_inputs: Sequence[Any],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    standard_ops: bool = False,
    stream: bool | str = False,
) -> ExportResult:
    """Export ``model`` (any nn.Module; generated layers become ai.adntn nodes) to ``path``.

    Args:
        example_inputs: tensors with the shapes to export (batch 2 or more when ``dynamic_batch``).
        input_names / output_names: graph names (default input0.., torch's output names).
        dynamic_batch: make axis 0 of every input (and so the outputs) symbolic ("batch").
        opset: default-domain opset (18 by default; 13..23).
        standard_ops: inline the generator functions so the file has no custom domain.
        stream: True / "on": every generated layer runs from its two factors (standard ops; the dense weight
            never exists in any ONNX runtime: docs/onnx.md#streamed-files); "auto": only the layers the cost
            model finds cheaper streamed; False / "off": generators as they are.

    Raises:
        ExportError: torch cannot export the model, an unsupported opset, or a weight not found.
        StreamError: ``stream=True`` and a layer that cannot stream (the message names it).
    """
    import onnx

    stream_mode = {True: "on", False: "off"}.get(stream, stream) if isinstance(stream, bool) else stream
    if stream_mode not in ("on", "off", "auto"):
        raise ExportError(f"stream={stream!r} is not one of on, off, auto")
    if not 13 <= opset <= 23:
        raise ExportError(f"opset {opset} is not supported: use 13..23 (default {DEFAULT_OPSET})")
    if dynamic_batch and any(getattr(x, "shape", (0,))[0] < 2 for x in example_inputs):
        raise ExportError("dynamic_batch= needs example inputs with batch >= 2 (torch specialises batch 1)")
    register_schemas()
    names = list(input_names or [f"input{k}" for k in range(len(example_inputs))])
    if len(names) != len(example_inputs):
        raise ExportError(f"{len(names)} input names for {len(example_inputs)} example inputs")
    dense_model, swapped = _swap_generated_layers(model)
    swap_adaptive_pools(dense_model)  # the copy: adaptive pools as one MatMul (onnx_export/pooling.py)
    cores = {
        layer: {name: t.detach().numpy() for name, t in gw.core_tensors().items()}
        for layer, gw in _generated(model)
    }
    proto = _torch_export(dense_model, example_inputs, names, output_names, dynamic_batch, opset)
    summary = _attach_generators(proto, swapped, cores, opset)
    _set_metadata(proto, METADATA_KEY, json.dumps(summary, sort_keys=True))
    _set_metadata(proto, "adntn.form", "ai.adntn")
    streamed: list[dict[str, Any]] = []
    if stream_mode != "off":
        from adntn_deploy.onnx_export.streaming import stream_weights

        batch = int(example_inputs[0].shape[0]) if example_inputs and getattr(example_inputs[0], "shape", ()) else 1
        proto, layers = stream_weights(proto, policy="all" if stream_mode == "on" else "auto", runtime="onnx",
                                       batch=1 if dynamic_batch else batch)
        streamed = [layer.as_dict() for layer in layers]
        _drop_unused_functions(proto)
    if standard_ops:
        proto = to_standard_ops(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # pragma: no cover - a bug in the exporter if it happens
        raise ExportError(f"the exported model does not pass the ONNX checker: {exc}") from None
    out = Path(path)
    size = save_model_atomically(proto, out)
    return ExportResult(out, size, summary, standard_ops, streamed)


def _drop_unused_functions(proto) -> None:
    """Remove function bodies (and the ai.adntn opset) that no node uses any more after streaming."""
    used = {(n.domain, n.op_type, n.overload) for n in proto.graph.node}
    keep = [f for f in proto.functions if (f.domain, f.name, f.overload) in used]
    del proto.functions[:]
    proto.functions.extend(keep)
    if not any(n.domain == DOMAIN for n in proto.graph.node):
        opsets = [o for o in proto.opset_import if o.domain != DOMAIN]
        del proto.opset_import[:]
        proto.opset_import.extend(opsets)


def _generated(model):
    from adntn_deploy.nn import generated_layers

    return list(generated_layers(model))
