"""Rewrite an ONNX model so its generated layers never hold their dense weight (``--weights stream``,
``export --stream``).

Every ai.adntn generator is split at its top join into two factors computed from the cores with standard
ops (run once at load, like the generators in ``--weights load``):

* split layout (:mod:`adntn_deploy.ir.split`): ``W = s sigma(L R^T)``, L (out, rank) and R (in, rank);
* operator layout (:mod:`adntn_deploy.ir.kron`): ``W = s sigma(sum_b A_b (x) B_b)``, the two halves' matrices.

With an identity top activation (the default) the consumer becomes standard ops that never form W
(:mod:`adntn_deploy.onnx_export.stream_forms`): ``Gemm(x, W)`` -> ``(x R) L^T`` or the two-product Kronecker
form; ``Conv`` -> two Convs (split) or a Conv then a MatMul (operator). A split-layout layer with a non-linear
top becomes one ``ai.adntn::StreamedDense(x, L, R[, bias])`` node for the TVM compiler's fused tile kernel
(:mod:`adntn_deploy.compiler.schedules.streamed_dense`); ONNX Runtime has no such kernel, so an exported file
(``runtime="onnx"``) cannot stream those layers. ``policy="auto"`` streams a layer only when the cost model
(FLOPs and weight bytes per call, :mod:`.stream_forms`) says it is cheaper than the dense layer.

The result is a new model; the input model (and the user's file) is never touched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adntn_deploy.errors import ExportError, GeneratorError
from adntn_deploy.ir.kron import KroneckerSplit, kronecker_split
from adntn_deploy.ir.split import Factor, SplitGenerator, split_generator
from adntn_deploy.onnx_export import stream_forms
from adntn_deploy.onnx_export.lowering import NodeEmitter, lower_program
from adntn_deploy.onnx_export.reader import node_attribute
from adntn_deploy.onnx_export.schema import DOMAIN, STREAM_FORMAT, STREAM_METADATA_KEY

STREAMED_OP = "StreamedDense"
POLICIES = ("all", "auto")
RUNTIMES = ("tvm", "onnx")


class StreamError(ExportError):
    """A generated layer cannot be streamed; the message names the layer and what to do instead."""


@dataclass(frozen=True)
class StreamedLayer:
    """What was decided for one generated layer, and its memory.

    ``mode``: "stream" (runs from its factors) or "load" (kept as a generator: ``policy="auto"`` found
    the dense layer cheaper). ``kernel``: "factored" (low-rank), "kronecker", "fused" (TVM's tile kernel)
    or "dense". ``factor_bytes``: what the layer keeps at run time (float32 factors; the dense weight
    when it was not streamed); ``dense_bytes``: the dense weight. ``cost_ratio``: estimated streamed /
    dense cost per call (:class:`adntn_deploy.onnx_export.stream_forms.Cost`); ``reason``: why, in words.
    """

    layer: str
    weight: str
    op: str
    kernel: str
    rank: int
    activation: str
    factor_bytes: int
    dense_bytes: int
    mode: str = "stream"
    layout: str = "split"
    cost_ratio: float = 0.0
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the artifact manifest)."""
        return asdict(self)


def _emit_factor(em: NodeEmitter, factor: Factor, core_inputs: dict[str, str], hint: str) -> str:
    """Nodes computing ``factor`` (rows, rank) as float32 from the core initializers."""
    if factor.ir is not None:
        out = em.fresh(hint)
        em.nodes.extend(lower_program(factor.ir, [core_inputs[c] for c in factor.ir.core_names], out, prefix=out + "."))
        return out
    core = core_inputs[factor.core.name]  # type: ignore[union-attr]
    moved = em.node("Transpose", [core], hint + "_t", perm=list(factor.permutation))
    return em.node("Reshape", [moved, em.const(np.array([factor.rows, factor.rank], np.int64), "shape")], hint)


def _consumer_of(weight: str, users: dict[str, list], shapes: dict[str, tuple], label: str, hint: str):
    """(the node using ``weight`` as a Gemm / MatMul / Conv weight, nodes dropped on the way, its Consumer).

    Raises:
        StreamError: any other use of the weight.
    """
    consumers = users.get(weight, [])
    if len(consumers) != 1:
        raise StreamError(f"layer {label}: its weight feeds {len(consumers)} nodes, streaming needs exactly one{hint}")
    consumer, dropped = consumers[0], []
    if consumer.op_type == "Transpose" and list(node_attribute(consumer, "perm", [1, 0])) == [1, 0]:
        after = users.get(consumer.output[0], [])
        if len(after) != 1 or after[0].op_type not in ("MatMul", "Gemm") or list(after[0].input).index(consumer.output[0]) != 1:
            raise StreamError(f"layer {label}: its transposed weight does not feed one MatMul / Gemm{hint}")
        dropped, consumer = [consumer], after[0]
        if consumer.op_type == "Gemm" and (node_attribute(consumer, "transB", 0) or node_attribute(consumer, "transA", 0)):
            raise StreamError(f"layer {label}: unsupported Gemm transposes{hint}")
    elif consumer.op_type == "Gemm":
        if not node_attribute(consumer, "transB", 0) or node_attribute(consumer, "transA", 0) or list(consumer.input).index(weight) != 1:
            raise StreamError(f"layer {label}: its weight is not the transposed B input of a Gemm{hint}")
    elif consumer.op_type == "Conv":
        if node_attribute(consumer, "group", 1) != 1:
            raise StreamError(f"layer {label}: grouped convolutions do not factor into two convolutions{hint}")
        if list(consumer.input).index(weight) != 1:
            raise StreamError(f"layer {label}: its weight is not the filter input of its Conv{hint}")
    else:
        raise StreamError(f"layer {label}: its weight feeds a {consumer.op_type} node, not a Gemm, MatMul or Conv{hint}")
    x, output = consumer.input[0], consumer.output[0]
    bias = consumer.input[2] if consumer.op_type in ("Gemm", "Conv") and len(consumer.input) > 2 and consumer.input[2] else None
    conv_attrs = {}
    if consumer.op_type == "Conv":
        conv_attrs = {a: node_attribute(consumer, a, None) for a in ("auto_pad", "dilations", "kernel_shape", "pads", "strides")}
        conv_attrs = {k: v for k, v in conv_attrs.items() if v is not None}
    out_shape = shapes.get(output)
    spatial = None
    if consumer.op_type == "Conv" and out_shape and all(isinstance(d, int) and d > 0 for d in out_shape[2:]):
        spatial = tuple(out_shape[2:])
    x_rank = len(shapes[x]) if x in shapes else None
    alpha = float(node_attribute(consumer, "alpha", 1.0)) if consumer.op_type == "Gemm" else 1.0
    info = stream_forms.Consumer(consumer.op_type, x, output, bias, alpha, conv_attrs, x_rank, spatial)
    return consumer, dropped, info


def _static_shapes(model) -> dict[str, tuple]:
    """Value name -> shape (ints where known, None elsewhere) from ONNX shape inference; {} if it fails."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes only refine the rewrite (static reshapes); it works without them
        return {}
    shapes = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = info.type.tensor_type
        if t.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def _rows_per_call(consumer: stream_forms.Consumer, shapes: dict[str, tuple], batch: int) -> int:
    """Input vectors per call: the batch (times output positions for a Conv), for the cost model."""
    x_shape = shapes.get(consumer.x) or ()
    lead = [d for d in x_shape[:-1]] if consumer.op != "Conv" else [x_shape[0] if x_shape else None]
    rows = 1
    for d in lead:
        rows *= d if isinstance(d, int) and d > 0 else batch
    if consumer.op == "Conv" and consumer.out_spatial:
        rows *= int(np.prod(consumer.out_spatial))
    return max(rows, 1)


def stream_weights(model, *, policy: str = "all", runtime: str = "tvm", batch: int = 1) -> tuple[Any, list[StreamedLayer]]:
    """A copy of ``model`` whose generated layers run from their factors (see the module docstring).

    Args:
        policy: "all" (stream every generated layer, or raise) or "auto" (stream where the cost model says
            it is cheaper than the dense layer; keep the generator elsewhere, and where a layer cannot stream).
        runtime: "tvm" (the compiler's private copy: the fused StreamedDense node is allowed) or "onnx" (an
            exported file for any ONNX runtime: standard ops only).
        batch: the batch assumed for a symbolic batch axis in the cost model.

    Returns the rewritten model and one :class:`StreamedLayer` per generator (streamed or kept).

    Raises:
        StreamError: (policy "all") a weight feeds something other than one Gemm / MatMul (through a
            Transpose) / Conv, a generator that does not split, a grouped convolution, a non-identity top
            that the runtime cannot stream, or an operator-layout Conv whose kernel modes span both halves;
            each message names the layer and suggests ``--weights load``.
    """
    import onnx

    from adntn_deploy.onnx_export.reader import find_generators

    if policy not in POLICIES or runtime not in RUNTIMES:
        raise ValueError(f"policy must be one of {POLICIES} and runtime one of {RUNTIMES}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    generators = {g.weight: g for g in find_generators(model)}
    shapes = _static_shapes(model) if generators else {}
    # hold the node wrappers in a list: their ids key the replacements below
    all_nodes = list(model.graph.node)
    producers = {n.output[0]: n for n in all_nodes if n.domain == DOMAIN and n.output}
    users: dict[str, list] = {}
    for node in all_nodes:
        for name in node.input:
            users.setdefault(name, []).append(node)
    replace: dict[int, list] = {}  # id(node) -> nodes emitted in its place (an empty list drops it)
    layers = []
    for index, (weight, gen) in enumerate(generators.items()):
        label = gen.layer or weight
        hint = "; compile it with --weights load" if runtime == "tvm" else "; export it without --stream"
        dense = int(np.prod(gen.ir.weight_shape))
        try:
            layer, consumer, dropped, emitted = _stream_one(gen, weight, label, hint, users, shapes, runtime, batch, f"adntn.s{index}.")
        except StreamError as exc:
            if policy == "all":
                raise
            layers.append(StreamedLayer(label, weight, "-", "dense", 0, "-", 4 * dense, 4 * dense, "load",
                                        _layout(gen.ir), 1.0, str(exc).split(": ", 1)[-1].split(";")[0]))
            continue
        if policy == "auto" and layer.cost_ratio >= 1.0:
            layers.append(StreamedLayer(label, weight, layer.op, "dense", layer.rank, layer.activation, 4 * dense,
                                        4 * dense, "load", layer.layout, layer.cost_ratio,
                                        f"the dense layer is cheaper (streamed cost {layer.cost_ratio:.2f}x)"))
            continue
        replace[id(producers[weight])] = []
        for node in dropped:
            replace[id(node)] = []
        replace[id(consumer)] = emitted
        layers.append(layer)
    nodes = []
    for node in all_nodes:
        nodes.extend(onnx.NodeProto.FromString(n.SerializeToString()) for n in replace.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if any(layer.mode == "stream" for layer in layers):
        _mark_streamed(model, layers)
    return model, layers


def _layout(ir) -> str:
    spec = ir.metadata.get("spec") if isinstance(ir.metadata, dict) else None
    return "operator" if isinstance(spec, dict) and spec.get("layout") == "operator" else "split"


def _stream_one(gen, weight: str, label: str, hint: str, users, shapes, runtime: str, batch: int, prefix: str):
    """(StreamedLayer, consumer node, nodes it drops, nodes emitted in its place) for one generator.

    Raises:
        StreamError: the layer cannot stream for ``runtime`` (see :func:`stream_weights`).
    """
    layout = _layout(gen.ir)
    try:
        split: SplitGenerator | KroneckerSplit = kronecker_split(gen.ir) if layout == "operator" else split_generator(gen.ir)
    except GeneratorError as exc:
        raise StreamError(f"layer {label}: {exc}") from None
    consumer, dropped, info = _consumer_of(weight, users, shapes, label, hint)
    if split.activation != "identity" and (layout == "operator" or runtime == "onnx" or info.op == "Conv"):
        what = {"operator": "an operator-layout weight", "split": f"a streamed {info.op}"}[layout]
        where = " in ONNX Runtime" if runtime == "onnx" and layout == "split" and info.op != "Conv" else ""
        raise StreamError(
            f"layer {label}: {what} needs an identity top activation to factor exactly{where}; this generator ends "
            f"in {split.activation}{hint}"
        )
    if isinstance(split, KroneckerSplit) and info.op == "Conv":
        why = stream_forms.kronecker_conv_supported(split)
        if why:
            raise StreamError(f"layer {label}: {why}{hint}")
    em = NodeEmitter(prefix)  # short value names: a streamed file repeats them in every node
    core_inputs = dict(zip(gen.ir.core_names, gen.cores))
    left = _emit_factor(em, split.left, core_inputs, "left")
    right = _emit_factor(em, split.right, core_inputs, "right")
    bias = info.bias
    beta = float(node_attribute(consumer, "beta", 1.0)) if consumer.op_type == "Gemm" else 1.0
    if bias and beta != 1.0:
        bias = em.node("Mul", [bias, em.const(np.array(beta, np.float32), "beta")], "bias")
    rows = _rows_per_call(info, shapes, batch)
    dense_cost = stream_forms.dense_cost(gen.ir.weight_shape, rows)
    if isinstance(split, KroneckerSplit):
        stream_forms.emit_kronecker(em, split, left, right, info, bias)
        kernel, cost = "kronecker", stream_forms.kronecker_cost(split, rows, conv=info.op == "Conv")
    elif split.activation == "identity":
        stream_forms.emit_lowrank(em, split, left, right, info, bias)
        kernel, cost = "factored", stream_forms.lowrank_cost(split, rows)
    else:
        import onnx

        em.nodes.append(onnx.helper.make_node(
            STREAMED_OP, [info.x, left, right] + ([bias] if bias else []), [info.output], name=em.fresh("fused"),
            domain=DOMAIN, activation=split.activation, scale=float(split.scale) * info.alpha,
        ))
        kernel, cost = "fused", stream_forms.lowrank_cost(split, rows)
    ratio = cost.units / dense_cost.units
    reason = f"streamed cost {ratio:.2f}x the dense layer's at {rows} row(s) per call"
    layer = StreamedLayer(label, weight, info.op, kernel, split.rank, split.activation, 4 * split.factor_elements,
                          4 * int(np.prod(gen.ir.weight_shape)), "stream", layout, round(ratio, 4), reason)
    for node in em.nodes:
        node.ClearField("name")  # optional in a graph; the output names already identify every node
    return layer, consumer, dropped, em.nodes


def _mark_streamed(model, layers: list[StreamedLayer]) -> None:
    """Record the stream format and the per-layer decisions in the model's metadata (readers check it)."""
    import json

    from adntn_deploy.version import __version__

    entry = next((p for p in model.metadata_props if p.key == STREAM_METADATA_KEY), None)
    if entry is None:
        entry = model.metadata_props.add()
        entry.key = STREAM_METADATA_KEY
    entry.value = json.dumps({
        "format": STREAM_FORMAT, "writer": __version__,
        "layers": [{k: v for k, v in layer.as_dict().items() if k != "weight"} for layer in layers],
    }, sort_keys=True)


def resident_weight_bytes(model, generators) -> int:
    """Bytes of weights ``model`` keeps at run time: its initializers, the dense weights its ``generators``
    (:func:`adntn_deploy.onnx_export.reader.find_generators`, as the caller already has them) make at load,
    and the factors of its streamed layers (from the ``adntn.stream`` metadata, validated by the reader)."""
    from onnx import helper

    from adntn_deploy.onnx_export.reader import stream_metadata

    total = sum(int(np.prod(i.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize
                for i in model.graph.initializer)
    total += sum(4 * int(np.prod(g.ir.weight_shape)) for g in generators)
    layers = (stream_metadata(model) or {}).get("layers")
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mode") == "stream" and type(layer.get("factor_bytes")) is int:
            total += layer["factor_bytes"]
    return total
