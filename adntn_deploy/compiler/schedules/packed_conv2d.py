"""Packed convolutions for CPU targets: NCHW conv2d read from a weight packed into vector-width panels at load.

Untuned TVM convolutions on CPU are naive loop nests (the main job's AlexNet-style net ran 10x slower
than ONNX Runtime with them). A convolution whose weight is known before the first call does not need a
search, for the same reason a dense layer does not (:mod:`.packed_dense`): the weight is
re-laid out once so that a fixed register-blocked kernel reads it contiguously.

Rewrite (:func:`rewrite`, on the imported Relax module, before weight-only work is lifted):

    y = conv2d(x, w)            x: (N, C, H, W) activations, w: (O, C/groups, KH, KW) from parameters only
 -> wp = layout_transform(w)    wp[p, c, r, s, j] = w[p * bn + j, c, r, s]: output channels in panels of bn
    y = call_tir(packed_conv2d, x, wp)

A convolution that pads does it inside the kernel (the pad stage of :func:`packed_conv2d_te`): each task
pads the input lines it reads into a small buffer of its own, just before reading them. A separate pad
kernel (the form before) wrote and re-read a padded copy of the whole input and paid a kernel launch: on
the zoo's VGG (8 padded convolutions, 2 cores, fresh processes) 0.600 -> 0.579 ms at batch 1 and 3.09 ->
3.04 ms at batch 32, AlexNet at batch 1 0.574 -> 0.561 ms; ResNet-50 and SqueezeNet unchanged.

Kernel (:func:`schedule`): an implicit GEMM. Rows are output pixels of one output row (a block of
``row_block`` consecutive columns), columns are output channels (``panel_block`` panels of bn lanes), the
reduction runs over (C, KH, KW). Each reduction step broadcasts one input pixel per row against the
panels' vectors, so the accumulators stay in vector registers over the whole reduction; the fused
epilogue (bias, activation) runs on them at write-back. The row block never crosses an output row, so
the write-back region is a rectangle. The block shape is a MetaSchedule decision of the rule
``adntn_packed_conv2d``; untuned kernels get :func:`default_conv_blocks`. The panel width bn is fixed when
the weight is packed: two vectors, or one where that lets the untuned block span several output columns
(:func:`default_conv_width`: rows of 7 on AVX2).
The accumulators are kept channel-last (a layout transform of the cache), so that their vector lanes
are contiguous: with NCHW accumulators every vector access was strided, 40x slower measured.
A reduction whose weight panel is too big for the cache is K-blocked (:func:`reduce_chunk`): the
accumulators of an output row live in a row buffer between chunks of input channels. Any output row
wider than one register block uses the row buffer as well (in one chunk), so that the write-back runs
along whole NCHW rows. A small output plane keeps all its rows' accumulators in one plane buffer and
sweeps every row per chunk of input channels (:func:`plane_buffered`), so that a task reads each input
channel plane in order. Measured on AVX2 (single kernels, batch 32): a 3x3 conv 1 -> 8 at 32x32 0.22 ->
0.15 ms, 8 -> 8 at 32x32 0.47 -> 0.39 ms, 8 -> 16 at 16x16 0.23 -> 0.18 ms, alexnet's 5x5 stem 1 -> 16 at
28x28 0.45 -> 0.29 ms (ORT: 0.44); batch 1, ResNet-50's 1x1 64 -> 256 at 56x56 1.85 -> 1.35-1.48 ms (ORT
1.36). A row one block covers (7 columns in blocks of 7) is scheduled as before; rows of 8 in blocks of 4
measured 0.9-1.1x.

Covered: static float32 NCHW/OIHW convolutions with any stride, padding and dilation and ``groups == 1``
or output channels per group that fill at least 4 lanes; output channels (of a group, or of the whole
convolution) wider than a vector but not whole vectors wide are padded to whole vectors and cropped
(:func:`padded_group_width`). A 1x1 convolution of stride 1 on a plane of whole vectors is handed to
:mod:`.pointwise_conv2d` (pixels in the vector lanes: no transposing write-back). Depthwise convolutions
and everything else keep TVM's generic schedule (``compile -v`` names each one).
"""

from __future__ import annotations

from typing import Any, Callable

from adntn_deploy.compiler.schedules.common import (
    activation_by_weight, add_kernel, block_rank, default_blocks, divisor_at_most, fuse_epilogue, int64_placeholder,
    panel_width, static_shape, tile_factors,
)
from adntn_deploy.compiler.schedules import pointwise_conv2d
from adntn_deploy.compiler.target import vector_shape

RULE_NAME = "adntn_packed_conv2d"
BLOCK_NAME = "packed_conv2d"
PAD_BLOCK_NAME = "packed_conv2d_pad"
#: the longest line of the pad stage vectorised whole (LLVM splits it into the target's vectors); a longer
#: one is vectorised by its largest divisor up to this
PAD_VECTOR_FLOATS = 256
OP_NAME = "relax.nn.conv2d"
MIN_GROUP_WIDTH = 4  # output channels per group below this (depthwise) would leave most vector lanes idle
#: a weight panel (bytes) above which the reduction is K-blocked, and the most a chunk's slice of it holds
REDUCE_SPLIT_BYTES = 64 * 1024
REDUCE_CHUNK_BYTES = 16 * 1024
#: the bytes a tile of two or more panels reads (its panels and input lines) above which the reduction is
#: K-blocked too: an L1 data cache
REDUCE_TILE_SPLIT_BYTES = 32 * 1024
#: the bytes of one input line a tile reads per input channel and filter row
CACHE_LINE_BYTES = 64
#: the most accumulator floats x unrolled taps a tile's unrolled filter-tap loops may hold (:func:`unrolled_taps`)
UNROLL_TAP_FLOATS = 1024
#: block annotation stamping which version of :func:`schedule` made a trace (2: unrolled filter taps; 3: a
#: row buffer for rows wider than a block; 4: plane buffers, :func:`plane_buffered`; 5: the pad stage computed
#: per tile, :func:`_pad_per_tile`). A tuning record without today's stamp replays an older schedule
#: (:mod:`adntn_deploy.compiler.refresh`).
RULE_VERSION_KEY = "adntn_rule_version"
RULE_VERSION = 5
#: the most bytes of accumulators a plane buffer holds, and the fewest parallel tasks it needs (:func:`plane_buffered`)
PLANE_BUFFER_BYTES = 32 * 1024
MIN_PLANE_TASKS = 8
#: the most extra channels (a fraction) :func:`padded_group_width` adds to reach whole two-vector panels
TWO_VECTOR_PAD = 1 / 32
#: registers a pointwise block leaves free of accumulators: a broadcast and the panel's weight vectors
SPARE_REGISTERS = 4


def packed_conv2d_te(x, wp, out_channels: int, groups: int, out_hw: tuple[int, int],
                     strides: tuple[int, int], dilation: tuple[int, int],
                     padding: tuple[int, int, int, int] = (0, 0, 0, 0)):
    """TE compute of a grouped NCHW convolution of the input ``x`` by the packed weight ``wp``.

    ``wp`` has shape (groups * panels per group, C / groups, KH, KW, bn); output channel ``o`` of group
    ``g = o // (O / groups)`` reads panel ``g * panels + (o % (O / groups)) // bn``. The block carries our rule.
    ``padding`` (top, left, bottom, right) zero-pads ``x`` in a stage of the same kernel (block
    :data:`PAD_BLOCK_NAME`), which :func:`schedule` computes tile by tile: no separate pad kernel, and no
    padded copy of the whole input.
    """
    from tvm import te, tirx

    xp = _padded(x, padding) if any(padding) else x
    batch = xp.shape[0]
    _, group_in, kh, kw, width = wp.shape
    per_group = out_channels // groups
    panels = -(-per_group // width)
    i64 = lambda v: tirx.IntImm("int64", int(v))  # noqa: E731 - relax shapes are int64 (FuseTIR matches by type)
    rc = te.reduce_axis((0, group_in), "rc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    (sh, sw), (dh, dw) = strides, dilation

    def body(n, o, h, w):
        g = o // per_group
        within = o % per_group
        return te.sum(xp[n, g * group_in + rc, h * sh + rh * dh, w * sw + rw * dw]
                      * wp[g * panels + within // width, rc, rh, rw, within % width], axis=[rc, rh, rw])

    return te.compute((batch, i64(out_channels), i64(out_hw[0]), i64(out_hw[1])), body,
                      name=BLOCK_NAME, attrs={"schedule_rule": RULE_NAME})


def _padded(x, padding: tuple[int, int, int, int]):
    """The TE stage zero-padding NCHW ``x`` by (top, left, bottom, right) rows and columns."""
    from tvm import te, tirx

    top, left, bottom, right = padding
    batch, channels, height, width = x.shape
    i64 = lambda v: tirx.IntImm("int64", int(v))  # noqa: E731
    inside = lambda h, w: tirx.all(h >= top, h < height + top, w >= left, w < width + left)  # noqa: E731
    return te.compute((batch, channels, height + i64(top + bottom), width + i64(left + right)),
                      lambda n, c, h, w: tirx.if_then_else(inside(h, w), x[n, c, h - top, w - left],
                                                           tirx.const(0.0, "float32")),
                      name=PAD_BLOCK_NAME)


def padded_group_width(target, groups: int, per_group: int) -> int:
    """Output channels per group the kernel computes: ``per_group``, or that rounded up to whole vectors.

    A panel's lanes must stay within one group (each group reads its own input channels), so a group
    whose width is not whole vectors ran in narrow panels (ShuffleNet's 68 per group: 4 lanes, half an
    AVX2 vector) or, with no power-of-two divisor (34 per group), on the generic schedule. Such a group
    wider than one vector is padded with zero weights to whole vectors, and the padding is cropped from
    the output (:func:`rewrite`). An ungrouped convolution is one group: SqueezeNet's classifier (1,000
    channels, 8 lanes per panel on AVX-512) pads to 1,008. Measured on AVX-512 (one Conv+ReLU layer,
    batch 1, fresh processes): 1x1 512 -> 1,000 at 13x13 1.23 -> 0.78 ms (0.66x at batch 8), 3x3 64 -> 24
    at 56x56 0.85x, 3x3 128 -> 72 at 28x28 0.70x, 1x1 256 -> 200 at 14x14 0.76x: the crop is one cheap
    pass, fused with the bias and activation. Groups narrower than a vector keep their narrow panel: a
    half-empty vector FMA costs what a full one does. Where whole two-vector panels cost at most
    :data:`TWO_VECTOR_PAD` more channels, the group is padded to those instead: 1,000 -> 1,024 lets
    SqueezeNet's classifier use two-vector panels (its 13-column rows: 0.79 -> 0.66 ms as a single kernel
    on AVX-512, 1,008 channels against 1,024).
    """
    lanes, _ = vector_shape(target)
    if per_group <= lanes or per_group % lanes == 0:
        return per_group
    two_vectors = -(-per_group // (2 * lanes)) * 2 * lanes
    if two_vectors - per_group <= per_group * TWO_VECTOR_PAD:
        return two_vectors
    return -(-per_group // lanes) * lanes


def conv_support(x_shape, w_shape, attrs, target) -> tuple[int | None, str]:
    """(panel width, "") for a convolution the packed kernel runs, or (None, why not) for one it does not."""
    if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or str(attrs.out_layout) != "NCHW":
        return None, f"layout {attrs.data_layout}/{attrs.kernel_layout} (the packed kernel takes NCHW/OIHW)"
    if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", "float32"):
        return None, f"output dtype {attrs.out_dtype}"
    groups = int(attrs.groups)
    per_group = w_shape[0] // groups
    if groups > 1 and per_group < MIN_GROUP_WIDTH:
        return None, f"{per_group} output channel(s) per group (depthwise); the generic schedule runs it"
    width = panel_width(target, padded_group_width(target, groups, per_group))
    if width is None:
        return None, f"{per_group} output channels per group fit no vector panel"
    return width, ""


def default_conv_blocks(target, batch: int, out_hw: tuple[int, int], panels: int, width: int,
                        threads: int = 2, pointwise: bool = False) -> tuple[int, int]:
    """(output columns, panels) per register block of an untuned kernel: :func:`~.common.default_blocks`
    over the output columns of one row (a block never crosses an output row), whose broadcasts share an
    input line (``rows_share_lines``).

    A ``pointwise`` (1x1) convolution on a target with 32 vector registers may widen its block of one
    panel to more columns, up to all registers but :data:`SPARE_REGISTERS` (a row of 14 x 2 vectors
    holds 28 accumulators): the extra columns cost a broadcast from a line already loaded, not a weight
    stream. Measured on AVX-512 (single kernels, weights flushed): 1x1 1024 -> 256 at 14x14 7 -> 14
    columns 0.41 -> 0.37 ms, 256 -> 1024 at 14x14 0.44 -> 0.41, a stride-2 256 -> 128 at 28x28 0.51 -> 0.29;
    more panels instead (7 x 2) was slower, and so were 14-column blocks of 3x3 convolutions (0.67 -> 1.17 ms
    at 14x14), which keep the half-register rule.
    """
    rows, panel_block = default_blocks(target, out_hw[1], panels, width, threads, other_tasks=batch * out_hw[0],
                                       rows_share_lines=True)
    lanes, registers = vector_shape(target)
    vectors = max(1, width // lanes)
    if not pointwise or registers < 32:
        return rows, panel_block
    tasks = lambda columns: batch * out_hw[0] * (out_hw[1] // columns) * panels  # noqa: E731
    wider = [c for c in range(rows + 1, min(out_hw[1], 16) + 1)
             if out_hw[1] % c == 0 and c * vectors <= registers - SPARE_REGISTERS and tasks(c) >= 4 * threads]
    return (max(wider), 1) if wider else (rows, panel_block)


def default_conv_width(target, batch: int, out_hw: tuple[int, int], per_group: int, threads: int = 2,
                       pointwise: bool = False) -> int | None:
    """Panel width (output channels) to pack an untuned convolution's weight in, or None when none fits.

    :func:`~.common.panel_width` (two vectors where they divide) unless one-vector panels let the register
    block of :func:`default_conv_blocks` span several output columns where two-vector panels cannot: an
    output row of 7 on AVX2 fits 7 columns x 1 one-vector panel (7 accumulators) but not 7 x 1 two-vector
    panel (14 of 16 registers), which left 1 column x 4 panels. Measured (3x3, 64 -> 64 channels, 7x7
    output, batch 32, 2 cores): 1.76 ms with two-vector panels, 1.27 ms with one-vector panels.
    """
    widest = panel_width(target, per_group)
    if widest is None:
        return None
    lanes, _ = vector_shape(target)

    def rank(width: int) -> tuple[bool, float]:
        rows, panels = default_conv_blocks(target, batch, out_hw, -(-per_group // width), width, threads, pointwise)
        return block_rank(rows, panels, max(1, width // lanes))

    narrow = [lanes] if widest > lanes and per_group % lanes == 0 else []
    return max([widest, *narrow], key=rank)  # the first of equals: the widest


def _threads(target) -> int:
    return int(target.attrs.get("num-cores", 1)) if target.attrs else 1


def reduce_chunk(group_in: int, kh: int, kw: int, width: int, panels: int = 1) -> int | None:
    """Input channels per chunk of a K-blocked reduction, or None when the reduction is not split.

    Each register tile reduces over (C, KH, KW) and reads ``panels`` weight panels of ``C * KH * KW * width``
    floats each. The reduction is split when one panel is over :data:`REDUCE_SPLIT_BYTES` (ResNet's 3x3
    convolutions over 128-512 channels, its 1x1 over 1024-2048: every tile streamed the whole panel and a
    cache line per input channel from L2), or when a tile of two or more panels reads more than
    :data:`REDUCE_TILE_SPLIT_BYTES` (an L1 data cache) in all, its panels and the input lines it reads (one
    per input channel and filter row). The chunks are of input channels whose slice
    of the tile's panels fits :data:`REDUCE_CHUNK_BYTES`, and every tile of the row runs one chunk before
    the next: the slice and the chunk's input lines are reused from L1 by all of them.

    Measured on AVX2 (2 cores, batch 32, single kernels): tiles of 2 or 4 panels over 32 KiB ran 0.66-0.91x
    the time split (5x5 16 -> 32 at 14x14: 2 x 2 panels of 25 KiB, 0.86x); single-panel tiles of 51 KiB
    ran 1.25-1.34x the time split, so they stay whole up to the 64 KiB panel bound. ResNet-50's 1x1 conv
    256 -> 1024 at 14x14 (batch 1, tile 2 columns x 2 panels of 16 KiB, plus 16 KiB of input lines): 1.21-1.28
    ms whole, 0.76-0.95 ms in chunks of 128 channels (ONNX Runtime: 0.85 ms).
    """
    per_channel = kh * kw * width * 4
    panel = group_in * per_channel
    input_lines = group_in * kh * CACHE_LINE_BYTES  # a tile's columns share one line per channel and filter row
    if panel <= REDUCE_SPLIT_BYTES and (panels < 2 or panel * panels + input_lines <= REDUCE_TILE_SPLIT_BYTES):
        return None
    chunk = divisor_at_most(group_in, max(1, REDUCE_CHUNK_BYTES // (per_channel * panels)))
    return chunk if chunk < group_in else None


def unrolled_taps(kh: int, kw: int, tile_floats: int) -> int:
    """How many of a tile's filter-tap loops to unroll: 0, 1 (the KW loop) or 2 (KW and KH).

    ``tile_floats`` is the tile's accumulators in floats (output columns x panels x panel width). A tap
    loop of 3 or 5 iterations around a tile of ~8 FMAs pays its loop overhead and a tap's address
    arithmetic every few instructions; unrolled, the taps' FMAs interleave. The loops are unrolled, KW
    first, while ``tile_floats`` x the unrolled taps stays within :data:`UNROLL_TAP_FLOATS` (a 1x1 or 1xK
    filter's one-tap loops count, unrolling them changes nothing).

    Measured on AVX2 (2 cores, single kernels at batch 32): a 3x3 conv 64 -> 64 at 7x7 (tile 7 x 8
    floats) 1.23 ms as loops, 0.96 ms with KW unrolled, 0.85 ms with both; eight other 3x3 convs at
    4x4-32x32 (56-64 floats) 0.71-0.97x the time with both; four 5x5 convs (64-112 floats) 0.92-0.98x
    with KW unrolled but 1.06-1.30x with both (a 25-tap body of 200-350 FMAs).
    """
    unrolled = 0
    for taps in (kw, kw * kh):
        if tile_floats * taps <= UNROLL_TAP_FLOATS:  # a loop of one tap unrolls to itself
            unrolled += 1
        else:
            break
    return unrolled


def plane_buffered(batch: int, panel_blocks: int, out_hw: tuple[int, int], tile_channels: int) -> bool:
    """Whether a kernel keeps its whole output plane's accumulators (for one block of ``tile_channels``
    output channels) in a plane buffer and sweeps every output row per chunk of input channels.

    The row-at-a-time order reads, for each output row, a line of every input channel: a stride of one
    channel plane per reduction step, which the prefetchers do not follow when the previous kernel has
    just written the input (much of it from the other core). Sweeping the rows inside a chunk of channels
    reads each channel plane in order. Taken when the plane buffer holds at most
    :data:`PLANE_BUFFER_BYTES`, the plane has several rows, and batch x panel blocks (the parallel tasks;
    the rows no longer are) is at least :data:`MIN_PLANE_TASKS`. Measured on AVX-512 (2 cores, one-layer
    models whose input is rewritten before each call, as in a model): 3x3 256 -> 256 at 14x14 0.86 ->
    0.72 ms, 3x3 512 -> 512 at 7x7 0.81 -> 0.77, 1x1 1024 -> 256 at 14x14 0.57 -> 0.51, 1x1 2048 -> 512 at
    7x7 0.45 -> 0.42; buffers of 100 KiB or more were as often slower (a strided 1x1 at 28x28 0.64 -> 0.78,
    ResNet's 7x7 stem at 112x112 1.11 -> 1.53).
    """
    out_h, out_w = out_hw
    return (out_h > 1 and batch * panel_blocks >= MIN_PLANE_TASKS
            and out_h * out_w * tile_channels * 4 <= PLANE_BUFFER_BYTES)


def schedule(sch, block, row_block: int | None = None, panel_block: int | None = None, decided: bool = False):
    """Register-block the ``packed_conv2d`` ``block`` (see the module doc); None samples each factor.

    A long reduction is K-blocked (:func:`reduce_chunk`): the accumulators of a whole output row live in
    a row buffer (a few KiB, in L1) across the chunks, and each tile keeps its part in registers within one.
    An output row wider than one tile gets the row buffer too, as a single chunk: the epilogue then writes
    each output channel's row in one contiguous run instead of a tile's few columns at a time (16
    channel planes, 16 bytes each, for a tile of 4 columns x 16 channels).
    Short filter-tap loops are unrolled (:func:`unrolled_taps`). With ``decided``, the given blocks are
    recorded as the decisions of the sampling instructions (what a tuning record stores, see
    :mod:`adntn_deploy.compiler.refresh`) instead of as fixed splits. Returns ``sch``.
    """
    width = _conv_panel_width(sch, block)
    sch.annotate(block, RULE_VERSION_KEY, RULE_VERSION)
    n, o, h, w, rc, rh, rw = sch.get_loops(block)[-7:]
    group_in, kh, kw = (int(sch.get(loop).extent) for loop in (rc, rh, rw))

    out_w = int(sch.get(w).extent)
    w_factors = tile_factors(sch, w, row_block, 16, decided)
    w_outer, w_inner = sch.split(w, w_factors)
    panel, lane = sch.split(o, [None, width])
    p_factors = tile_factors(sch, panel, panel_block, 8, decided)
    p_outer, p_inner = sch.split(panel, p_factors)
    # the chunk is sized for the panels of this tile (a sampled decision is read back as its value)
    tile_panels = int(sch.get(p_factors[1])) if panel_block is None else panel_block
    tile_columns = int(sch.get(w_factors[1])) if row_block is None else row_block
    chunk = reduce_chunk(group_in, kh, kw, width, tile_panels)
    batch, out_h = (int(sch.get(loop).extent) for loop in (n, h))
    if plane_buffered(batch, int(sch.get(p_outer).extent), (out_h, out_w), tile_panels * width):
        # the output plane's accumulators in one buffer: each chunk of input channels is swept over every
        # output row before the next chunk, so a task reads each channel plane in order
        rc_outer, rc_inner = sch.split(rc, [None, chunk or group_in])
        sch.reorder(n, p_outer, rc_outer, h, w_outer, rc_inner, rh, rw, p_inner, w_inner, lane)
        accumulate_at, reduce_from, parallel = p_outer, rc_outer, (n, p_outer)
        pad_at = rc_outer  # the chunk's channel planes, whole
    else:
        if chunk is None and tile_columns < out_w:
            chunk = group_in  # one chunk: the row buffer only, for its whole-row write-back
        if chunk is None:
            sch.reorder(n, p_outer, h, w_outer, rc, rh, rw, p_inner, w_inner, lane)
            accumulate_at, reduce_from, parallel = w_outer, rc, (n, p_outer, h, w_outer)
            pad_at = w_outer  # the input lines of one tile (every loop above it is parallel)
        else:
            rc_outer, rc_inner = sch.split(rc, [None, chunk])
            sch.reorder(n, p_outer, h, rc_outer, w_outer, rc_inner, rh, rw, p_inner, w_inner, lane)
            accumulate_at, reduce_from, parallel = h, rc_outer, (n, p_outer, h)
            pad_at = rc_outer  # the chunk's input lines of one output row
    _pad_per_tile(sch, block, pad_at)
    writeback = sch.cache_write(block, 0, "local")
    # accumulators channel-last, so that the vector lanes (output channels) are contiguous in them
    sch.transform_layout(block, ("write", 0), lambda b, c, y, x: (b, y, x, c))
    sch.reverse_compute_at(writeback, accumulate_at, preserve_unit_loops=True)
    fuse_epilogue(sch, writeback, accumulate_at)
    sch.parallel(sch.fuse(*parallel))
    sch.unroll(p_inner)
    sch.unroll(w_inner)
    for tap_loop in (rw, rh)[:unrolled_taps(kh, kw, tile_columns * tile_panels * width)]:
        sch.unroll(tap_loop)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, reduce_from)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch


def _pad_per_tile(sch, block, loop) -> None:
    """Compute the kernel's pad stage (if it has one) under ``loop``: each task pads the input lines its
    tiles read (a chunk of channels, or one tile's rows and columns) into a buffer of its own."""
    pads = [b for b in sch.get_producers(block) if sch.get(b).name_hint == PAD_BLOCK_NAME]
    for pad in pads:
        sch.compute_at(pad, loop, preserve_unit_loops=True)
        sch.set_scope(pad, 0, "local")
        # a line of the buffer as vector stores and its bounds test as a vector compare; left to LLVM the
        # test stays scalar: cnn32's three padded 5x5 convolutions (batch 32, per-kernel profile) took
        # 1.37 ms with scalar pad stages, 1.33 ms vectorised (1.44 ms as separate pad kernels)
        inner = sch.get_loops(pad)[-1]
        extent = int(sch.get(inner).extent)
        length = extent if extent <= PAD_VECTOR_FLOATS else divisor_at_most(extent, PAD_VECTOR_FLOATS)
        if length >= 4:
            if length < extent:
                inner = sch.split(inner, [None, length])[1]
            sch.vectorize(inner)


def _conv_panel_width(sch, block) -> int:
    for region in sch.get(block).reads:
        if len(region.source.shape) == 5:
            return int(region.source.shape[4])
    raise ValueError("not a packed conv2d block: it reads no packed (5-D) weight")


def schedule_default(sch, block, target):
    """:func:`schedule` with the untuned register block of :func:`default_conv_blocks`."""
    batch, cols, out_h, out_w, _, kh, kw = (int(sch.get(loop).extent) for loop in sch.get_loops(block)[-7:])
    width = _conv_panel_width(sch, block)
    return schedule(sch, block, *default_conv_blocks(target, batch, (out_h, out_w), -(-cols // width), width,
                                                     _threads(target), pointwise=(kh, kw) == (1, 1)))


def rewrite(builder, call, target, weight_only: Callable[[Any], bool]) -> tuple[Any, str]:
    """The packed form of a Relax ``nn.conv2d`` call, emitted into ``builder``: (new call or None, why not).

    ``weight_only(expr)`` says whether an expression depends on parameters only.
    """
    from tvm import relax, te

    x_shape, w_shape, why = activation_by_weight(call, 4, weight_only)
    if x_shape is None:
        return None, why
    x, w = call.args
    attrs = call.attrs
    width, why = conv_support(x_shape, w_shape, attrs, target)
    if width is None:
        return None, why
    out_shape = [int(v) for v in call.ty.shape.values]
    groups = int(attrs.groups)
    out_channels, group_in, kh, kw = w_shape
    strides = tuple(int(v) for v in attrs.strides)
    dilation = tuple(int(v) for v in attrs.dilation)
    top, left, bottom, right = (int(v) for v in attrs.padding)
    if subsampled_first((kh, kw), strides, (top, left, bottom, right)):
        # a strided 1x1 convolution reads only every s-th pixel: subsample first (one cheap copy of the
        # pixels it reads), then run the stride-1 kernels, whose reads are contiguous
        x_shape = [*x_shape[:2], out_shape[2], out_shape[3]]
        x = builder.emit(_subsample(builder, x, x_shape, strides))
        strides = (1, 1)
    if pointwise_conv2d.eligible(target, x_shape, w_shape, groups, strides, (top, left, bottom, right)):
        return pointwise_conv2d.emit(builder, x, w, x_shape, w_shape, out_shape, target), ""
    per_group = out_channels // groups
    padded = padded_group_width(target, groups, per_group)  # per_group, or whole vectors (then cropped)
    width = default_conv_width(target, out_shape[0], (out_shape[2], out_shape[3]), padded, _threads(target),
                               pointwise=(kh, kw) == (1, 1))
    panels = -(-per_group // width)
    # the channels the packed weight holds: padded to whole panels of the width chosen, which may be
    # narrower than the two-vector panels ``padded`` was rounded up for (1,000 -> 1,024 channels, then
    # one-vector panels: 63 of them, not 64)
    padded = panels * width

    if groups == 1:
        packed = builder.emit(relax.op.layout_transform(w, lambda o, c, r, s: (o // width, c, r, s, o % width), pad_value=0.0))
    else:
        packed = _grouped_pack(builder, w, groups, per_group, width)
    x_ph = int64_placeholder(x_shape, "x" if any((top, left, bottom, right)) else "xp")  # unpadded: as before
    wp = int64_placeholder((groups * panels, group_in, kh, kw, width), "wp")
    out = packed_conv2d_te(x_ph, wp, groups * padded, groups, (out_shape[2], out_shape[3]), strides, dilation,
                           (top, left, bottom, right))
    gvar = add_kernel(builder, te.create_prim_func([x_ph, wp, out]), "adntn_packed_conv2d")
    batch, _, out_h, out_w = out_shape
    result = relax.call_tir(gvar, [x, packed], relax.TensorType([batch, groups * padded, out_h, out_w], "float32"))
    if padded == per_group:
        return result, ""
    # each group's zero-weight channels are dropped (a copy that fuses with the bias and activation after it)
    full = builder.emit(relax.op.reshape(builder.emit(result), [batch, groups, padded, out_h, out_w]))
    kept = builder.emit(relax.op.strided_slice(full, axes=[2], begin=[0], end=[per_group]))
    return relax.op.reshape(kept, out_shape), ""


def subsampled_first(kernel: tuple[int, int], strides: tuple[int, int], padding: tuple[int, int, int, int]) -> bool:
    """Whether a convolution runs as a subsampling copy of its input and a stride-1 convolution: a 1x1
    filter with a stride above 1 and no padding (ResNet's downsampling projections).

    Strided, the kernel broadcasts every s-th pixel of each input line it reads, so half its cache lines
    (stride 2) carry pixels it skips, and the pointwise kernel (pixels in the vector lanes) cannot take it
    at all. Measured on AVX-512 (2 cores, batch 1, one Conv+ReLU layer, fresh processes): ResNet-50's 1x1
    256 -> 512 stride 2 at 56x56 1.72 ms strided, 0.77 ms as a stride-1 layer on the subsampled input; 512 ->
    1024 stride 2 at 28x28 1.15 -> 0.79 ms (ONNX Runtime: 0.87 and 0.79 ms).
    """
    return kernel == (1, 1) and any(s > 1 for s in strides) and not any(padding)


def _subsample(builder, x, out_shape: list[int], strides: tuple[int, int]):
    """The call of a kernel copying every ``strides``-th row and column of NCHW ``x`` into ``out_shape``.

    A kernel of its own rather than Relax's ``strided_slice``: that one fuses with the pointwise kernel's
    reshape of its input into one copy whose index divides the flattened pixel (measured 0.12 ms for
    ResNet's 256 x 28 x 28; as this kernel, on the generic schedule's strided form, 0.02 ms).
    """
    from tvm import relax, te, tirx

    x_ph = int64_placeholder(static_shape(x, 4), "x")
    sh, sw = strides
    y = te.compute([tirx.IntImm("int64", d) for d in out_shape], lambda n, c, h, w: x_ph[n, c, h * sh, w * sw],
                   name="subsample")
    gvar = add_kernel(builder, te.create_prim_func([x_ph, y]), "adntn_subsample")
    return relax.call_tir(gvar, [x], relax.TensorType(out_shape, "float32"))


def _grouped_pack(builder, w, groups: int, per_group: int, width: int):
    """wp[g * panels + p, c, r, s, j] = w[g * per_group + p * width + j, c, r, s] (zero past a group's end).

    A layout_transform index map must be affine on one axis: go through (groups, per group) and back.
    """
    from tvm import relax

    rest = static_shape(w, 4)[1:]
    panels = -(-per_group // width)
    split = builder.emit(relax.op.reshape(w, [groups, per_group, *rest]))
    packed = builder.emit(relax.op.layout_transform(split, lambda g, o, c, r, s: (g, o // width, c, r, s, o % width),
                                                    pad_value=0.0))
    return builder.emit(relax.op.reshape(packed, [groups * panels, *rest, width]))

