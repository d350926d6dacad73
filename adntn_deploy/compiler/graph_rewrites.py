"""ONNX graph rewrites run on the compiler's private copy of a model before TVM imports it.

TVM's ONNX importer translates operator by operator, and Relax does not fold what ONNX Runtime's graph
optimiser folds. Two forms common in models from other tools cost our kernels time:

* a ``BatchNormalization`` after a ``Conv`` becomes four elementwise ops (a subtraction, a division by
  ``sqrt(var + eps)``, a multiplication, an addition) in every output element's epilogue; the division
  alone costs about as much as 8 vector FMAs. Folded into the convolution's weight and bias, it is a bias.
* ``Sum`` (n-ary addition, ResNet's residual joins in Caffe2 exports) imports as broadcast + stack + sum,
  which copies every input once more; a chain of ``Add`` fuses into the producer's kernel instead.

Each rewrite is a class with ``find`` (the nodes it replaces, after checking that the rewrite keeps the
function) and ``apply``; :func:`rewrite_graph` runs the registry :data:`REWRITES` in order. The user's
file is never touched: :func:`adntn_deploy.compiler.frontend.import_model` passes the inlined copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adntn_deploy.onnx_export.reader import OnnxModelError, node_attribute


@dataclass
class GraphIndex:
    """Lookups over one ONNX graph: producers, consumers, initializers and graph outputs by name."""

    graph: Any
    producer: dict[str, Any] = field(default_factory=dict)
    consumers: dict[str, list[Any]] = field(default_factory=dict)
    initializers: dict[str, Any] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    #: initializers a rewrite stopped reading (removed at the end when nothing else reads them)
    orphaned: set[str] = field(default_factory=set)
    #: (op type, first output) of a node -> the nodes that take its place (none: it is dropped); applied
    #: in one pass over the graph by :meth:`commit`, so a rewrite of many nodes stays linear in the graph
    replacements: dict[tuple[str, str], list[Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, graph) -> "GraphIndex":
        """Index ``graph`` (an onnx GraphProto) as it is now."""
        index = cls(graph)
        index.initializers = {init.name: init for init in graph.initializer}
        index.outputs = {out.name for out in graph.output}
        for node in graph.node:
            for name in node.output:
                if name:
                    index.producer[name] = node
            # an If / Loop / Scan body reads names of this graph without listing them as inputs: count the
            # node holding it as their reader, so no rewrite changes or drops what a body still reads
            for name in [*node.input, *sorted(outer_reads(node))]:
                if name:
                    index.consumers.setdefault(name, []).append(node)
        return index

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is known without running the model, else None.

        Known: an initializer, a ``Constant`` node's tensor, or a ``ConstantOfShape`` of a known shape
        (how some exporters, and onnx's own light test models, write filled tensors).
        """
        from onnx import numpy_helper

        init = self.initializers.get(name)
        if init is not None:
            return numpy_helper.to_array(init)
        node = self.producer.get(name)
        if node is None or not _is_standard(node):
            return None
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "ConstantOfShape":
            shape = self.constant(node.input[0])
            if shape is None:
                return None
            fill = node_attribute(node, "value", None)
            value = numpy_helper.to_array(fill) if fill is not None else np.zeros(1, np.float32)
            return np.full(tuple(int(d) for d in shape), value.reshape(-1)[0], dtype=value.dtype)
        return None

    def is_initializer(self, name: str) -> bool:
        """Whether ``name`` is an initializer (stored in the file, as opposed to computed)."""
        return name in self.initializers

    def replace(self, node, nodes: list[Any]) -> None:
        """Put ``nodes`` where ``node`` is (``node`` may be among them), at :meth:`commit`."""
        self.replacements[(node.op_type, node.output[0] if node.output else "")] = nodes

    def commit(self) -> None:
        """Apply the recorded replacements to the graph's node list (its order is otherwise kept)."""
        from onnx import NodeProto

        if not self.replacements:
            return
        rebuilt = []
        for node in self.graph.node:
            for kept in self.replacements.get((node.op_type, node.output[0] if node.output else ""), [node]):
                copy = NodeProto()
                copy.CopyFrom(kept)
                rebuilt.append(copy)
        del self.graph.node[:]
        self.graph.node.extend(rebuilt)
        self.replacements.clear()

    def only_consumer(self, name: str) -> Any | None:
        """The one node reading ``name``, or None when it has several readers or is a graph output."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None


def outer_reads(node) -> set[str]:
    """The names the subgraphs of ``node`` (an If's branches, a Loop's or Scan's body, nested ones too)
    read from enclosing graphs: read by a subgraph node and defined by none of the subgraph's inputs,
    initializers or nodes. Empty for a node without graph attributes."""
    from onnx import AttributeProto

    graphs = [attr.g for attr in node.attribute if attr.type == AttributeProto.GRAPH]
    graphs += [g for attr in node.attribute if attr.type == AttributeProto.GRAPHS for g in attr.graphs]
    reads: set[str] = set()
    for graph in graphs:
        defined = {value.name for value in graph.input} | {init.name for init in graph.initializer}
        defined |= {name for inner in graph.node for name in inner.output}
        for inner in graph.node:
            reads |= {name for name in [*inner.input, *outer_reads(inner)] if name and name not in defined}
    return reads


def _is_standard(node) -> bool:
    return node.domain in ("", "ai.onnx")


def _fresh_name(index: GraphIndex, base: str) -> str:
    """A tensor name not used in the graph yet, derived from ``base``."""
    def taken(candidate: str) -> bool:
        return candidate in index.producer or candidate in index.initializers or candidate in index.consumers

    name, k = base, 0
    while taken(name):
        k += 1
        name = f"{base}_{k}"
    return name


class FoldBatchNormIntoConv:
    """``Conv(x, W[, b]) -> BatchNormalization(scale, B, mean, var)`` becomes ``Conv(x, W', b')``.

    With ``s = scale / sqrt(var + eps)``: ``W' = W * s`` per output channel and ``b' = (b - mean) * s + B``.
    Applies when the Conv's output feeds only this BatchNormalization (in inference form: one output, no
    ``training_mode``) and the four statistics are known float32 vectors of one value per output channel
    (:meth:`GraphIndex.constant`).
    A Conv weight that is an initializer read by nothing else is folded here; any other weight (a
    generated one) gets a ``Mul`` node, which the compiler lifts to load time with the other weight work.
    """

    name = "fold-batchnorm-into-conv"

    def find(self, index: GraphIndex) -> list[tuple[Any, Any, list[np.ndarray]]]:
        """Every (Conv, BatchNormalization, its scale, B, mean and var) this rewrite folds."""
        pairs = []
        for node in index.graph.node:
            if node.op_type != "BatchNormalization" or not _is_standard(node) or len(node.input) != 5:
                continue
            conv = index.producer.get(node.input[0])
            if conv is None or conv.op_type != "Conv" or not _is_standard(conv):
                continue
            if index.only_consumer(conv.output[0]) is not node:
                continue
            stats = self._statistics(index, conv, node)
            if stats is not None:
                pairs.append((conv, node, stats))
        return pairs

    @staticmethod
    def _weight_rank(index: GraphIndex, conv) -> int | None:
        weight = index.initializers.get(conv.input[1])
        if weight is not None:
            return len(weight.dims)
        kernel = node_attribute(conv, "kernel_shape", None)
        return len(kernel) + 2 if kernel else None

    def _statistics(self, index: GraphIndex, conv, bn) -> list[np.ndarray] | None:
        """The BN's float32 per-channel statistics when it can be folded (inference form, after a Conv
        whose weight rank is known), else None."""
        if any(name for name in bn.output[1:]) or node_attribute(bn, "training_mode", 0):
            return None
        stats = [index.constant(name) for name in bn.input[1:]]
        if any(s is None or s.dtype != np.float32 or s.ndim != 1 for s in stats) or len({s.shape for s in stats}) != 1:
            return None
        weight = index.initializers.get(conv.input[1])
        if weight is not None and weight.dims and weight.dims[0] != stats[0].shape[0]:
            raise OnnxModelError(f"BatchNormalization {bn.name or bn.output[0]!r} has {stats[0].shape[0]} values per "
                                 f"statistic, but the Conv before it makes {weight.dims[0]} channels: the model is "
                                 "malformed; re-export it")
        if weight is not None and weight.data_type != 1:  # 1: FLOAT
            return None
        return stats if self._weight_rank(index, conv) is not None else None

    def apply(self, index: GraphIndex, conv, bn, stats: list[np.ndarray]) -> None:
        """Fold ``bn`` into ``conv`` (in place): the Conv takes over the BatchNormalization's output name."""
        from onnx import helper, numpy_helper

        scale, shift, mean, var = (s.astype(np.float64) for s in stats)
        eps = float(node_attribute(bn, "epsilon", 1e-5))
        factor = scale / np.sqrt(var + eps)
        graph = index.graph
        new_inits, before_conv = [], []

        weight_name = conv.input[1]
        weight = index.constant(weight_name) if index.is_initializer(weight_name) else None
        # only a stored weight is folded here; a computed one (generated, or a ConstantOfShape) would
        # become a stored tensor, so it gets a Mul that runs where the weight is computed
        if weight is not None and len(index.consumers.get(weight_name, [])) == 1:
            index.orphaned.add(weight_name)
            folded = (weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32)
            new_weight = _fresh_name(index, f"{weight_name}_bn")
            new_inits.append(numpy_helper.from_array(folded, new_weight))
        else:
            rank = self._weight_rank(index, conv)
            factor_name = _fresh_name(index, f"{bn.name or bn.output[0]}_factor")
            new_inits.append(numpy_helper.from_array(
                factor.astype(np.float32).reshape((-1,) + (1,) * (rank - 1)), factor_name))
            new_weight = _fresh_name(index, f"{weight_name}_bn")
            mul = helper.make_node("Mul", [weight_name, factor_name], [new_weight], name=f"{new_weight}_mul")
            before_conv.append(mul)
            index.producer[new_weight] = mul

        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        bias = (index.constant(bias_name) if index.is_initializer(bias_name) else None) if bias_name else np.zeros_like(mean)
        if bias is None:  # a computed bias: fold it with nodes as well
            factor_name = _fresh_name(index, f"{bn.name or bn.output[0]}_bias_factor")
            offset_name = _fresh_name(index, f"{bn.name or bn.output[0]}_bias_offset")
            new_inits += [numpy_helper.from_array(factor.astype(np.float32), factor_name),
                          numpy_helper.from_array((shift - mean * factor).astype(np.float32), offset_name)]
            scaled, new_bias = _fresh_name(index, f"{bias_name}_bn_scaled"), _fresh_name(index, f"{bias_name}_bn")
            nodes = [helper.make_node("Mul", [bias_name, factor_name], [scaled], name=f"{scaled}_mul"),
                     helper.make_node("Add", [scaled, offset_name], [new_bias], name=f"{new_bias}_add")]
            before_conv += nodes
            index.producer.update({scaled: nodes[0], new_bias: nodes[1]})
        else:
            new_bias = _fresh_name(index, f"{bias_name or conv.output[0]}_bn_bias")
            if bias_name and len(index.consumers.get(bias_name, [])) == 1:
                index.orphaned.add(bias_name)
            folded_bias = (bias.astype(np.float64) - mean) * factor + shift
            new_inits.append(numpy_helper.from_array(folded_bias.astype(np.float32), new_bias))

        graph.initializer.extend(new_inits)
        index.initializers.update({init.name: init for init in new_inits})
        data = conv.input[0]
        del conv.input[:]
        conv.input.extend([data, new_weight, new_bias])
        index.replace(bn, [])  # keyed before the conv takes over its output name: (op type, name) stays unique
        conv.output[0] = bn.output[0]
        index.producer[bn.output[0]] = conv
        index.replace(conv, [*before_conv, conv])
        index.orphaned.update(name for name in bn.input[1:]
                              if index.is_initializer(name) and len(index.consumers.get(name, [])) == 1)


class SumToAdd:
    """``Sum(a, b, ...)`` becomes ``Add(Add(a, b), ...)``: same broadcasting, and it fuses into a kernel."""

    name = "sum-to-add"

    def find(self, index: GraphIndex) -> list[tuple[Any]]:
        """Every standard Sum node with two or more inputs."""
        return [(node,) for node in index.graph.node
                if node.op_type == "Sum" and _is_standard(node) and len([n for n in node.input if n]) >= 2]

    def apply(self, index: GraphIndex, node) -> None:
        """Replace ``node`` by a chain of Add nodes writing its output name."""
        from onnx import helper

        inputs = [name for name in node.input if name]
        chain, left = [], inputs[0]
        for k, right in enumerate(inputs[1:], start=1):
            last = k == len(inputs) - 1
            out = node.output[0] if last else _fresh_name(index, f"{node.output[0]}_partial{k}")
            chain.append(helper.make_node("Add", [left, right], [out], name=f"{node.name or node.output[0]}_add{k}"))
            index.producer[out] = chain[-1]
            left = out
        index.replace(node, chain)


#: the rewrites, in the order they run
REWRITES = (FoldBatchNormIntoConv(), SumToAdd())


def rewrite_graph(model) -> dict[str, int]:
    """Run every rewrite of :data:`REWRITES` over ``model.graph`` (in place). Returns {rewrite name: count}.

    Only the main graph is rewritten (subgraphs of If / Loop are left as they are, and what they read from
    the main graph counts as read by their node: it is neither changed nor dropped). The model computes
    the same function afterwards, up to float rounding (folded weights are computed in float64).

    Raises:
        OnnxModelError: a BatchNormalization whose statistics do not match its Conv's channels.
    """
    counts, orphaned = {}, set()
    for rewrite in REWRITES:
        index = GraphIndex.of(model.graph)
        matches = rewrite.find(index)
        for match in matches:
            rewrite.apply(index, *match)
        index.commit()
        counts[rewrite.name] = len(matches)
        orphaned |= index.orphaned
    if orphaned:  # an unread initializer would still become a parameter of the artifact
        read = {name for node in model.graph.node for name in [*node.input, *outer_reads(node)]}
        kept = [init for init in model.graph.initializer if init.name not in orphaned or init.name in read]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return counts
