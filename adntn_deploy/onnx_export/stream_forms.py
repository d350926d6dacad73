"""The ONNX forms of a streamed layer, and what each costs (used by ``--weights auto`` / ``--stream auto``).

Each ``emit_*`` function appends to a :class:`NodeEmitter` the standard-op nodes that compute the layer's
output from its two factors, writing the consumer's original output name. Factors arrive as names of
(rows, rank) float32 values computed from the cores (run once at load, like a generator).

* low-rank (split layout, identity top): ``y = s (x R) L^T``; a Conv becomes a rank-filter Conv then a 1x1 Conv.
* Kronecker (operator layout, identity top): ``y = s sum_b A_b X B_b^T`` with ``X`` the input as an (I_L, I_R)
  grid: one MatMul by one half (all bond terms at once), one transpose of the intermediate, one MatMul by
  the other half; the half applied first is the one that makes the smaller intermediate. A Conv whose
  kernel modes are all in the right half becomes a Conv over the input viewed as ``N * I_L`` images of
  ``C / I_L`` channels, then a MatMul by the left half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adntn_deploy.ir.kron import KroneckerSplit
from adntn_deploy.ir.split import SplitGenerator
from adntn_deploy.onnx_export.lowering import NodeEmitter

#: A weight byte read per call costs about this many FLOPs of time on the CPUs we target (a 2-core x86
#: host does ~200 GFLOP/s of float32 GEMM and ~20 GB/s from DRAM; boards have a similar ratio).
FLOPS_PER_BYTE = 10


@dataclass(frozen=True)
class Consumer:
    """The node that used the generated weight: what the streamed form must reproduce.

    ``op``: "Gemm", "MatMul" (``x @ W^T``) or "Conv"; ``x`` and ``output`` its data input and output
    names; ``bias`` the bias value name or None; ``alpha`` Gemm's scale; ``conv_attrs`` the Conv's
    attributes; ``x_rank`` the input's rank when known; ``out_spatial`` the Conv output's spatial size
    when shape inference knows it.
    """

    op: str
    x: str
    output: str
    bias: str | None
    alpha: float
    conv_attrs: dict
    x_rank: int | None
    out_spatial: tuple[int, ...] | None


@dataclass(frozen=True)
class Cost:
    """Estimated work of one call: FLOPs (multiply-add = 2) and weight bytes read; ``units`` combines them."""

    flops: int
    weight_bytes: int

    @property
    def units(self) -> float:
        """FLOPs plus weight bytes weighted by :data:`FLOPS_PER_BYTE` (a comparable time estimate)."""
        return self.flops + FLOPS_PER_BYTE * self.weight_bytes


def dense_cost(weight_shape: tuple[int, ...], rows: int) -> Cost:
    """Cost of the dense layer for ``rows`` input vectors (batch x output positions for a Conv)."""
    elements = int(np.prod(weight_shape))
    return Cost(2 * rows * elements, 4 * elements)


def lowrank_cost(split: SplitGenerator, rows: int) -> Cost:
    """Cost of the factored form ``(x R) L^T`` (identity top), or of the fused tile kernel otherwise."""
    if split.activation != "identity":  # the fused kernel regenerates every weight element per call
        elements = int(np.prod(split.weight_shape))
        return Cost(2 * rows * elements + 2 * split.rank * elements, 4 * split.factor_elements)
    return Cost(2 * rows * split.rank * (split.left.rows + split.right.rows), 4 * split.factor_elements)


def kronecker_cost(kron: KroneckerSplit, rows: int, conv: bool = False) -> Cost:
    """Cost of the two-product Kronecker form for ``rows`` input vectors (a Conv applies the right half first)."""
    flops = kron.order_flops(rows, "right") if conv else kron.matmul_flops(rows)
    return Cost(flops, 4 * kron.factor_elements)


def _const(em: NodeEmitter, values, hint: str) -> str:
    return em.const(np.array(values, np.int64), hint)


def _lead_shape(em: NodeEmitter, consumer: Consumer, last: int) -> str | list[int]:
    """Target shape of the output: x's leading dims then ``last`` (constant when x is known to be 2-D)."""
    if consumer.op == "Gemm" or consumer.x_rank == 2:
        return [-1, last]
    shape = em.node("Shape", [consumer.x], "x_shape")
    lead = em.node("Slice", [shape, _const(em, [0], "start"), _const(em, [-1], "end")], "x_lead")
    return em.node("Concat", [lead, _const(em, [last], "last")], "y_shape", axis=0)


def _reshape(em: NodeEmitter, x: str, shape, hint: str) -> str:
    target = shape if isinstance(shape, str) else _const(em, shape, "shape")
    return em.node("Reshape", [x, target], hint)


def _finish(em: NodeEmitter, value: str, consumer: Consumer, bias: str | None) -> None:
    """Route ``value`` (plus the bias) to the consumer's output name."""
    from onnx import helper

    if bias:
        em.nodes.append(helper.make_node("Add", [value, bias], [consumer.output], name=em.fresh("bias")))
    else:
        em.nodes.append(helper.make_node("Identity", [value], [consumer.output], name=em.fresh("out")))


def emit_lowrank(em: NodeEmitter, split: SplitGenerator, left: str, right: str, consumer: Consumer,
                 bias: str | None) -> None:
    """``y = scale * (x R) L^T`` (identity top) for a Gemm / MatMul / Conv consumer."""
    scale = float(split.scale) * consumer.alpha
    left_scaled = em.node("Mul", [left, em.const(np.array(scale, np.float32), "scale")], "left_scaled")
    if consumer.op == "Conv":
        filters = em.node("Transpose", [right], "right_t", perm=[1, 0])
        filters = _reshape(em, filters, [split.rank] + list(split.weight_shape[1:]), "rank_filters")
        reduced = em.node("Conv", [consumer.x, filters], "rank_conv", **consumer.conv_attrs)
        mix_shape = [split.weight_shape[0], split.rank] + [1] * (len(split.weight_shape) - 2)
        mix = _reshape(em, left_scaled, mix_shape, "mix_filters")
        value = em.node("Conv", [reduced, mix] + ([bias] if bias else []), "mix_conv")
        bias = None
    else:
        reduced = em.node("MatMul", [consumer.x, right], "rank_mm")
        value = em.node("MatMul", [reduced, em.node("Transpose", [left_scaled], "left_t", perm=[1, 0])], "mix_mm")
    _finish(em, value, consumer, bias)


def _transpose(em: NodeEmitter, x: str, dims: list[int], perm: list[int], hint: str) -> str:
    """Transpose, or a no-op when the axes that move all have size 1 (their order in memory is unchanged)."""
    moving = [p for p in perm if dims[p] != 1]
    if moving == sorted(moving):  # the axes of size > 1 keep their order: the data does not move
        return x
    return em.node("Transpose", [x], hint, perm=perm)


def _scaled(em: NodeEmitter, value: str, scale: float) -> str:
    return em.node("Mul", [value, em.const(np.array(scale, np.float32), "scale")], "scaled")


def _half_matrix(em: NodeEmitter, factor: str, out: int, inp: int, rank: int, rows_first: str, hint: str) -> str:
    """A half's (out * in, rank) factor as the matrix a MatMul multiplies by: ``rows_first`` "in" gives
    (in, rank * out) (applied first, to the input grid), "rank" gives (rank * in, out) (applied second)."""
    cube = _reshape(em, factor, [out, inp, rank], hint + "3")
    if rows_first == "in":
        return _reshape(em, _transpose(em, cube, [out, inp, rank], [1, 2, 0], hint + "_t"), [inp, rank * out], hint)
    return _reshape(em, _transpose(em, cube, [out, inp, rank], [2, 1, 0], hint + "_t"), [rank * inp, out], hint)


def emit_kronecker(em: NodeEmitter, kron: KroneckerSplit, left: str, right: str, consumer: Consumer,
                   bias: str | None) -> None:
    """``y = scale * sum_b A_b X B_b^T`` for a Gemm / MatMul consumer, or its Conv analogue.

    Linear layers apply first the half that makes the smaller intermediate (:meth:`KroneckerSplit.best_order`);
    a Conv applies the right half first (its kernel modes are there).
    """
    r, ol, il, orr, ir_ = kron.rank, kron.out_left, kron.in_left, kron.out_right, kron.in_right
    scale = float(kron.scale) * consumer.alpha
    if consumer.op == "Conv":
        a_mat = _scaled(em, _half_matrix(em, left, ol, il, r, "rank", "a_mat"), scale)
        b3 = _reshape(em, right, [orr, ir_, r], "b3")
        _emit_kronecker_conv(em, kron, a_mat, b3, consumer, bias)
        return
    if kron.best_order() == "right":
        # [n, i_L, i_R] -> (N i_L, i_R) @ (i_R, b o_R) -> [n, i_L, b, o_R] -> [n, o_R, b, i_L] @ (b i_L, o_L)
        first = _half_matrix(em, right, orr, ir_, r, "in", "b_mat")
        second = _scaled(em, _half_matrix(em, left, ol, il, r, "rank", "a_mat"), scale)
        grid = _reshape(em, consumer.x, [-1, ir_], "x_grid")
        kept, out_first = il, orr
    else:
        # [n, i_L, i_R] -> [n, i_R, i_L] -> (N i_R, i_L) @ (i_L, b o_L) -> [n, i_R, b, o_L] -> [n, o_L, b, i_R]
        # @ (b i_R, o_R) -> [n, o_L, o_R]: the output comes out in order, the input is transposed instead
        first = _half_matrix(em, left, ol, il, r, "in", "a_mat")
        second = _scaled(em, _half_matrix(em, right, orr, ir_, r, "rank", "b_mat"), scale)
        grid = _reshape(em, consumer.x, [-1, il, ir_], "x3")
        grid = _reshape(em, _transpose(em, grid, [2, il, ir_], [0, 2, 1], "x_t"), [-1, il], "x_grid")
        kept, out_first = ir_, ol
    t = em.node("MatMul", [grid, first], "first_mm")  # (N kept, rank * out_first)
    t = _reshape(em, t, [-1, kept, r, out_first], "t4")
    t = _transpose(em, t, [2, kept, r, out_first], [0, 3, 2, 1], "t_t")  # [n, out_first, b, kept]
    t = _reshape(em, t, [-1, r * kept], "t2")
    y = em.node("MatMul", [t, second], "second_mm")  # (N out_first, out_second)
    if kron.best_order() == "right":  # [n, o_R, o_L] -> [n, o_L, o_R]
        y = _reshape(em, y, [-1, orr, ol], "y3")
        y = _transpose(em, y, [2, orr, ol], [0, 2, 1], "y_t")
    _finish(em, _reshape(em, y, _lead_shape(em, consumer, ol * orr), "y"), consumer, bias)


def kronecker_conv_supported(kron: KroneckerSplit) -> str | None:
    """None when a Conv weight's Kronecker form runs as Conv + MatMul, else why not."""
    cout, cin, *kernel = kron.weight_shape
    if cin % kron.in_left or kron.in_left > cin:
        return (f"its kernel modes are split between the two halves (left half spans {kron.in_left} of "
                f"{cin} x {'x'.join(map(str, kernel))} inputs), so the weight is not a channel-block Kronecker sum")
    return None


def _emit_kronecker_conv(em: NodeEmitter, kron: KroneckerSplit, a_mat: str, b3: str, consumer: Consumer,
                         bias: str | None) -> None:
    r, ol, il, orr = kron.rank, kron.out_left, kron.in_left, kron.out_right
    cout, cin, *kernel = kron.weight_shape
    dims = len(kernel)
    # the right half as r * O_R filters over C / I_L channels, run on the input viewed as N * I_L images
    filters = _transpose(em, b3, [orr, kron.in_right, r], [2, 0, 1], "b_t")
    filters = _reshape(em, filters, [r * orr, cin // il] + kernel, "b_filters")
    images_shape = em.node("Concat", [_const(em, [-1, cin // il], "lead"), _spatial_of(em, consumer.x, dims)],
                           "images_shape", axis=0)
    images = em.node("Reshape", [consumer.x, images_shape], "x_images")
    t = em.node("Conv", [images, filters], "right_conv", **consumer.conv_attrs)  # [n i_L, b o_R, *pos]
    # spatial output size: static when shape inference knew it (TVM then sees only constant shapes)
    pos = list(consumer.out_spatial) if consumer.out_spatial is not None else _spatial_of(em, t, dims)

    def shape(lead: list[int], tail: list[int] | None = None) -> str:
        if isinstance(pos, list):
            return _const(em, lead + pos + (tail or []), "shape")
        parts = [_const(em, lead, "lead"), pos] + ([_const(em, tail, "tail")] if tail else [])
        return em.node("Concat", parts, "shape", axis=0)

    t = em.node("Reshape", [t, shape([-1, il, r, orr])], "t6")
    t = em.node("Transpose", [t], "t_t", perm=[0, 3] + [4 + k for k in range(dims)] + [2, 1])  # [n, o_R, *pos, b, i_L]
    t = _reshape(em, t, [-1, r * il], "t2")
    y = em.node("MatMul", [t, a_mat], "left_mm")  # [n, o_R, *pos, o_L]
    y = em.node("Reshape", [y, shape([-1, orr], [ol])], "y5")
    y = em.node("Transpose", [y], "y_t", perm=[0, dims + 2, 1] + [2 + k for k in range(dims)])  # [n, o_L, o_R, *pos]
    y = em.node("Reshape", [y, shape([-1, cout])], "y")
    if bias:
        bias = _reshape(em, bias, [cout] + [1] * dims, "bias_b")
    _finish(em, y, consumer, bias)


def _spatial_of(em: NodeEmitter, value: str, count: int) -> str:
    """The last ``count`` dimensions of ``value``'s shape, as an int64 tensor."""
    shape = em.node("Shape", [value], "shape_of")
    return em.node("Slice", [shape, _const(em, [-count], "start"), _const(em, [np.iinfo(np.int64).max], "end")], "spatial")
