"""Lower a generator IR to standard ONNX ops (the body of an ai.adntn function).

Every two-operand contraction becomes Transpose -> Reshape -> MatMul -> Reshape -> Transpose (the batched
matrix-product form every runtime and the TVM importer handle well; never a multi-operand Einsum, which
ONNX Runtime contracts slowly). Identity transposes and reshapes are skipped. Activations map to ONNX ops
(GELU as its exact erf form, valid from opset 13 on); this module registers those lowerings in
:mod:`adntn_deploy.ir.activations`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from adntn_deploy.ir.activations import LEAKY_RELU_SLOPE, get_lowering, register_lowerings
from adntn_deploy.ir.program import GeneratorIR, Step


class NodeEmitter:
    """Collects nodes with unique value names inside one function body."""

    def __init__(self, prefix: str) -> None:
        from onnx import helper

        self.helper = helper
        self.prefix = prefix
        self.nodes: list = []
        self.counter = 0

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{self.prefix}{hint}_{self.counter}"

    def node(self, op: str, inputs: Sequence[str], hint: str, **attrs) -> str:
        out = self.fresh(hint)
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def cast(self, x: str, to: int) -> str:
        return self.node("Cast", [x], "cast", to=to)

    def const(self, value: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        out = self.fresh(hint)
        if value.dtype == np.int64 and value.ndim == 1:  # shapes: varints, a third of a raw int64 tensor's bytes
            self.nodes.append(self.helper.make_node("Constant", [], [out], name=out, value_ints=[int(v) for v in value]))
        else:
            self.nodes.append(self.helper.make_node("Constant", [], [out], name=out, value=numpy_helper.from_array(value)))
        return out

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return x if list(perm) == sorted(perm) else self.node("Transpose", [x], "tr", perm=list(perm))

    def reshape(self, x: str, shape: Sequence[int], current: Sequence[int]) -> str:
        if list(shape) == list(current):
            return x
        return self.node("Reshape", [x, self.const(np.array(shape, dtype=np.int64), "shape")], "rs")


def _contract(em: NodeEmitter, step: Step, lhs: str, rhs: str, shapes: dict[str, tuple[int, ...]]) -> str:
    a, b, out = step.subscripts
    size = dict(zip(a, shapes[step.lhs]))
    size.update(zip(b, shapes[step.rhs]))
    operands = []
    for name, subs, other in ((lhs, a, b), (rhs, b, a)):
        summed_alone = [k for k, s in enumerate(subs) if s not in other and s not in out]
        if summed_alone:  # an index only this operand has and the output drops: sum it first
            axes = em.const(np.array(summed_alone, dtype=np.int64), "axes")
            name = em.node("ReduceSum", [name, axes], "sum", keepdims=0)
            subs = "".join(s for k, s in enumerate(subs) if k not in summed_alone)
        operands.append((name, subs))
    (lhs, a), (rhs, b) = operands
    batch = [s for s in a if s in b and s in out]
    contracted = [s for s in a if s in b and s not in out]
    left = [s for s in a if s not in b]
    right = [s for s in b if s not in a]
    dims = lambda idx: [size[s] for s in idx]  # noqa: E731
    B, L, K, R = (math.prod(dims(x)) for x in (batch, left, contracted, right))
    lhs_m = em.reshape(em.transpose(lhs, [a.index(s) for s in batch + left + contracted]), [B, L, K], dims(batch + left + contracted))
    rhs_m = em.reshape(em.transpose(rhs, [b.index(s) for s in batch + contracted + right]), [B, K, R], dims(batch + contracted + right))
    product = em.node("MatMul", [lhs_m, rhs_m], "mm")
    order = batch + left + right
    product = em.reshape(product, dims(order), [B, L, R])
    return em.transpose(product, [order.index(s) for s in out])


def _onnx_gelu(em: NodeEmitter, x: str, dtype: type) -> str:
    from onnx import TensorProto

    scaled = em.node("Mul", [x, em.const(np.array(1 / math.sqrt(2), dtype), "c")], "gelu_s")
    if dtype == np.float64:  # ONNX Runtime has no double Erf kernel: erf in float32 (error ~1e-7)
        erf = em.cast(em.node("Erf", [em.cast(scaled, TensorProto.FLOAT)], "gelu_erf"), TensorProto.DOUBLE)
    else:
        erf = em.node("Erf", [scaled], "gelu_erf")
    one = em.node("Add", [erf, em.const(np.array(1.0, dtype), "c")], "gelu_1")
    half = em.node("Mul", [x, em.const(np.array(0.5, dtype), "c")], "gelu_h")
    return em.node("Mul", [half, one], "gelu")


def _onnx_op(op: str, hint: str):
    """A lowering that emits the one standard ONNX op ``op`` (its value named after ``hint``)."""
    return lambda em, x, dtype: em.node(op, [x], hint)


# the ONNX lowerings of the activations in adntn_deploy.ir.activations (see BACKENDS["onnx"]): standard
# ops only, GELU as its exact erf form
register_lowerings("onnx", {
    "identity": lambda em, x, dtype: x,
    "relu": _onnx_op("Relu", "relu"),
    "leaky_relu": lambda em, x, dtype: em.node("LeakyRelu", [x], "lrelu", alpha=LEAKY_RELU_SLOPE),
    "tanh": _onnx_op("Tanh", "tanh"),
    "gelu": _onnx_gelu,
    "sigmoid": _onnx_op("Sigmoid", "sigmoid"),
    "sin": _onnx_op("Sin", "sin"),
})


def _activate(em: NodeEmitter, x: str, name: str, dtype: type) -> str:
    return get_lowering("onnx", name)(em, x, dtype)


def lower_program(ir: GeneratorIR, core_inputs: Sequence[str], output: str, prefix: str = "") -> list:
    """ONNX NodeProtos computing ``output`` (the weight, float32) from float32 ``core_inputs`` (IR core order).

    Every step but the last runs in float64 (cores are cast up); the last step, which writes the big
    weight, runs in float32 on its two small operands. This matches ``generate_torch(precise=True)`` to a
    few ulps and keeps the load-time memory of the weight at float32.

    The output scale stays a constant of the body: ONNX Runtime 1.32 and onnx's inliner mis-evaluate
    attribute references inside function bodies (a Constant reading ``value_float`` from the calling node
    fails shape inference; a ConstantOfShape reading a tensor attribute yields zeros), so a body cannot take
    it from its node.
    """
    from onnx import TensorProto

    em = NodeEmitter(prefix)
    env = {name: em.cast(value, TensorProto.DOUBLE) for name, value in zip(ir.core_names, core_inputs)}
    shapes = {name: ir.shape_of(name) for name in ir.core_names}
    last = len(ir.steps) - 1
    for i, step in enumerate(ir.steps):
        shapes[step.output] = ir.shape_of(step.output)
        lhs, rhs, dtype = env[step.lhs], env[step.rhs], np.float64
        if i == last:
            lhs, rhs, dtype = em.cast(lhs, TensorProto.FLOAT), em.cast(rhs, TensorProto.FLOAT), np.float32
        value = _contract(em, step, lhs, rhs, shapes)
        env[step.output] = _activate(em, value, step.activation, dtype)
    result = em.transpose(env[ir.result], ir.output_permutation)
    permuted = [ir.shape_of(ir.result)[p] for p in ir.output_permutation]
    result = em.reshape(result, ir.weight_shape, permuted)
    scale = em.const(np.array(ir.output_scale, dtype=np.float32), "scale")
    em.nodes.append(em.helper.make_node("Mul", [result, scale], [output]))
    return em.nodes


def body_signature(nodes) -> list[tuple]:
    """What a list of nodes computes, node by node: op, domain, inputs, outputs and attributes (not names).

    A Constant's value compares by dtype, shape and contents, so a shape written as ``value_ints`` (files
    written now) and as an int64 tensor (older files) read the same.
    """
    return [
        (n.op_type, n.domain, tuple(n.input), tuple(n.output),
         _constant_value(n) if n.op_type == "Constant" and n.domain == "" else
         tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in n.attribute)))
        for n in nodes
    ]


def _constant_value(node) -> tuple:
    """A Constant node's value as (dtype, shape, bytes); its raw attributes when it is neither form."""
    from onnx import numpy_helper

    attrs = {a.name: a for a in node.attribute}
    if set(attrs) == {"value_ints"} and not attrs["value_ints"].ref_attr_name:
        value = np.array(list(attrs["value_ints"].ints), dtype=np.int64)
    elif set(attrs) == {"value"} and not attrs["value"].ref_attr_name:
        value = numpy_helper.to_array(attrs["value"].t)
    else:
        return tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute))
    return (value.dtype.str, value.shape, value.tobytes())
