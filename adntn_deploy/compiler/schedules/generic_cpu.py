"""The untuned CPU schedule of every kernel that no rule of ours and no tuning record schedules.

Without it TVM builds such kernels as plain loop nests: one thread, scalar code. That was the elementwise
tail of every model (pads, pools, adds, transposes, softmax) and the depthwise convolutions of foreign
models (ShuffleNet ran 6.4x behind ONNX Runtime, most of it there). The schedule:

1. inline every block that can be inlined (chains of elementwise ops), as TVM's own GPU fallback does,
   except pads that pad (:func:`_pads`);
2. for each remaining block whose loops are spatial then reduction (the form TVM's legalised operators
   take): split the innermost spatial loop into vectors when its extent allows (:func:`_vector_length`),
   move the reduction loops outside those vector lanes, fuse the outer spatial loops into one parallel
   loop, and vectorise the lanes (the reduction's initialisation too).

A depthwise convolution thus runs as ``parallel(n, c, h, w / lanes) x kh x kw x vector(lanes)``: each
tap is one vector multiply-add over ``lanes`` output columns. Blocks of any other form keep TVM's loops.

A block that reads along its innermost spatial loop with a stride (a pool or depthwise convolution of
stride 2, a strided slice) is scheduled otherwise (:func:`_schedule_strided_block`): TVM vectorises a
strided read lane by lane (one ``vinsertps`` per float), while LLVM's own loop vectoriser loads whole
vectors and de-interleaves them (``vpermps``). So the outer spatial loops run in parallel, short
reduction loops (a pooling window, a filter's taps) are unrolled, and the innermost loop is left to
LLVM. Measured on AVX-512 (2 cores, batch 1): max pool 3x3 / 2 over 64 x 111 x 111 0.67 -> 0.054 ms
(ONNX Runtime 0.089), over 64 x 112 x 112 padded 0.80 -> 0.16 ms (the pad included); a depthwise 3x3 / 2
conv over 32 x 112 x 112 0.38 -> 0.053 ms; a stride-2 slice 0.025 -> 0.012 ms.

A padded pool reads its input directly (:func:`pool_window`, :func:`schedule_bordered_window`): its pad is
inlined and its output rows and columns are split into border and interior loops, so that only the
border tests bounds. (Other pads stay blocks of their own, see :func:`schedule_generic`.)
"""

from __future__ import annotations

from adntn_deploy.compiler.target import vector_shape

#: loop iterations below which a kernel stays on one thread: waking the pool costs more than it saves
MIN_PARALLEL_WORK = 16384


def _constant(extent) -> int | None:
    try:
        return int(extent)
    except (TypeError, ValueError):  # a symbolic extent (dynamic batch)
        return None


#: an innermost loop at most this many vectors long that whole vectors do not split is vectorised whole
#: (fusing it with the loop above instead would make every lane compute its own row and column: gathers);
#: a longer one is vectorised by its largest divisor up to this length
WHOLE_LOOP_VECTORS = 16


def _vector_length(inner: int | None, lanes: int) -> int:
    """Lanes to vectorise a block's innermost spatial loop of extent ``inner`` by; 0 leaves the loop to
    LLVM's own loop vectoriser (a symbolic extent, one under 4, or a long one with no divisor of 4 or
    more up to ``WHOLE_LOOP_VECTORS * lanes``: a split that does not divide puts a predicate in the loop,
    which TVM's vectoriser cannot take).

    Whole vectors of ``lanes`` when they split it; a loop they do not split is one vector when it is at
    most ``WHOLE_LOOP_VECTORS`` vectors long (LLVM splits e.g. 36 lanes into 32 + 4), keeping its loads
    contiguous, else its largest divisor up to that length (a padded row of 228 floats: 2 x 114 lanes).
    LLVM rarely vectorises what is left to it here: a pad's bounds test stays scalar (measured 15-35x
    slower than the vectorised pad on 36- and 60-float rows).
    """
    if inner is None or inner < 4:
        return 0
    if inner % lanes == 0:
        return lanes
    longest = WHOLE_LOOP_VECTORS * lanes
    if inner <= longest:
        return inner
    return next((d for d in range(longest, 3, -1) if inner % d == 0), 0)


#: reduction iterations (a pooling window's or filter's taps) up to which a strided block's reduction
#: loops are unrolled; a bigger window keeps its loops
MAX_UNROLLED_TAPS = 64


def _reads_strided(sch, block, var) -> bool:
    """Whether ``block`` reads some buffer's innermost axis at a stride of 2 or more in iterator ``var``.

    Only linear indices count (``2 * w + kw``); an index TVM cannot write as ``a * var + b`` (a division,
    a modulo) keeps the ordinary schedule.
    """
    from tvm import sym

    for region in sch.get(block).reads:
        if not region.region:
            continue
        coefficients = sym.detect_linear_equation(region.region[-1].min, [var])
        if len(coefficients) == 2 and abs(_constant(coefficients[0]) or 0) > 1:
            return True
    return False


def _pads(sch, block) -> bool:
    """Whether ``block`` writes a buffer larger than the one it reads (a pad with a non-zero border)."""
    stmt = sch.get(block)
    if len(stmt.reads) != 1 or len(stmt.writes) != 1 or "pad" not in stmt.name_hint.lower():
        return False
    shape = [_constant(d) for d in stmt.writes[0].source.shape]
    source = [_constant(d) for d in stmt.reads[0].source.shape]
    return None not in shape + source and shape != source


def schedule_generic(sch, target) -> bool:
    """Give the function in schedule ``sch`` the generic CPU schedule for ``target`` (an llvm target).

    Returns whether any block was scheduled (False leaves TVM's loops: a function TVM's analysis cannot
    normalise, or whose blocks mix spatial and reduction loops out of order). Raises whatever the TVM
    schedule primitives raise; callers schedule a fresh copy and fall back to the unscheduled function.
    """
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline

    infos = normalize_prim_func(sch)
    if infos is None:
        return False
    lanes, _ = vector_shape(target)
    # a pad that pads stays a block of its own: inlined into a convolution it puts a bounds test on every
    # tap (measured 1.6x slower on a 3x3 depthwise convolution); a pad of zero is a copy and is inlined.
    # A pool's pad is inlined, and the pool's rows and columns split so that only the border tests bounds
    pads = [info for info in infos if _pads(sch, info.block_rv)]
    windows, inlined = {}, []
    for pad in pads:
        found = pool_window(sch, pad.block_rv)
        if found is not None:
            sch.compute_inline(pad.block_rv)
            windows[found[0]] = found[1]
            inlined.append(pad)
    pads = [info for info in pads if info not in inlined]
    infos = pads + try_inline(sch, [info for info in infos if info not in pads and info not in inlined])
    scheduled = False
    for info in infos:
        kinds = "".join(it.kind for it in info.iters)
        spatial = len(kinds) - len(kinds.lstrip("S"))
        if spatial == 0 or set(kinds[spatial:]) - {"R"}:
            continue  # a full reduction to a scalar, or loops of another kind / order
        window = windows.get(sch.get(info.block_rv).name_hint)
        if window is not None and spatial >= 2 and kinds.endswith("RR"):
            schedule_bordered_window(sch, info, spatial, window)
        elif _reads_strided(sch, info.block_rv, info.iters[spatial - 1].var):
            _schedule_strided_block(sch, info, spatial)
        else:
            _schedule_block(sch, info, spatial, lanes)
        scheduled = True
    return scheduled


def _iterations(iters, symbolic: int = 1 << 10) -> int:
    """The product of the extents of ``iters`` (a block's iterators); a symbolic extent counts as ``symbolic``."""
    count = 1
    for it in iters:
        extent = _constant(it.dom)
        count *= extent if extent is not None else symbolic
    return count


def _schedule_strided_block(sch, info, spatial: int) -> None:
    """Schedule a block that reads along its innermost spatial loop with a stride (see the module doc):
    parallel outer spatial loops, unrolled short reduction loops, the innermost loop left to LLVM."""
    s_loops = [it.loop_rv for it in info.iters[:spatial]]
    r_loops = [it.loop_rv for it in info.iters[spatial:]]
    if spatial > 1 and _iterations(info.iters) >= MIN_PARALLEL_WORK:
        sch.parallel(sch.fuse(*s_loops[:-1]) if spatial > 2 else s_loops[0])
    if r_loops and _iterations(info.iters[spatial:], symbolic=MAX_UNROLLED_TAPS + 1) <= MAX_UNROLLED_TAPS:
        for loop in r_loops:
            sch.unroll(loop)


def _schedule_block(sch, info, spatial: int, lanes: int) -> None:
    """Schedule one block whose first ``spatial`` loops are spatial and the rest reductions."""
    block = info.block_rv
    s_loops = [it.loop_rv for it in info.iters[:spatial]]
    r_loops = [it.loop_rv for it in info.iters[spatial:]]
    extents = [_constant(it.dom) for it in info.iters]
    lanes_loop = None
    length = _vector_length(extents[spatial - 1], lanes)
    if length:
        s_loops[-1], lanes_loop = sch.split(s_loops[-1], [None, length])
        if r_loops:  # the lanes innermost: each reduction step is one vector operation
            sch.reorder(*s_loops, *r_loops, lanes_loop)
    if _iterations(info.iters) >= MIN_PARALLEL_WORK:
        sch.parallel(sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0])
    if lanes_loop is not None:
        # vectorise while the block still holds its init (a reduction block); then split the init off
        # and vectorise its copy of the lanes too
        sch.vectorize(lanes_loop)
        if r_loops:
            init = sch.decompose_reduction(block, r_loops[0])
            sch.vectorize(sch.get_loops(init)[-1])


#: the largest filter (taps) of a grouped convolution whose pad is inlined and borders split off: a 3x3
#: depthwise convolution ran faster so (AVX-512, 2 cores: 64 x 56 x 56 42 -> 38 us, 32 x 112 x 112
#: 101 -> 64, 116 x 28 x 28 49 -> 33, 232 x 14 x 14 30 -> 25, stride 2 over 64 x 56 x 56 30 -> 28); a 5x5
#: one slower (96 x 28 x 28 40 -> 57 us, 96 x 14 x 14 16 -> 24): it keeps the pad of its own and TVM's
#: vectors
MAX_BORDERED_CONV_TAPS = 9

#: a window's rows or columns: (first output index whose window lies inside the input, one past the last,
#: the output extent); indices outside [first, last) read the pool's padding
Span = tuple[int, int, int]


def pool_window(sch, pad_block) -> tuple[str, tuple[Span, Span]] | None:
    """(name of the block reading ``pad_block``, its row and column spans) when the pad's only reader is a
    pool (TVM's legalised ``pool_max`` / ``pool_sum``: n, c, h, w, then the window's two reduction loops) or a
    grouped convolution with at most :data:`MAX_BORDERED_CONV_TAPS` taps (``group_conv2d_nchw``: a unit
    reduction over the group's one input channel, then the filter's two), whose window lies wholly inside
    the input for some rows and columns; else None.

    Such a pad is inlined into the pool and the pool's border rows and columns are split off
    (:func:`schedule_bordered_window`): only they test bounds. As a block of its own, the pad wrote a padded
    copy of the whole input before the pool read it.
    """
    from tvm import sym

    consumers = sch.get_consumers(pad_block)
    if len(consumers) != 1:
        return None
    pool = sch.get(consumers[0])
    pad = sch.get(pad_block)
    kinds = "".join("S" if int(v.iter_type) == 0 else "R" for v in pool.iter_vars)
    if not pool.name_hint.startswith(("pool_", "group_conv2d")) or not kinds.endswith("RR") or "RS" in kinds:
        return None
    spatial = kinds.index("R")
    filter_taps = [_constant(v.dom.extent) for v in pool.iter_vars[-2:]]
    too_big = None in filter_taps or filter_taps[0] * filter_taps[1] > MAX_BORDERED_CONV_TAPS
    if pool.name_hint.startswith("group_conv2d") and too_big:
        return None
    if spatial < 2 or any(_constant(v.dom.extent) != 1 for v in pool.iter_vars[spatial:-2]):
        return None  # a reduction other than the window's two taps must be a unit loop (a depthwise conv's)
    padded = pad.writes[0].source
    (source,) = pad.reads
    reads = [r for r in pool.reads if r.source.same_as(padded)]
    if len(reads) != 1 or len(pad.iter_vars) < 2:
        return None
    spans = []
    for axis in (-2, -1):  # rows, columns: the last two axes of every buffer, the pool's last spatial loops
        out_var, tap_var = pool.iter_vars[spatial + axis].var, pool.iter_vars[axis].var
        # the pool reads padded[.., out * stride + tap * dilation]; the pad reads source[.., i - before]
        found = sym.detect_linear_equation(reads[0].region[axis].min, [out_var, tap_var])
        stride, dilation, offset = (_constant(v) for v in found) if len(found) == 3 else (None,) * 3
        found = sym.detect_linear_equation(source.region[axis].min, [pad.iter_vars[axis].var])
        unit, shift = (_constant(v) for v in found) if len(found) == 2 else (None,) * 2
        size = _constant(source.source.shape[axis])
        outputs, taps = (_constant(pool.iter_vars[k].dom.extent) for k in (spatial + axis, axis))
        if None in (stride, dilation, offset, unit, shift, size, outputs, taps) or (unit, offset) != (1, 0) or stride < 1:
            return None
        before = -shift
        if before < 0:  # a "pad" that crops
            return None
        first = min(outputs, -(-before // stride))
        last_start = size - 1 + before - (taps - 1) * dilation  # the last padded-input start whose window fits
        end = min(outputs, last_start // stride + 1) if last_start >= 0 else 0
        if end <= first:
            return None
        spans.append((first, end, outputs))
    return pool.name_hint, (spans[0], spans[1])


def schedule_bordered_window(sch, info, spatial: int, window: tuple[Span, Span]) -> None:
    """Schedule a pool whose pad was inlined (:func:`pool_window`), its loops ``spatial`` spatial ones (the
    last two the output rows and columns) then the window's two: parallel over the outer spatial loops
    (batch and channels; a unit batch has no loop), the output rows and then the columns split into border /
    interior / border loops, the window's taps unrolled, and the innermost loop left to LLVM (as
    :func:`_schedule_strided_block` does). Lowering folds the interior's bounds tests away: its loop bounds
    prove every index inside the input. Unrolled, a border block's taps keep only the tests they need.

    Measured on AVX-512 (2 cores, single kernels; before: a padded copy of the input, then the pool):
    max pool 3x3 / 2 over 64 x 112 x 112 170 -> 64 us, avg pool (padding excluded) 200 -> 79 us; 3x3 / 1
    over 192 x 28 x 28 max 40 -> 29 us, avg 62 -> 46 us; over 256 x 14 x 14 avg 25 -> 22 us.
    """
    loops = [it.loop_rv for it in info.iters]
    outer, rows = loops[:spatial - 2], loops[spatial - 2]
    if outer and _iterations(info.iters) >= MIN_PARALLEL_WORK:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    row_blocks, middle = _partition(sch, info.block_rv, rows, window[0])
    interior = row_blocks.pop(middle)  # replaced by the blocks of its column ranges
    reductions = len(info.iters) - spatial
    column_blocks, _ = _partition(sch, interior, sch.get_loops(interior)[-reductions - 1], window[1])
    if _iterations(info.iters[spatial:], symbolic=MAX_UNROLLED_TAPS + 1) <= MAX_UNROLLED_TAPS:
        for block in row_blocks + column_blocks:  # the borders too: their bounds tests then fold per tap
            for loop in sch.get_loops(block)[-2:]:
                sch.unroll(loop)


def _partition(sch, block, loop, span: Span):
    """Split ``loop`` (of ``block``) into its border and interior ranges (``span``); returns (the blocks of
    every range, the interior's index among them). Nothing is split when the whole loop is interior."""
    first, end, extent = span
    if first == 0 and end == extent:
        return [block], 0
    sizes = [size for size in (first, end - first, extent - end) if size]
    parts = sch.loop_partition(loop, sizes[:-1])  # the last range is what the given sizes leave
    blocks = [sch.get_child_blocks(part)[0] for part in parts]
    return blocks, 1 if first else 0
