"""ONNX graph rewrites run on the compiler's private copy of a model before TVM imports it.

TVM's ONNX importer translates operator by operator, and Relax does not fold what ONNX Runtime's graph
optimiser folds. Three forms common in models from other tools cost our kernels time:

* a ``BatchNormalization`` after a ``Conv`` becomes four elementwise ops (a subtraction, a division by
  ``sqrt(var + eps)``, a multiplication, an addition) in every output element's epilogue; the division
  alone costs about as much as 8 vector FMAs. Folded into the convolution's weight and bias, it is a bias.
* a per-channel ``Mul`` / ``Add`` after a ``Conv`` (how Caffe2's exports write a batch norm's scale and
  shift) is one more operation per output element; folded into the weight and bias, it is free.
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

        Known: an initializer, a ``Constant`` node's tensor, a ``ConstantOfShape`` of a known shape
        (how some exporters, and onnx's own light test models, write filled tensors), or an ``Unsqueeze``
        of a known value (a per-channel vector shaped to broadcast).
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
        if node.op_type == "Unsqueeze":  # a per-channel vector made (C, 1, 1) for broadcasting
            value = self.constant(node.input[0])
            axes = node_attribute(node, "axes", None)  # an attribute before opset 13, an input since
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = self.constant(node.input[1])
            if value is None or axes is None:
                return None
            rank = value.ndim + len(axes)
            try:
                return np.expand_dims(value, tuple(sorted(int(a) % rank for a in axes)))
            except ValueError:  # repeated or out-of-range axes: a malformed node, left to the importer
                return None
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
        scale, shift, mean, var = (s.astype(np.float64) for s in stats)
        factor = scale / np.sqrt(var + float(node_attribute(bn, "epsilon", 1e-5)))
        _fold_affine_into_conv(index, conv, factor, shift - mean * factor, [bn], bn.name or bn.output[0], "_bn")
        for name in bn.input[1:]:
            _drop_if_unread(index, name, bn)


def _fold_affine_into_conv(index: GraphIndex, conv, factor: np.ndarray, offset: np.ndarray, folded: list[Any],
                           label: str, suffix: str) -> None:
    """Make ``conv`` compute ``conv(x) * factor + offset`` (per output channel, float64 vectors) in place of
    the nodes ``folded`` (the chain after it, in order), whose last output name the Conv takes over.
    New tensors are named after the ones they replace, plus ``suffix``.

    ``W' = W * factor`` per output channel and ``b' = b * factor + offset``. A weight that is an initializer
    read by nothing else is folded here; any other weight (a generated one) gets a ``Mul`` node, which the
    compiler lifts to load time with the other weight work; a computed bias likewise.
    """
    from onnx import helper, numpy_helper

    graph = index.graph
    new_inits, before_conv = [], []
    weight_name = conv.input[1]
    weight = index.constant(weight_name) if index.is_initializer(weight_name) else None
    # only a stored weight is folded here; a computed one (generated, or a ConstantOfShape) would
    # become a stored tensor, so it gets a Mul that runs where the weight is computed
    if weight is not None and len(index.consumers.get(weight_name, [])) == 1:
        index.orphaned.add(weight_name)
        folded_weight = (weight.astype(np.float64) * factor.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32)
        new_weight = _fresh_name(index, f"{weight_name}{suffix}")
        new_inits.append(numpy_helper.from_array(folded_weight, new_weight))
    else:
        rank = FoldBatchNormIntoConv._weight_rank(index, conv)
        factor_name = _fresh_name(index, f"{label}_factor")
        new_inits.append(numpy_helper.from_array(factor.astype(np.float32).reshape((-1,) + (1,) * (rank - 1)), factor_name))
        new_weight = _fresh_name(index, f"{weight_name}{suffix}")
        mul = helper.make_node("Mul", [weight_name, factor_name], [new_weight], name=f"{new_weight}_mul")
        before_conv.append(mul)
        index.producer[new_weight] = mul

    bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    bias = (index.constant(bias_name) if index.is_initializer(bias_name) else None) if bias_name else np.zeros_like(factor)
    if bias is None:  # a computed bias: fold it with nodes as well
        factor_name = _fresh_name(index, f"{label}_bias_factor")
        offset_name = _fresh_name(index, f"{label}_bias_offset")
        new_inits += [numpy_helper.from_array(factor.astype(np.float32), factor_name),
                      numpy_helper.from_array(offset.astype(np.float32), offset_name)]
        scaled, new_bias = _fresh_name(index, f"{bias_name}{suffix}_scaled"), _fresh_name(index, f"{bias_name}{suffix}")
        nodes = [helper.make_node("Mul", [bias_name, factor_name], [scaled], name=f"{scaled}_mul"),
                 helper.make_node("Add", [scaled, offset_name], [new_bias], name=f"{new_bias}_add")]
        before_conv += nodes
        index.producer.update({scaled: nodes[0], new_bias: nodes[1]})
    else:
        new_bias = _fresh_name(index, f"{bias_name or conv.output[0]}{suffix}_bias")
        if bias_name and len(index.consumers.get(bias_name, [])) == 1:
            index.orphaned.add(bias_name)
        new_inits.append(numpy_helper.from_array((bias.astype(np.float64) * factor + offset).astype(np.float32), new_bias))

    graph.initializer.extend(new_inits)
    index.initializers.update({init.name: init for init in new_inits})
    data = conv.input[0]
    del conv.input[:]
    conv.input.extend([data, new_weight, new_bias])
    for node in folded:  # keyed before the conv takes over the last output name: (op type, name) stays unique
        index.replace(node, [])
    conv.output[0] = folded[-1].output[0]
    index.producer[conv.output[0]] = conv
    index.replace(conv, [*before_conv, conv])


class FoldScaleShiftIntoConv:
    """``Conv(x, W[, b])`` followed by ``Mul`` / ``Add`` / ``Sub`` by constants of one value per output
    channel (or one value in all) becomes ``Conv(x, W', b')``.

    Some exporters write a batch norm's affine part as such nodes: onnx's Inception v2 has ``Conv ->
    BatchNormalization -> Mul -> Add -> Relu`` 69 times (Caffe2's SpatialBN with a separate scale and
    shift). Left in place, each is one more operation per output element in the kernel's write-back. The
    chain is composed into one ``factor, offset`` pair and folded as a batch norm is
    (:class:`FoldBatchNormIntoConv`, which runs first). Applies to each node of the chain whose input is
    read by it alone; a ``Sub`` only with the constant second. The constants must be float32 and broadcast
    along the output channels only (shape ``(O, 1, 1)``, ``(1, O, 1, 1)``, ``(1,)``...).
    """

    name = "fold-scale-shift-into-conv"
    OPS = ("Mul", "Add", "Sub")

    def find(self, index: GraphIndex) -> list[tuple[Any, list[Any], np.ndarray, np.ndarray]]:
        """Every (Conv, the nodes folded into it, factor, offset) this rewrite folds."""
        matches = []
        for conv in index.graph.node:
            if conv.op_type != "Conv" or not _is_standard(conv):
                continue
            rank, channels = self._output_form(index, conv)
            if rank is None:
                continue
            factor, offset, chain = np.ones(channels), np.zeros(channels), []
            current = conv.output[0]
            while (node := index.only_consumer(current)) is not None:
                step = self._step(index, node, current, rank, channels)
                if step is None:
                    break
                scale, shift = step
                factor, offset = factor * scale, offset * scale + shift
                chain.append(node)
                current = node.output[0]
            if chain:
                matches.append((conv, chain, factor, offset))
        return matches

    @staticmethod
    def _output_form(index: GraphIndex, conv) -> tuple[int | None, int]:
        """(rank of the Conv's output, its channels) when both are known, else (None, 0): the rank from the
        weight or ``kernel_shape``, the channels from a float32 weight or bias known without running the
        model (a generated weight is computed, but its bias, or the one a folded batch norm left, is known)."""
        rank = FoldBatchNormIntoConv._weight_rank(index, conv)
        lengths = set()
        for name in conv.input[1:3]:
            stored = index.initializers.get(name) if name else None
            if stored is not None:  # its dims, without converting a large weight to an array
                if stored.data_type == 1 and stored.dims:  # 1: FLOAT
                    lengths.add(int(stored.dims[0]))
                continue
            value = index.constant(name) if name else None
            if value is not None and value.dtype == np.float32 and value.ndim >= 1:
                lengths.add(int(value.shape[0]))
        if rank is None or rank < 3 or len(lengths) != 1:
            return None, 0
        return rank, lengths.pop()

    def _step(self, index: GraphIndex, node, current: str, rank: int, channels: int) -> tuple[Any, Any] | None:
        """(scale, shift) per channel of ``node`` applied to ``current``, or None when it does not fold."""
        if node.op_type not in self.OPS or not _is_standard(node) or len(node.input) != 2 or len(node.output) != 1:
            return None
        if list(node.input).count(current) != 1 or (node.op_type == "Sub" and node.input[0] != current):
            return None
        other = node.input[1] if node.input[0] == current else node.input[0]
        value = index.constant(other)
        if value is None or value.dtype != np.float32 or value.ndim > rank:
            return None
        shape = (1,) * (rank - value.ndim) + value.shape
        if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, channels):
            return None  # it varies along the pixels, or broadcasts the output to more dimensions
        per_channel = np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))
        if node.op_type == "Mul":
            return per_channel, 0.0
        return 1.0, per_channel if node.op_type == "Add" else -per_channel

    def apply(self, index: GraphIndex, conv, chain: list[Any], factor: np.ndarray, offset: np.ndarray) -> None:
        """Fold ``chain`` into ``conv`` (in place)."""
        _fold_affine_into_conv(index, conv, factor, offset, chain, chain[0].name or chain[0].output[0], "_affine")
        for node in chain:
            for name in node.input:
                _drop_if_unread(index, name, node)


#: the nodes that compute a constant and that a fold may drop once it no longer reads their output
CONSTANT_MAKERS = ("Constant", "ConstantOfShape", "Unsqueeze")


def _drop_if_unread(index: GraphIndex, name: str, reader) -> None:
    """Forget ``name`` when ``reader`` (a node being removed) was its only reader: an initializer is
    orphaned; a constant made by nodes (:data:`CONSTANT_MAKERS`) loses them, and so on up the chain."""
    readers = index.consumers.get(name, [])
    if not name or name in index.outputs or len(readers) != 1 or readers[0] is not reader:
        return
    if index.is_initializer(name):
        index.orphaned.add(name)
        return
    maker = index.producer.get(name)
    if maker is None or maker.op_type not in CONSTANT_MAKERS or not _is_standard(maker) or len(maker.output) != 1:
        return
    index.replace(maker, [])
    for source in maker.input:
        _drop_if_unread(index, source, maker)


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
REWRITES = (FoldBatchNormIntoConv(), FoldScaleShiftIntoConv(), SumToAdd())


def rewrite_graph(model) -> dict[str, int]:
    """Run every rewrite of :data:`REWRITES` over ``model.graph`` (in place). Returns {rewrite name: count}.

    Only the main graph is rewritten (subgraphs of If / Loop are left as they are, and what they read from
    the main graph counts as read by their node: it is neither changed nor dropped). The model computes
    the same function afterwards, up to float rounding (folded weights are computed in float64).

    Raises:
        OnnxModelError: a BatchNormalization whose statistics do not match its Conv's channels.
    """
    counts, orphaned = {}, set()
    was_read = {name for node in model.graph.node for name in [*node.input, *outer_reads(node)]}
    for rewrite in REWRITES:
        index = GraphIndex.of(model.graph)
        matches = rewrite.find(index)
        for match in matches:
            rewrite.apply(index, *match)
        index.commit()
        counts[rewrite.name] = len(matches)
        orphaned |= index.orphaned
    # an unread initializer would still become a parameter of the artifact: drop those the rewrites
    # stopped reading (a shape two dropped Unsqueeze nodes shared is no one's orphan)
    read = {name for node in model.graph.node for name in [*node.input, *outer_reads(node)]}
    orphaned |= {init.name for init in model.graph.initializer if init.name in was_read and init.name not in read}
    if orphaned:
        kept = [init for init in model.graph.initializer if init.name not in orphaned or init.name in read]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return counts
