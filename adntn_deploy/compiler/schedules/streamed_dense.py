"""The fused streamed-dense kernel for TVM: ``y = scale * x sigma(L R^T)^T + b`` without the dense weight.

:mod:`adntn_deploy.onnx_export.streaming` turns a generated Gemm / MatMul whose top activation is
non-linear into an ``ai.adntn::StreamedDense`` node. :mod:`adntn_deploy.compiler.frontend` imports that
node into Relax as one TIR kernel made by :func:`streamed_dense_te`, with three blocks:

    weight_tile[i, o] = sum_k R[i, k] * Lt[k, o]                 (a tile of W^T, rank-k products)
    weight_act[i, o]  = sigma(weight_tile[i, o])                  (once per element, not per batch row)
    streamed[n, o]   += x[n, i] * weight_act[i, o]                (the matrix product)

The schedule (:func:`schedule`) splits the output and the reduction axes into tiles and computes
``weight_tile`` and ``weight_act`` inside the tile loops, so only a ``tile_in x tile_out`` scratch block exists at any time
(16 KiB at the default 64x64) and the dense weight is never allocated. Tile sizes are MetaSchedule
decisions: the block carries the annotation ``schedule_rule = adntn_streamed_dense``, for which this
project registers a custom rule (:mod:`adntn_deploy.compiler.schedules`), so ``adntn-deploy tune`` searches them like any other task and
``compile`` replays the best trace from the database. Untuned kernels get :data:`DEFAULT_TILE`.

Activations use TVM's rational approximations where libm would be called per element (tanh, sigmoid via
tanh, erf for gelu): accurate to a few float32 ulps and vectorised. This module registers them as the
``tir`` lowerings in :mod:`adntn_deploy.ir.activations`.
"""

from __future__ import annotations

import math
from typing import Any

from adntn_deploy.compiler.errors import StreamCompileError
from adntn_deploy.compiler.schedules.common import divisor_at_most
from adntn_deploy.errors import GeneratorError
from adntn_deploy.ir.activations import LEAKY_RELU_SLOPE, get_lowering, register_lowerings

RULE_NAME = "adntn_streamed_dense"
KERNEL_ATTR = "adntn_streamed"
#: (output tile, input tile) of an untuned kernel: a 16 KiB float32 scratch tile
DEFAULT_TILE = (64, 64)
_OPAQUE = 8  # relax OpPatternKind.kOpaque: never fuse the kernel with its neighbours


def _tanh(x, dtype: str):
    from tvm import tirx

    # Eigen's / TVM's fast_tanh rational approximation (max error ~1e-7), inlined so it vectorises
    c = lambda v: tirx.const(v, dtype)  # noqa: E731
    x = tirx.max(c(-9.0), tirx.min(c(9.0), x))
    x2 = x * x
    p = x2 * c(-2.76076847742355e-16) + c(2.00018790482477e-13)
    for coef in (-8.60467152213735e-11, 5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03):
        p = x2 * p + c(coef)
    q = x2 * c(1.19825839466702e-06) + c(1.18534705686654e-04)
    for coef in (2.26843463243900e-03, 4.89352518554385e-03):
        q = x2 * q + c(coef)
    return x * p / q


def _tir_relu(x, dtype: str):
    from tvm import tirx

    return tirx.max(x, tirx.const(0.0, dtype))


def _tir_leaky_relu(x, dtype: str):
    from tvm import tirx

    zero, slope = tirx.const(0.0, dtype), tirx.const(LEAKY_RELU_SLOPE, dtype)
    return tirx.Select(x > zero, x, x * slope)


def _tir_sigmoid(x, dtype: str):
    from tvm import tirx

    half = tirx.const(0.5, dtype)
    return half * _tanh(x * half, dtype) + half  # sigmoid(x) = (1 + tanh(x / 2)) / 2, on the fast tanh


def _tir_gelu(x, dtype: str):
    from tvm import te, tirx

    c = lambda v: tirx.const(v, dtype)  # noqa: E731
    return c(0.5) * x * (c(1.0) + te.erf(x * c(1.0 / math.sqrt(2.0))))


def _tir_sin(x, dtype: str):
    from tvm import te

    return te.sin(x)


# the TIR lowerings of the activations in adntn_deploy.ir.activations (see BACKENDS["tir"])
register_lowerings("tir", {
    "identity": lambda x, dtype: x,
    "relu": _tir_relu,
    "leaky_relu": _tir_leaky_relu,
    "tanh": _tanh,
    "gelu": _tir_gelu,
    "sigmoid": _tir_sigmoid,
    "sin": _tir_sin,
})


def activation_expr(name: str, x, dtype: str = "float32"):
    """The TIR expression of activation ``name`` applied to ``x`` (a scalar expression of ``dtype``).

    The lowering comes from the registry in :mod:`adntn_deploy.ir.activations` (registered above).

    Raises:
        StreamCompileError: an activation this kernel does not implement (no ``tir`` lowering).
    """
    try:
        lowering = get_lowering("tir", name)
    except GeneratorError as err:
        raise StreamCompileError(
            f"the streamed kernel has no {name!r} activation; compile with --weights load ({err})"
        ) from None
    return lowering(x, dtype)


def streamed_dense_te(x, left_t, right, bias, activation: str, scale: float):
    """TE compute of the fused layer: x (n, in), left_t (rank, out), right (in, rank), bias (out,)."""
    from tvm import te, tirx

    n, in_dim = x.shape
    rank, out_dim = left_t.shape
    k = te.reduce_axis((0, rank), "k")
    tile = te.compute(
        (in_dim, out_dim), lambda i, o: te.sum(right[i, k] * left_t[k, o], axis=k), name="weight_tile",
        attrs={"schedule_rule": "None"},  # scheduled together with its consumer by the custom rule
    )
    # the activation gets its own block, computed once per tile element (not once per batch row)
    active = te.compute((in_dim, out_dim), lambda i, o: activation_expr(activation, tile[i, o], x.dtype), name="weight_act",
                        attrs={"schedule_rule": "None"})
    r = te.reduce_axis((0, in_dim), "r")
    product = te.compute(
        (n, out_dim), lambda b, o: te.sum(x[b, r] * active[r, o], axis=r), name="streamed",
        attrs={"schedule_rule": RULE_NAME},
    )
    return te.compute((n, out_dim), lambda b, o: product[b, o] * tirx.const(scale, x.dtype) + bias[o], name="streamed_bias",
                      attrs={"schedule_rule": "None"})


def schedule(sch, block, tiles: tuple[int, int] | None = None):
    """Tile ``block`` (the ``streamed`` product) and compute its weight tile inside the tiles.

    ``tiles`` = (output tile, input tile) in elements; None samples both (MetaSchedule decisions, perfect
    divisors up to 128 and 256). Returns ``sch``.
    """
    (active,) = sch.get_producers(block)
    (producer,) = sch.get_producers(active)
    batch, out_loop, in_loop = sch.get_loops(block)[-3:]
    if tiles is None:
        out_factors = sch.sample_perfect_tile(out_loop, n=2, max_innermost_factor=128)
        in_factors = sch.sample_perfect_tile(in_loop, n=2, max_innermost_factor=256)
    else:
        extent_out = int(sch.get(out_loop).extent)
        extent_in = int(sch.get(in_loop).extent)
        out_factors = [None, divisor_at_most(extent_out, tiles[0])]
        in_factors = [None, divisor_at_most(extent_in, tiles[1])]
    out_outer, out_inner = sch.split(out_loop, out_factors)
    in_outer, in_inner = sch.split(in_loop, in_factors)
    sch.reorder(out_outer, in_outer, batch, in_inner, out_inner)
    # a fixed loop count (unit loops kept) keeps traces replayable when the search changes tile sizes
    sch.compute_at(active, in_outer, preserve_unit_loops=True)
    sch.compute_at(producer, in_outer, preserve_unit_loops=True)
    tile_in, tile_out, tile_rank = sch.get_loops(producer)[-3:]
    sch.reorder(tile_in, tile_rank, tile_out)
    sch.vectorize(sch.get_loops(active)[-1])
    sch.parallel(out_outer)
    sch.vectorize(tile_out)
    sch.vectorize(out_inner)
    sch.decompose_reduction(producer, tile_rank)
    sch.decompose_reduction(block, in_outer)
    (epilogue,) = sch.get_consumers(block)
    epi_batch, epi_out = sch.get_loops(epilogue)[-2:]
    sch.vectorize(sch.split(epi_out, [None, divisor_at_most(int(sch.get(epi_out).extent), 16)])[1])
    return sch


def mark_kernel(func):
    """``func`` (the streamed PrimFunc) marked opaque (never fused), tagged, and its root block left to our rule.

    MetaSchedule's ParallelizeVectorizeUnroll would otherwise annotate the root block and its postprocessor
    would then reject the loops our rule already parallelised and vectorised (no valid candidate at all).
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")
    return sch.mod["main"].with_attr("op_pattern", _OPAQUE).with_attr(KERNEL_ATTR, 1)


def streamed_kernels(mod) -> list[Any]:
    """GlobalVars of the fused streamed kernels in ``mod``."""
    return [gv for gv, f in mod.functions_items() if type(f).__name__ == "PrimFunc" and f.attrs is not None
            and KERNEL_ATTR in f.attrs]


def schedule_default(sch, block, target):
    """:func:`schedule` with :data:`DEFAULT_TILE`. Without it the kernel would compute the whole weight
    tile buffer -- the dense weight -- before the product.

    Raises:
        StreamCompileError: a non-CPU target (only the CPU schedule exists).
    """
    if target.kind.name != "llvm":
        raise StreamCompileError(
            f"the fused streamed kernel (non-linear top activation) has a CPU schedule only; for {target.kind.name} "
            "compile with --weights load, or use generators with an identity top activation (they stream as two matmuls)"
        )
    return schedule(sch, block, DEFAULT_TILE)
