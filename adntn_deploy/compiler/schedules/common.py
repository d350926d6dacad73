"""What our schedule rules share: vector panels, register-block choice, and scheduling helpers.

A packed kernel keeps ``rows x panels`` output tiles in vector registers over its whole reduction; a
panel is ``width`` output columns (channels) laid out contiguously in the packed weight, so every
reduction step loads whole vectors of it.
"""

from __future__ import annotations

from typing import Any

from adntn_deploy.compiler.target import vector_shape

OUT_EWISE_FUSABLE = 4  # relax OpPatternKind.kOutEWiseFusable: bias / activation fuse into the kernel


def panel_width(target, out_dim: int) -> int | None:
    """Columns per packed panel of an ``out_dim``-wide weight, or None when no panel fits.

    Two vectors, else the widest power of two >= 4 that divides ``out_dim`` (a panel that does not divide
    the width would need a predicate in the vector loop, which LLVM then scalarises: 12x slower measured).
    A weight at most two vectors wide is one panel, zero-padded to whole vectors.
    """
    lanes, _ = vector_shape(target)
    width = 2 * lanes
    while width >= 4:
        if out_dim % width == 0:
            return width
        width //= 2
    if out_dim <= 2 * lanes:
        return -(-out_dim // lanes) * lanes
    return None


def default_blocks(target, rows: int, panels: int, width: int, threads: int = 2, other_tasks: int = 1,
                   rows_share_lines: bool = False) -> tuple[int, int]:
    """(rows, panels) per register block of an untuned kernel.

    The accumulators (rows x panels x vectors per panel) fill at most half the vector registers. Among
    the blocks that fit, divide the loops and leave ``threads`` x 4 parallel tasks (``other_tasks``
    multiplies the count: the conv kernel's batch x output rows), take the one with the most FMAs per
    load: each reduction step loads one broadcast per row and one vector per panel vector, and does
    rows x panels x vectors FMAs. Measured on a 32 x 2048 x 2048 product (AVX-512, 2 cores): 4 rows x 2
    panels ran 197 GFLOP/s, 8 x 1 151, 2 x 4 158 (rows first, the old rule, took 8 x 1). A block of one
    row comes last whenever one of several rows fits, whatever its ratio: each of its FMAs waits for a
    weight vector of its own (7-wide conv rows on AVX2: 1 x 4 panels of 2 vectors ran 65 GFLOP/s, 7 x 1
    one-vector panel 91, 7 x 1 two-vector panel, spilling, 80).
    ``rows_share_lines``: the rows are neighbouring pixels of one input line (a convolution's output
    columns), so their broadcasts cost one cache line per reduction step, not one each (:func:`block_rank`).
    """
    lanes, registers = vector_shape(target)
    vectors = max(1, width // lanes)
    budget = max(1, registers // 2 // vectors)
    best, best_key = (1, 1), (False, -1.0, 0)
    for row_block in range(1, min(rows, 16) + 1):
        if rows % row_block:
            continue
        for panel_block in range(1, min(panels, 8) + 1):
            if panels % panel_block or row_block * panel_block > budget:
                continue
            tasks = rows // row_block * (panels // panel_block) * other_tasks
            if tasks < 4 * threads and (row_block, panel_block) != (1, 1):
                continue
            key = (*block_rank(row_block, panel_block, vectors, rows_share_lines), row_block)
            if key > best_key:
                best, best_key = (row_block, panel_block), key
    return best


def block_rank(row_block: int, panel_block: int, vectors: int, rows_share_lines: bool = False) -> tuple[bool, float]:
    """How :func:`default_blocks` ranks a register block (higher is better): several rows first, then FMAs
    per load (one broadcast per row and one load per panel vector per reduction step).

    With ``rows_share_lines`` the rows' broadcasts count as one load: a convolution's rows are neighbouring
    output columns whose inputs share a cache line, while every panel vector is a line of its own weight
    stream. Measured on AVX-512 (2 cores, single kernels with weights flushed, batch 1): 7 columns x 1 panel
    against the 2 x 4 the plain count chose, 3x3 256 -> 256 at 14x14 0.85 -> 0.67 ms, 1x1 1024 -> 256 at
    14x14 0.48 -> 0.41 ms, 3x3 64 -> 64 at 56x56 0.74 -> 0.68 ms, 3x3 128 -> 128 at 28x28 0.71 -> 0.67 ms.
    """
    broadcasts = 1 if rows_share_lines else row_block
    return row_block > 1, row_block * panel_block * vectors / (broadcasts + panel_block * vectors)


def divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def root_blocks(sch) -> list:
    """The blocks directly under a PrimFunc's root block."""
    return sch.get_child_blocks(sch.get_sblock("root"))


def blocks_after(sch, block) -> list:
    """The blocks that follow ``block`` in its function, in program order."""
    blocks = list(root_blocks(sch))
    names = [sch.get(b).name_hint for b in blocks]
    return blocks[names.index(sch.get(block).name_hint) + 1:]


def try_vectorize(sch, loop) -> None:
    """Vectorise ``loop`` when its extent is a constant (a tile clipped by the output's edge is not)."""
    from tvm import tirx

    if isinstance(sch.get(loop).extent, tirx.IntImm):
        sch.vectorize(loop)


def fuse_epilogue(sch, writeback, loop) -> None:
    """Run the elementwise consumers of ``writeback`` (bias, activation) on the accumulators at ``loop``.

    A chain of single consumers is inlined into the write-back. Where the chain forks (gelu reads its
    input twice) the rest stays after the loop nest: inlining one branch would leave the other reading a
    buffer that is no longer written; those blocks then run tile by tile right after the write-back, inside
    the parallel loop and vectorised, instead of serially over the whole output after the loop nest.
    """
    consumers = sch.get_consumers(writeback)
    while len(consumers) == 1:
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001 - not elementwise (a reduction, a reshape): leave it after the loop nest
            break
        consumers = sch.get_consumers(writeback)
    for follower in (blocks_after(sch, writeback) if len(consumers) > 1 else []):
        try:
            sch.reverse_compute_at(follower, loop, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - not computable per tile (a reduction over the output): stop here
            break
        try_vectorize(sch, sch.get_loops(follower)[-1])


def tile_factors(sch, loop, block_size: int | None, most: int, decided: bool = False):
    """The two split factors of ``loop`` for a register block of ``block_size``: fixed ``[None, block_size]``;
    or, when ``block_size`` is None (MetaSchedule samples it, innermost at most ``most``) or ``decided``
    (the given size recorded as the decision, as a tuning record stores it), a ``sample_perfect_tile``."""
    if block_size is not None and not decided:
        return [None, block_size]
    decision = None if block_size is None else [int(sch.get(loop).extent) // block_size, block_size]
    return sch.sample_perfect_tile(loop, n=2, max_innermost_factor=most, decision=decision)


def vectorize_register_tile(sch, block, writeback, lane, reduce_from, unrolled=()) -> None:
    """The end of a register-blocked schedule: unroll the tile's ``unrolled`` loops, vectorise its
    ``lane`` loop, split the accumulators' initialisation off at ``reduce_from``, and vectorise the
    initialisation and the ``writeback`` block's innermost loop."""
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, reduce_from)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(writeback)[-1])


def static_shape(expr, ndim: int) -> list[int] | None:
    """The static shape of a float32 Relax tensor expression of rank ``ndim``, else None."""
    from tvm import relax

    info = expr.ty
    if not isinstance(info, relax.TensorType) or info.ndim != ndim or str(info.dtype) != "float32":
        return None
    if info.shape is None or not hasattr(info.shape, "values"):
        return None
    try:
        return [int(v) for v in info.shape.values]
    except (TypeError, ValueError):  # a symbolic dimension
        return None


def activation_by_weight(call, ndim: int, weight_only) -> tuple[list[int] | None, list[int] | None, str]:
    """(activation shape, weight shape, "") of a two-operand call ``op(x, w)`` whose ``w`` is known at load
    and ``x`` is a static float32 activation of rank ``ndim``; else (None, None, why it stays generic)."""
    if len(call.args) != 2:
        return None, None, "not a two-operand call"
    x, w = call.args
    x_shape, w_shape = static_shape(x, ndim), static_shape(w, ndim)
    if x_shape is None or w_shape is None:
        return None, None, f"not static {ndim}-D float32 operands"
    if weight_only(x) or not weight_only(w):
        return None, None, "its weight operand is computed from activations"
    return x_shape, w_shape, ""


def int64_placeholder(shape, name: str) -> Any:
    """A float32 TE placeholder with int64 extents, like the legalised ops around it (FuseTIR matches
    buffers across kernels by type)."""
    from tvm import te, tirx

    return te.placeholder([tirx.IntImm("int64", int(d)) for d in shape], "float32", name)


def add_kernel(builder, func, name: str, pattern: int = OUT_EWISE_FUSABLE):
    """Add a TE-made PrimFunc to the Relax module being built; returns its GlobalVar.

    emit_te would drop the "main" symbol create_prim_func gives; two kernels sharing it confuse FuseTIR.
    """
    func = func.without_attr("global_symbol").with_attr("op_pattern", pattern)
    return builder.add_func(func, name)
