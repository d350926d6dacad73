"""Pointwise (1x1) convolutions for CPU targets as an NCHW matrix product, vectorised along the pixels.

A 1x1 convolution of stride 1 without padding is ``Y[n] = W @ X[n]`` with ``X[n]`` the (C, H*W) plane of
an NCHW input, contiguous along the pixels. The packed conv kernel (:mod:`.packed_conv2d`) puts output
channels in its vector lanes and broadcasts one input pixel per row: for a 1x1 filter that writes every
output through a transposing row buffer, one NCHW channel row at a time. This kernel keeps the pixels
in the lanes instead: each reduction step loads ``vectors`` whole vectors of one input channel's
pixels, broadcasts ``rows`` weights (one per output channel), and does ``rows x vectors`` FMAs; the
accumulators are written back as whole vectors of NCHW output rows, with the bias and activation fused.

Rewrite (:func:`emit`, called by :func:`.packed_conv2d.rewrite`, for the convolutions :func:`eligible` accepts):

    y = conv2d(x, w)            x: (N, C, H, W); w: (O, C, 1, 1) from parameters only
 -> wp = layout_transform(w)    wp[q, c, j] = w[q * rows + j, c]: the weights of ``rows`` output channels
                                per input channel, contiguous (packed once, at load)
    y = call_tir(pointwise_conv2d, reshape(x, (N, C, H*W)), wp)      y: (N, O, H, W)

A strided 1x1 convolution comes here after a subsampling copy of its input
(:func:`.packed_conv2d.subsampled_first`). The reshape only renames the shape of contiguous memory. The
kernel iterates the output plane as one pixel axis (``transform_block_layout``), and so do its
accumulators and their write-back, so that a tile of whole vectors may span output rows (56 = 3.5
vectors of 16) while the output stays NCHW and the bias, residual add and activation after it fuse into
the write-back. The loop over output-channel blocks runs inside the pixel tile or outside it (a tuning
decision); untuned, inside (:func:`schedule_default`).

Measured on AVX-512 (2 cores, batch 1, single kernels with the weight and output flushed from the cache
before each call, as in a model): ResNet-50's 1x1 64 -> 256 at 56x56 0.99 ms on the packed conv kernel's
default block (0.46 at its best) -> 0.34 ms; 128 -> 512 at 28x28 0.79 -> 0.33; 256 -> 64 at 56x56 0.48
-> 0.36; 512 -> 128 at 28x28 0.49 -> 0.32 (ONNX Runtime in the model: 0.27-0.34 ms). Planes of H*W that whole
vectors do not divide (14x14, 7x7) keep the packed conv kernel: with a vector of 14 lanes this kernel
was no faster there.
"""

from __future__ import annotations

from adntn_deploy.compiler.schedules.common import (
    add_kernel, divisor_at_most, fuse_epilogue, int64_placeholder, tile_factors, vectorize_register_tile,
)
from adntn_deploy.compiler.target import vector_shape

RULE_NAME = "adntn_pointwise_conv2d"
BLOCK_NAME = "pointwise_conv2d"
#: the kernel's blocks take the fused bias and activation (see :func:`.fuse_kernels`)
FUSABLE = True
#: output channels per register block, at most and at least (fewer leave each pixel vector too few FMAs)
MAX_ROWS, MIN_ROWS = 8, 4
#: pixel vectors per register block, at most
MAX_VECTORS = 4
#: block annotations holding the target's float32 vector lanes (the schedule runs without the target) and
#: the output channels per packed weight panel (FuseTIR renames the weight buffer)
LANES_KEY, ROWS_KEY = "adntn_lanes", "adntn_rows"
#: block annotation stamping which version of :func:`schedule` made a trace, as the packed conv rule's does
#: (:mod:`adntn_deploy.compiler.refresh` replays records of an older version)
RULE_VERSION_KEY, RULE_VERSION = "adntn_rule_version", 1


def eligible(target, x_shape, w_shape, groups: int, strides, padding) -> bool:
    """Whether a convolution (NCHW/OIHW, static shapes) is a pointwise one this kernel runs: ungrouped, 1x1,
    stride 1, no padding, a plane of whole vectors, and at least :data:`MIN_ROWS` output channels in a block."""
    lanes, _ = vector_shape(target)
    out_channels, _, kh, kw = w_shape
    return (groups == 1 and (kh, kw) == (1, 1) and all(int(v) == 1 for v in strides)
            and all(int(v) == 0 for v in padding)
            and (x_shape[2] * x_shape[3]) % lanes == 0 and divisor_at_most(out_channels, MAX_ROWS) >= MIN_ROWS)


def pointwise_conv2d_te(x, wp, out_channels: int, out_hw: tuple[int, int], lanes: int):
    """TE compute of ``Y[n, o, h, w] = sum_c X[n, c, h * W + w] * wp[o // rows, c, o % rows]`` (``x`` is the
    input as (N, C, H*W)); the block carries our rule and the target's vector ``lanes``. The output is
    NCHW, so that the bias and activation after it fuse into the kernel."""
    from tvm import te, tirx

    batch, channels, _ = x.shape
    rows = wp.shape[2]
    height, width = out_hw
    i64 = lambda v: tirx.IntImm("int64", int(v))  # noqa: E731 - relax shapes are int64 (FuseTIR matches by type)
    c = te.reduce_axis((0, channels), "c")
    return te.compute((batch, i64(out_channels), i64(height), i64(width)),
                      lambda n, o, h, w: te.sum(x[n, c, h * width + w] * wp[o // rows, c, o % rows], axis=c),
                      name=BLOCK_NAME, attrs={"schedule_rule": RULE_NAME, LANES_KEY: lanes, ROWS_KEY: int(rows)})


def emit(builder, x, w, x_shape, w_shape, out_shape, target):
    """The pointwise form of ``conv2d(x, w)`` (see the module doc), emitted into ``builder``; returns the
    call whose value is the (N, O, H, W) output."""
    from tvm import relax, te

    batch, channels, height, width = x_shape
    out_channels = w_shape[0]
    rows = divisor_at_most(out_channels, MAX_ROWS)
    pixels = height * width
    matrix = builder.emit(relax.op.reshape(w, [out_channels, channels]))
    packed = builder.emit(relax.op.layout_transform(matrix, lambda o, c: (o // rows, c, o % rows)))
    plane = builder.emit(relax.op.reshape(x, [batch, channels, pixels]))
    xp = int64_placeholder((batch, channels, pixels), "x")
    wp = int64_placeholder((out_channels // rows, channels, rows), "wp")
    out = pointwise_conv2d_te(xp, wp, out_channels, (height, width), vector_shape(target)[0])
    gvar = add_kernel(builder, te.create_prim_func([xp, wp, out]), "adntn_pointwise_conv2d")
    return relax.call_tir(gvar, [plane, packed], relax.TensorType(out_shape, "float32"))


def default_vectors(pixel_vectors: int, registers: int = 32, rows: int = MAX_ROWS) -> int:
    """Pixel vectors per register block of an untuned kernel: the most whose ``rows x vectors``
    accumulators fill at most half of the target's ``registers`` vector registers (the rest hold the
    loaded pixels and broadcast weights), at most the plane's ``pixel_vectors``.

    The block need not divide the plane: the last pixel tile is cut short by a predicate on whole vectors,
    which LLVM hoists out of the reduction loop. Taking a divisor instead left planes of an odd number of
    vectors (28x28 = 49 vectors of 16) one vector per block, 8 accumulators, too few to hide the FMA
    latency: ResNet-50's 1x1 128 -> 512 at 28x28 (bias, residual add and ReLU fused, in the model, 2 cores)
    0.48 -> 0.41 ms per call with blocks of 2 vectors (single kernel, hot cache: 0.36 -> 0.30 ms).

    With 8 output channels: 2 vectors on AVX-512 and NEON (32 registers), 1 on AVX2 (16). Measured on
    AVX2 code (single kernels, cold weight and output, bias and ReLU fused): 64 -> 256 at 56x56 0.84 ms
    with 2 vectors (all 16 registers accumulators), 0.80 ms with 1; 512 -> 128 at 28x28 0.72 -> 0.58 ms
    (the packed conv kernel: 0.87 and 0.80 ms without the epilogue).
    """
    most = max(1, min(MAX_VECTORS, registers // 2 // rows))
    return min(most, pixel_vectors)


def schedule(sch, block, vectors: int | None = None, channels_inside: bool | None = None, decided: bool = False):
    """Register-block the ``pointwise_conv2d`` ``block``: ``rows`` (the packed weight's) output channels x
    ``vectors`` pixel vectors of accumulators, the output-channel blocks inside or outside the pixel tile.
    None samples each choice (MetaSchedule decisions); with ``decided`` the given values are recorded as
    the decisions. Returns ``sch``."""
    lanes = int(sch.get(block).annotations[LANES_KEY])
    rows = int(sch.get(block).annotations[ROWS_KEY])
    width = _out_shape(sch, block)[3]
    sch.annotate(block, RULE_VERSION_KEY, RULE_VERSION)
    # iterate the output plane as one pixel axis (contiguous in NCHW): whole vectors span output rows
    sch.transform_block_layout(block, lambda n, o, h, w, c: (n, o, h * width + w, c))
    n, o, p, c = sch.get_loops(block)[-4:]
    o_outer, o_inner = sch.split(o, [None, rows])
    p_vectors, lane = sch.split(p, [None, lanes])
    p_outer, p_inner = sch.split(p_vectors, tile_factors(sch, p_vectors, vectors, MAX_VECTORS, decided))
    if channels_inside is not None and not decided:
        inside = channels_inside
    else:
        choice = sch.sample_categorical([0, 1], [0.5, 0.5], decision=None if channels_inside is None else int(channels_inside))
        inside = bool(int(sch.get(choice)))
    outer = (n, p_outer, o_outer) if inside else (n, o_outer, p_outer)
    sch.reorder(*outer, c, o_inner, p_inner, lane)
    writeback = sch.cache_write(block, 0, "local")
    # the accumulators and their write-back in pixel order too, so that a tile's region is a rectangle
    sch.transform_layout(block, ("write", 0), lambda n, o, h, w: (n, o, h * width + w))
    sch.transform_block_layout(writeback, lambda n, o, h, w: (n, o, h * width + w))
    sch.reverse_compute_at(writeback, outer[-1], preserve_unit_loops=True)
    fuse_epilogue(sch, writeback, outer[-1])
    # one task per pixel tile when the channel blocks run inside it (they share its input pixels)
    sch.parallel(sch.fuse(n, p_outer) if inside else sch.fuse(n, o_outer, p_outer))
    vectorize_register_tile(sch, block, writeback, lane, c, unrolled=(o_inner, p_inner))
    return sch


def _out_shape(sch, block) -> list[int]:
    return [int(v) for v in sch.get(block).writes[0].source.shape]


def schedule_default(sch, block, target):
    """:func:`schedule` with the untuned block: :func:`default_vectors`, output-channel blocks inside the
    pixel tile.

    Inside, a task owns a tile of pixels and computes every output channel of it: the tile's input
    pixels stay in cache for every block, and each core reads the input pixels of its own tiles only.
    This was the order for convolutions that reduce channels (C > O); those that expand them ran the
    channel blocks outside. Measured on AVX-512 (2 cores, batch 1, fresh processes, 3 and 5 interleaved
    rounds against ONNX Runtime): with every pointwise convolution inside, ResNet-50 1.24 -> 1.21x and
    1.30 -> 1.25x, DenseNet-121 0.89 -> 0.87x, Inception v2 1.29 -> 1.30x and 1.29 -> 1.27x; single
    kernels, hot: 64 -> 256 at 56x56 301 -> 306 GFLOP/s, 128 -> 512 at 28x28 339 -> 350.
    """
    _, _, height, width = _out_shape(sch, block)
    lanes, registers = vector_shape(target)
    rows = int(sch.get(block).annotations[ROWS_KEY])
    return schedule(sch, block, default_vectors(height * width // lanes, registers, rows), True)
