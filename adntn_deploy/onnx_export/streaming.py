"""Rewrite an ONNX model so its generated layers never hold their dense weight (``--weights stream``).

Every ai.adntn generator is split at its top contraction (:mod:`adntn_deploy.ir.split`) into two thin
factors, ``L`` (out, rank) and ``R`` (in, rank), computed from the cores with standard ops (run once at
load, like the generators in ``--weights load``). The layer that consumed the weight is rewritten:

* identity top activation (the default): the weight is exactly ``s L R^T``, so
  ``Gemm(x, W)`` -> ``Gemm(MatMul(x, R), s L)`` and ``Conv(x, W)`` -> ``Conv(Conv(x, R as rank filters), s L as
  1x1 filters)``: standard ops only, no tile of W is ever formed, and the FLOPs drop with the rank.
* a non-linear top activation: ``Gemm`` / ``MatMul`` become one ``ai.adntn::StreamedDense(x, L, R[, bias])``
  node (attributes ``activation``, ``scale``). The TVM compiler lowers it to a fused kernel that builds
  ``sigma(L R^T)`` one cache-sized tile at a time and multiplies it into the output
  (:mod:`adntn_deploy.compiler.schedules.streamed_dense`). A Conv with a non-linear top has no such kernel: clear error.

The result is for the compiler's private copy of the model; the user's file is never touched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from adntn_deploy.errors import GeneratorError
from adntn_deploy.ir.split import Factor, split_generator
from adntn_deploy.onnx_export.lowering import NodeEmitter, lower_program
from adntn_deploy.onnx_export.schema import DOMAIN

STREAMED_OP = "StreamedDense"


class StreamError(GeneratorError):
    """A generated layer cannot be streamed; the message names the layer and what to do instead."""


@dataclass(frozen=True)
class StreamedLayer:
    """How one generated layer was streamed: its kernel ("factored" or "fused") and its memory.

    ``factor_bytes`` is what the streamed layer keeps at run time (float32 factors), ``dense_bytes`` what
    the dense weight would take.
    """

    layer: str
    weight: str
    op: str
    kernel: str
    rank: int
    activation: str
    factor_bytes: int
    dense_bytes: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the artifact manifest)."""
        return asdict(self)


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _emit_factor(em: NodeEmitter, factor: Factor, core_inputs: dict[str, str], hint: str) -> str:
    """Nodes computing ``factor`` (rows, rank) as float32 from the core initializers."""
    if factor.ir is not None:
        out = em.fresh(hint)
        em.nodes.extend(lower_program(factor.ir, [core_inputs[c] for c in factor.ir.core_names], out, prefix=out + "."))
        return out
    core = core_inputs[factor.core.name]  # type: ignore[union-attr]
    moved = em.node("Transpose", [core], hint + "_t", perm=list(factor.permutation))
    return em.node("Reshape", [moved, em.const(np.array([factor.rows, factor.rank], np.int64), "shape")], hint)


def stream_weights(model) -> tuple[Any, list[StreamedLayer]]:
    """A copy of ``model`` whose generated layers run from their factors (see the module docstring).

    Returns the rewritten model and one :class:`StreamedLayer` per generator.

    Raises:
        StreamError: a weight feeds something other than one Gemm / MatMul (through a Transpose) / Conv, a
            generator does not split into output and input sides, a grouped convolution, or a Conv with a
            non-linear top activation; each message names the layer and suggests ``--weights load``.
    """
    import onnx

    from adntn_deploy.onnx_export.reader import find_generators

    model = onnx.ModelProto.FromString(model.SerializeToString())
    generators = {g.weight: g for g in find_generators(model)}
    # hold the node wrappers in a list: their ids key the replacements below
    all_nodes = list(model.graph.node)
    producers = {n.output[0]: n for n in all_nodes if n.domain == DOMAIN and n.output}
    users: dict[str, list] = {}
    for node in all_nodes:
        for name in node.input:
            users.setdefault(name, []).append(node)
    replace: dict[int, list] = {}  # id(node) -> nodes emitted in its place (an empty list drops it)
    layers = []
    for weight, gen in generators.items():
        label = gen.layer or weight
        hint = "; compile it with --weights load"
        try:
            split = split_generator(gen.ir)
        except GeneratorError as exc:
            raise StreamError(f"layer {label}: {exc}") from None
        consumers = users.get(weight, [])
        if len(consumers) != 1:
            raise StreamError(f"layer {label}: its weight feeds {len(consumers)} nodes, streaming needs exactly one{hint}")
        consumer, dropped = consumers[0], []
        if consumer.op_type == "Transpose" and list(_attr(consumer, "perm", [1, 0])) == [1, 0]:
            after = users.get(consumer.output[0], [])
            if len(after) != 1 or after[0].op_type not in ("MatMul", "Gemm") or list(after[0].input).index(consumer.output[0]) != 1:
                raise StreamError(f"layer {label}: its transposed weight does not feed one MatMul / Gemm{hint}")
            dropped, consumer = [consumer], after[0]
            if consumer.op_type == "Gemm" and (_attr(consumer, "transB", 0) or _attr(consumer, "transA", 0)):
                raise StreamError(f"layer {label}: unsupported Gemm transposes{hint}")
        elif consumer.op_type == "Gemm":
            if not _attr(consumer, "transB", 0) or _attr(consumer, "transA", 0) or list(consumer.input).index(weight) != 1:
                raise StreamError(f"layer {label}: its weight is not the transposed B input of a Gemm{hint}")
        elif consumer.op_type == "Conv":
            if _attr(consumer, "group", 1) != 1:
                raise StreamError(f"layer {label}: grouped convolutions do not factor into two convolutions{hint}")
            if split.activation != "identity":
                raise StreamError(
                    f"layer {label}: a streamed Conv2d needs an identity top activation (its weight then factors "
                    f"exactly); this generator ends in {split.activation}{hint}"
                )
        else:
            raise StreamError(f"layer {label}: its weight feeds a {consumer.op_type} node, not a Gemm, MatMul or Conv{hint}")
        core_inputs = dict(zip(gen.ir.core_names, gen.cores))
        em = NodeEmitter(f"{weight}.stream.")
        left = _emit_factor(em, split.left, core_inputs, "left")
        right = _emit_factor(em, split.right, core_inputs, "right")
        x = consumer.input[0]
        output = consumer.output[0]
        alpha = float(_attr(consumer, "alpha", 1.0)) if consumer.op_type == "Gemm" else 1.0
        beta = float(_attr(consumer, "beta", 1.0)) if consumer.op_type == "Gemm" else 1.0
        bias = consumer.input[2] if consumer.op_type in ("Gemm", "Conv") and len(consumer.input) > 2 and consumer.input[2] else None
        if bias and beta != 1.0:
            bias = em.node("Mul", [bias, em.const(np.array(beta, np.float32), "beta")], "bias")
        scale = float(split.scale) * alpha
        if split.activation == "identity":
            left_scaled = em.node("Mul", [left, em.const(np.array(scale, np.float32), "scale")], "left_scaled")
            if consumer.op_type == "Conv":
                conv_attrs = {a: _attr(consumer, a, None) for a in ("auto_pad", "dilations", "kernel_shape", "pads", "strides")}
                conv_attrs = {k: v for k, v in conv_attrs.items() if v is not None}
                filters = em.node("Transpose", [right], "right_t", perm=[1, 0])
                shape = [split.rank] + list(split.weight_shape[1:])
                filters = em.node("Reshape", [filters, em.const(np.array(shape, np.int64), "shape")], "rank_filters")
                reduced = em.node("Conv", [x, filters], "rank_conv", **conv_attrs)
                mix_shape = [split.weight_shape[0], split.rank] + [1] * (len(split.weight_shape) - 2)
                mix = em.node("Reshape", [left_scaled, em.const(np.array(mix_shape, np.int64), "shape")], "mix_filters")
                em.nodes.append(onnx.helper.make_node("Conv", [reduced, mix] + ([bias] if bias else []), [output], name=em.fresh("mix_conv")))
            else:
                reduced = em.node("MatMul", [x, right], "rank_mm")
                if consumer.op_type == "Gemm":
                    em.nodes.append(onnx.helper.make_node("Gemm", [reduced, left_scaled] + ([bias] if bias else []), [output],
                                                          name=em.fresh("mix_gemm"), transB=1))
                else:
                    left_t = em.node("Transpose", [left_scaled], "left_t", perm=[1, 0])
                    em.nodes.append(onnx.helper.make_node("MatMul", [reduced, left_t], [output], name=em.fresh("mix_mm")))
            kernel = "factored"
        else:
            em.nodes.append(onnx.helper.make_node(
                STREAMED_OP, [x, left, right] + ([bias] if bias else []), [output], name=em.fresh("fused"), domain=DOMAIN,
                activation=split.activation, scale=scale,
            ))
            kernel = "fused"
        replace[id(producers[weight])] = []
        for node in dropped:
            replace[id(node)] = []
        replace[id(consumer)] = em.nodes
        dense = int(np.prod(split.weight_shape))
        layers.append(StreamedLayer(label, weight, consumer.op_type, kernel, split.rank, split.activation,
                                    4 * split.factor_elements, 4 * dense))
    nodes = []
    for node in all_nodes:
        nodes.extend(onnx.NodeProto.FromString(n.SerializeToString()) for n in replace.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, layers
