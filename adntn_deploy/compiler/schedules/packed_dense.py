"""Packed dense kernels for CPU targets: ``y = x W`` with W pre-packed into vector-width panels at load.

Untuned TVM matmuls on CPU are naive loops, and MetaSchedule's generic search needs hundreds of trials per
shape to approach a BLAS. A dense layer whose weight is known before the first call (a model parameter,
a generated weight, a streamed factor) does not need a search: the weight can be re-laid out once, the
way BLAS libraries pack their B operand, and then a fixed register-blocked kernel runs near peak.

Rewrite (:func:`rewrite`, on the imported Relax module, before weight-only work is lifted):

    y = matmul(x, w)            x: (M, K) activations; w: (K, N), computed from parameters only
 -> wp = layout_transform(w)    wp[p, k, j] = w[k, p * bn + j]: N cut into panels of bn = 2 vectors
    y = call_tir(packed_dense, x, wp)

A ``w`` that transposes a stored (N, K) tensor (``Gemm(transB=1)``) is packed from that tensor directly
(:func:`_untransposed`), with no transposed copy at load. ``wp`` depends on parameters only, so
LiftTransformParams moves the packing into
``main_transform_params`` (``--weights load`` / ``stream``: once, on the device, at load) and FoldConstant
folds it into the library (``--weights fold``). The kernel reads each panel contiguously.

Kernel (:func:`schedule`): for each block of ``rows x panels`` -- the parallel loop -- keep the
accumulators in vector registers over the whole reduction (each row broadcast against 2 vectors of each
panel per k), then apply the fused epilogue (bias, activation) while writing them back. The block shape
is a MetaSchedule decision of the rule ``adntn_packed_dense`` (``adntn-deploy tune`` searches it,
``compile`` replays the database); untuned kernels get :func:`~.common.default_blocks`.

Only static 2-D activations in float32 are rewritten; other matmuls (dynamic batch, N-d inputs, widths
that no panel divides) keep the generic path.
"""

from __future__ import annotations

from typing import Any, Callable

from adntn_deploy.compiler.schedules.common import (
    activation_by_weight, add_kernel, default_blocks, divisor_at_most, fuse_epilogue, int64_placeholder, panel_width,
    static_shape, tile_factors, vectorize_register_tile,
)

RULE_NAME = "adntn_packed_dense"
BLOCK_NAME = "packed_dense"
OP_NAME = "relax.matmul"
#: the most bytes of weight one reduction chunk of a register block's panels holds (an L1 data cache's
#: worth, less room for the activations' rows), and of the row buffer that holds the accumulators
#: of every row between chunks
CHUNK_WEIGHT_BYTES = 32 * 1024
ROW_BUFFER_BYTES = 32 * 1024
#: the fewest panel blocks (parallel tasks) a K-blocked kernel must have: its rows no longer run in parallel
MIN_PARALLEL_PANEL_BLOCKS = 8
#: block annotation stamping which version of :func:`schedule` made a trace (2: K-blocking; traces of
#: version 1 carry no stamp). A tuning record without today's stamp replays an older schedule
#: (:mod:`adntn_deploy.compiler.refresh`).
RULE_VERSION_KEY = "adntn_rule_version"
RULE_VERSION = 2


def packed_dense_te(x, wp, out_dim: int):
    """TE compute of ``x (M, K) @ unpack(wp)[:, :out_dim]``, ``wp`` of shape (ceil(N / bn), K, bn).

    The block carries our schedule rule.
    """
    from tvm import te, tirx

    rows, depth = x.shape
    width = wp.shape[2]
    out_dim = tirx.IntImm("int64", int(out_dim))  # relax shapes are int64; FuseTIR matches buffers by type
    k = te.reduce_axis((0, depth), "k")
    return te.compute(
        (rows, out_dim),
        lambda m, n: te.sum(x[m, k] * wp[n // width, k, n % width], axis=k),
        name=BLOCK_NAME,
        attrs={"schedule_rule": RULE_NAME},
    )


def rewrite(builder, call, target, weight_only: Callable[[Any], bool]) -> tuple[Any, str]:
    """The packed form of a Relax ``matmul(x, w)`` call, emitted into ``builder``: (new call, "") or
    (None, why it stays generic). ``weight_only(expr)`` says whether an expression depends on parameters only."""
    from tvm import relax, te

    x_shape, w_shape, why = activation_by_weight(call, 2, weight_only)
    if x_shape is None:
        return None, why
    x, w = call.args
    depth, out_dim = w_shape
    width = panel_width(target, out_dim)
    if width is None or x_shape[1] != depth:
        return None, f"{out_dim} columns fit no vector panel"
    # a transposed weight is packed from the (N, K) tensor it transposes: no weight-sized transpose at load
    source = _untransposed(builder, w)
    stored, panel_of = (w, lambda k, n: (n // width, k, n % width)) if source is None else \
        (source, lambda n, k: (n // width, k, n % width))
    packed = builder.emit(relax.op.layout_transform(stored, panel_of, pad_value=0.0))
    panels = -(-out_dim // width)
    x_ph = int64_placeholder(x_shape, "x")
    wp_ph = int64_placeholder((panels, depth, width), "wp")
    func = te.create_prim_func([x_ph, wp_ph, packed_dense_te(x_ph, wp_ph, out_dim)])
    gvar = add_kernel(builder, func, "adntn_packed_dense")
    return relax.call_tir(gvar, [x, packed], relax.TensorType((x_shape[0], out_dim), "float32")), ""


def _untransposed(builder, w):
    """The (N, K) tensor that ``w`` (K, N) transposes when ``w`` is bound to ``permute_dims(source, [1, 0])``
    in ``builder`` (ONNX ``Gemm(transB=1)`` and torch's ``Linear`` weights import so), else None.

    Packing ``source`` directly saves a transposed copy of the weight at load: with it, loading a stored
    dense 4096 x 4096 layer held the weight three times at its peak (stored, transposed, packed).
    """
    from tvm import relax

    value = builder.lookup_binding(w) if isinstance(w, relax.Var) else None
    if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.permute_dims"):
        return None
    axes = value.attrs.axes
    if axes is not None and [int(a) for a in axes] != [1, 0]:
        return None
    source = value.args[0]
    return source if static_shape(source, 2) is not None else None


def _panel_width_of(sch, block) -> int:
    for region in sch.get(block).reads:
        if len(region.source.shape) == 3:
            return int(region.source.shape[2])
    raise ValueError("not a packed-dense block: it reads no packed (3-D) weight")


def reduce_chunk(rows: int, depth: int, row_block: int, panel_block: int, panels: int, width: int) -> int | None:
    """Reduction steps per chunk of a K-blocked kernel, or None to keep one reduction over ``depth``.

    With several row blocks, each re-reads its panels' whole K slice (the weight streams through L2 once
    per row block). K-blocked, a chunk of the panels (at most :data:`CHUNK_WEIGHT_BYTES`) stays in L1
    while every row block uses it, and the accumulators of all rows live in a row buffer between chunks.
    Taken when there are several row blocks, at least two chunks, a row buffer within
    :data:`ROW_BUFFER_BYTES` and at least :data:`MIN_PARALLEL_PANEL_BLOCKS` panel blocks to run in parallel
    (the rows then run serially in each task). Measured on AVX-512 (2 cores, weights flushed, 4 rows x 2
    panels): 32 x 2048 x 2048 1.14 -> 1.03 ms (chunks of 64 or 128; 256 gained nothing), 32 x 1024 x 2048
    0.57 -> 0.52 ms, 8 x 2048 x 2048 0.48 -> 0.45 ms, 128 x 2048 x 2048 3.88 -> 3.82 ms.
    """
    panel_bytes = panel_block * width * 4
    chunk = max(1, CHUNK_WEIGHT_BYTES // panel_bytes)
    if (rows <= row_block or depth < 2 * chunk or rows * panel_bytes > ROW_BUFFER_BYTES
            or panels // panel_block < MIN_PARALLEL_PANEL_BLOCKS):
        return None
    return divisor_at_most(depth, chunk)


def schedule(sch, block, row_block: int | None = None, panel_block: int | None = None, decided: bool = False):
    """Register-block the ``packed_dense`` ``block`` and write its fused epilogue from the accumulators.

    A register block is ``row_block`` rows x ``panel_block`` panels: that many independent accumulator
    chains per k, which hides the FMA latency (one row and one panel would leave 2 chains). None samples
    each (MetaSchedule decisions: divisors of the rows up to 16, of the panels up to 8). With ``decided``,
    the given blocks are recorded as the decisions of the sampling instructions (what a tuning record
    stores, see :mod:`adntn_deploy.compiler.refresh`) instead of as fixed splits. A long reduction over
    several row blocks is K-blocked (:func:`reduce_chunk`). Returns ``sch``.
    """
    width = _panel_width_of(sch, block)
    sch.annotate(block, RULE_VERSION_KEY, RULE_VERSION)
    rows_loop, cols_loop, red_loop = sch.get_loops(block)[-3:]
    rows, depth = (int(sch.get(loop).extent) for loop in (rows_loop, red_loop))
    row_factors = tile_factors(sch, rows_loop, row_block, 16, decided)
    row_outer, row_inner = sch.split(rows_loop, row_factors)
    panel, lane = sch.split(cols_loop, [None, width])
    panels = int(sch.get(panel).extent)
    panel_factors = tile_factors(sch, panel, panel_block, 8, decided)
    panel_outer, panel_inner = sch.split(panel, panel_factors)
    # the chunk is sized for this block (a sampled decision is read back as its value)
    tile_rows = int(sch.get(row_factors[1])) if row_block is None else row_block
    tile_panels = int(sch.get(panel_factors[1])) if panel_block is None else panel_block
    chunk = reduce_chunk(rows, depth, tile_rows, tile_panels, panels, width)
    if chunk is None:
        sch.reorder(panel_outer, row_outer, red_loop, panel_inner, row_inner, lane)
        accumulate_at, reduce_from, parallel = row_outer, red_loop, (panel_outer, row_outer)
    else:
        red_outer, red_inner = sch.split(red_loop, [None, chunk])
        sch.reorder(panel_outer, red_outer, row_outer, red_inner, panel_inner, row_inner, lane)
        accumulate_at, reduce_from, parallel = panel_outer, red_outer, (panel_outer,)
    writeback = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(writeback, accumulate_at, preserve_unit_loops=True)
    fuse_epilogue(sch, writeback, accumulate_at)
    sch.parallel(sch.fuse(*parallel) if len(parallel) > 1 else parallel[0])
    vectorize_register_tile(sch, block, writeback, lane, reduce_from, unrolled=(panel_inner, row_inner))
    return sch


def schedule_default(sch, block, target):
    """:func:`schedule` with the untuned register block of :func:`~.common.default_blocks`."""
    threads = int(target.attrs.get("num-cores", 1)) if target.attrs else 1
    rows, cols = (int(sch.get(loop).extent) for loop in sch.get_loops(block)[-3:-1])
    width = _panel_width_of(sch, block)
    return schedule(sch, block, *default_blocks(target, rows, -(-cols // width), width, threads))
