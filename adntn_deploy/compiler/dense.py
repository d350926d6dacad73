"""Packed dense kernels for CPU targets: ``y = x W`` with W pre-packed into vector-width panels at load.

Untuned TVM matmuls on CPU are naive loops, and MetaSchedule's generic search needs hundreds of trials per
shape to approach a BLAS. A dense layer whose weight is known before the first call (a model parameter,
a generated weight, a streamed factor) does not need a search: the weight can be re-laid out once, the
way BLAS libraries pack their B operand, and then a fixed register-blocked kernel runs near peak.

Rewrite (:func:`prepack_dense`, on the imported Relax module, before weight-only work is lifted):

    y = matmul(x, w)            x: (M, K) activations; w: (K, N), computed from parameters only
 -> wp = layout_transform(w)    wp[p, k, j] = w[k, p * bn + j]: N cut into panels of bn = 2 vectors
    y = call_tir(packed_dense, x, wp)

``wp`` depends on parameters only, so LiftTransformParams moves the packing into
``main_transform_params`` (``--weights load`` / ``stream``: once, on the device, at load) and FoldConstant
folds it into the library (``--weights fold``). The kernel reads each panel contiguously.

Kernel (:func:`schedule_packed`): for each block of ``rows x panels`` -- the parallel loop -- keep the
accumulators in vector registers over the whole reduction (each row broadcast against 2 vectors of each
panel per k), then apply the fused epilogue (bias, activation) while writing them back. The block shape
is a MetaSchedule decision of the custom rule ``adntn_packed_dense`` (registered by
:func:`adntn_deploy.compiler.tuning.register_schedule_rules`; ``adntn-deploy tune`` searches it,
``compile`` replays the database); untuned kernels get :func:`default_blocks`, which fills half the
vector registers.

Only static 2-D activations in float32 are rewritten; other matmuls (dynamic batch, N-d inputs, widths
that no panel divides) keep the generic path.
"""

from __future__ import annotations

from typing import Any

RULE_NAME = "adntn_packed_dense"
BLOCK_NAME = "packed_dense"
_OUT_EWISE_FUSABLE = 4  # relax OpPatternKind.kOutEWiseFusable: bias / activation fuse into the kernel


def vector_shape(target) -> tuple[int, int]:
    """(float32 lanes per vector register, vector registers) of a CPU ``target``."""
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "")) if target.attrs else ""
    if not triple or triple.startswith("x86_64"):
        if codegen.target_has_features("avx512f", target):
            return 16, 32
        if codegen.target_has_features("avx2", target):
            return 8, 16
        return 4, 16
    if triple.startswith("aarch64"):
        return 4, 32
    return 4, 16  # armv7 NEON (16 q registers); riscv64 without V falls back to scalar code either way


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


def default_blocks(target, rows: int, panels: int, width: int, threads: int = 2) -> tuple[int, int]:
    """(rows, panels) per register block of an untuned kernel.

    The accumulators (rows x panels x vectors per panel) fill at most half the vector registers; rows
    come first (each row reuses the panel's loads), then panels, as long as ``threads`` x 4 blocks remain
    for the parallel loop.
    """
    lanes, registers = vector_shape(target)
    budget = max(1, registers // 2 // max(1, width // lanes))
    row_block = _largest_divisor(rows, min(budget, 8))
    panel_block = 1
    for candidate in range(1, 9):
        if panels % candidate == 0 and row_block * candidate <= budget and panels // candidate * (rows // row_block) >= 4 * threads:
            panel_block = candidate
    return row_block, panel_block


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


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


def _weight_only_vars(func) -> set:
    """Parameters of ``func`` beyond its ``num_input`` runtime inputs (the lifted weights)."""
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    if num_input is None:
        return set()
    return set(func.params[int(num_input):])


def prepack_dense(mod, target):
    """Rewrite every eligible ``matmul(x, w)`` of ``mod["main"]`` into a packed-dense call (see module doc).

    Returns (module, number of matmuls rewritten). Targets other than CPU (llvm) are returned unchanged.
    """
    if target.kind.name != "llvm":
        return mod, 0
    from tvm import ir, relax, te, tirx
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul_op = ir.Op.get("relax.matmul")

    def static_shape(expr, ndim: int) -> list[int] | None:
        info = expr.ty
        if not isinstance(info, relax.TensorType) or info.ndim != ndim or str(info.dtype) != "float32":
            return None
        if info.shape is None or not hasattr(info.shape, "values"):
            return None
        try:
            return [int(v) for v in info.shape.values]
        except (TypeError, ValueError):  # a symbolic dimension
            return None

    @mutator
    class Prepack(PyExprMutator):
        def __init__(self, module, weights):
            super().__init__(module)
            self.weights = set(weights)
            self.rewritten = 0

        def weight_only(self, expr) -> bool:
            return all(v in self.weights for v in relax.analysis.free_vars(expr))

        def visit_var_binding_(self, binding):
            value = self.visit_expr(binding.value)
            if self.weight_only(binding.value) and not isinstance(binding.value, relax.Function):
                self.weights.add(binding.var)
            elif isinstance(value, relax.Call) and value.op == matmul_op and len(value.args) == 2:
                rewritten = self.rewrite(value)
                value = value if rewritten is None else rewritten
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))

        def rewrite(self, call):
            x, w = call.args
            x_shape, w_shape = static_shape(x, 2), static_shape(w, 2)
            if x_shape is None or w_shape is None or self.weight_only(x) or not self.weight_only(w):
                return None
            depth, out_dim = w_shape
            width = panel_width(target, out_dim)
            if width is None or x_shape[1] != depth:
                return None
            packed = self.builder_.emit(
                relax.op.layout_transform(w, lambda k, n: (n // width, k, n % width), pad_value=0.0))
            panels = -(-out_dim // width)
            # int64 extents like the legalised ops around it: FuseTIR matches buffers across kernels by type
            x_ph = te.placeholder([tirx.IntImm("int64", d) for d in x_shape], "float32", "x")
            wp_ph = te.placeholder([tirx.IntImm("int64", d) for d in (panels, depth, width)], "float32", "wp")
            func = te.create_prim_func([x_ph, wp_ph, packed_dense_te(x_ph, wp_ph, out_dim)])
            # emit_te would drop the "main" symbol create_prim_func gives; two kernels sharing it confuse FuseTIR
            func = func.without_attr("global_symbol").with_attr("op_pattern", _OUT_EWISE_FUSABLE)
            gvar = self.builder_.add_func(func, "adntn_packed_dense")
            self.rewritten += 1
            return relax.call_tir(gvar, [x, packed], relax.TensorType((x_shape[0], out_dim), "float32"))

    main = mod["main"]
    rewriter = Prepack(mod, _weight_only_vars(main))
    new_main = rewriter.visit_expr(main)
    out = rewriter.builder_.get()
    out["main"] = new_main
    return out, rewriter.rewritten


def _blocks(sch):
    return sch.get_child_blocks(sch.get_sblock("root"))


def _is_packed(sch, block) -> bool:
    return str(sch.get(block).annotations.get("schedule_rule", "")) == RULE_NAME


def annotate_fused(mod):
    """Leave fused packed-dense kernels to our rule alone: their root and epilogue blocks get no other rule.

    FuseTIR builds new PrimFuncs (bias and activation fused after the product), dropping annotations on the
    root block; without this MetaSchedule's ParallelizeVectorizeUnroll would annotate the root and its
    postprocessor would reject the loops our rule already parallelised and vectorised.
    """
    from tvm import s_tir

    for gvar, func in list(mod.functions_items()):
        if type(func).__name__ != "PrimFunc":
            continue
        sch = s_tir.Schedule(func)
        try:
            blocks = _blocks(sch)
        except Exception:  # noqa: BLE001 - a function without a root block is not ours
            continue
        if not any(_is_packed(sch, b) for b in blocks):
            continue
        sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")
        for block in blocks:
            if not _is_packed(sch, block):
                sch.annotate(block, "schedule_rule", "None")
        mod[gvar] = sch.mod["main"]
    return mod


def _panel_width_of(sch, block) -> int:
    for region in sch.get(block).reads:
        if len(region.source.shape) == 3:
            return int(region.source.shape[2])
    raise ValueError("not a packed-dense block: it reads no packed (3-D) weight")


def schedule_packed(sch, block, row_block: int | None = None, panel_block: int | None = None):
    """Register-block the ``packed_dense`` ``block`` and write its fused epilogue from the accumulators.

    A register block is ``row_block`` rows x ``panel_block`` panels: that many independent accumulator
    chains per k, which hides the FMA latency (one row and one panel would leave 2 chains). None samples
    each (MetaSchedule decisions: divisors of the rows up to 16, of the panels up to 8). Returns ``sch``.
    """
    width = _panel_width_of(sch, block)
    rows_loop, cols_loop, red_loop = sch.get_loops(block)[-3:]
    row_factors = (sch.sample_perfect_tile(rows_loop, n=2, max_innermost_factor=16) if row_block is None
                   else [None, row_block])
    row_outer, row_inner = sch.split(rows_loop, row_factors)
    panel, lane = sch.split(cols_loop, [None, width])
    panel_factors = (sch.sample_perfect_tile(panel, n=2, max_innermost_factor=8) if panel_block is None
                     else [None, panel_block])
    panel_outer, panel_inner = sch.split(panel, panel_factors)
    sch.reorder(panel_outer, row_outer, red_loop, panel_inner, row_inner, lane)
    writeback = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(writeback, row_outer, preserve_unit_loops=True)
    # bias, activation...: inline a chain of single consumers into the write-back so they run on the
    # accumulators. Where the chain forks (gelu reads its input twice) the rest stays after the loop nest:
    # inlining one branch would leave the other reading a buffer that is no longer written.
    consumers = sch.get_consumers(writeback)
    while len(consumers) == 1:
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001 - not elementwise (a reduction, a reshape): leave it after the loop nest
            break
        consumers = sch.get_consumers(writeback)
    # The rest of a forking epilogue runs tile by tile right after the write-back, inside the parallel loop
    # and vectorised, instead of serially over the whole output after the loop nest
    followers = _blocks_after(sch, writeback) if len(consumers) > 1 else []
    for follower in followers:
        try:
            sch.reverse_compute_at(follower, row_outer, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - not computable per tile (a reduction over the output): stop here
            break
        _try_vectorize(sch, sch.get_loops(follower)[-1])
    sch.parallel(sch.fuse(panel_outer, row_outer))
    sch.unroll(panel_inner)
    sch.unroll(row_inner)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, red_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(writeback)[-1])
    return sch


def _blocks_after(sch, block) -> list:
    """The blocks that follow ``block`` in its function, in program order."""
    blocks = list(_blocks(sch))
    names = [sch.get(b).name_hint for b in blocks]
    return blocks[names.index(sch.get(block).name_hint) + 1:]


def _try_vectorize(sch, loop) -> None:
    """Vectorise ``loop`` when its extent is a constant (a tile clipped by the output's edge is not)."""
    from tvm import tirx

    if isinstance(sch.get(loop).extent, tirx.IntImm):
        sch.vectorize(loop)


def schedule_untuned(mod, target) -> tuple[Any, int]:
    """Give every packed-dense kernel without a schedule from the database the default row block.

    Returns (module, kernels scheduled here).
    """
    from tvm import s_tir

    from adntn_deploy.compiler.tuning import is_scheduled

    scheduled = 0
    for gvar, func in list(mod.functions_items()):
        if type(func).__name__ != "PrimFunc":
            continue
        if is_scheduled(func):
            continue
        sch = s_tir.Schedule(func)
        try:
            blocks = [b for b in _blocks(sch) if _is_packed(sch, b)]
        except Exception:  # noqa: BLE001 - no root block
            continue
        threads = int(target.attrs.get("num-cores", 1)) if target.attrs else 1
        for block in blocks:
            rows, cols = (int(sch.get(loop).extent) for loop in sch.get_loops(block)[-3:-1])
            width = _panel_width_of(sch, block)
            schedule_packed(sch, block, *default_blocks(target, rows, -(-cols // width), width, threads))
        if blocks:
            mod[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            scheduled += 1
    return mod, scheduled
