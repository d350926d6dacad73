"""Our MetaSchedule rules for CPU kernels, one module each, and the passes that apply them.

A rule owns the blocks annotated ``schedule_rule = <its name>``. Each rule module provides:

* ``RULE_NAME``; ``schedule(sch, block)``: the searchable schedule (MetaSchedule samples its decisions,
  registered as the global function ``s_tir.meta_schedule.cpu.<name>``); ``schedule_default(sch, block,
  target)``: the schedule an untuned kernel gets;
* optionally ``OP_NAME`` and ``rewrite(builder, call, target, weight_only)``: the Relax operator the rule
  takes over, rewritten into its kernel on the imported module when the operator's weight is known at load.

Rules: :mod:`.packed_dense` (matmuls), :mod:`.packed_conv2d` (convolutions), :mod:`.pointwise_conv2d` (the 1x1
convolutions that :mod:`.packed_conv2d`'s rewrite hands it), :mod:`.streamed_dense` (the
fused kernel of ``--weights stream``). Order in compile / tune:
:func:`prepack` (imported module) -> :func:`fuse_kernels` (legalise, fuse) -> tuning records ->
:func:`schedule_untuned` (every kernel of ours the records did not schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from adntn_deploy.compiler.schedules import packed_conv2d, packed_dense, pointwise_conv2d, streamed_dense
from adntn_deploy.compiler.schedules.common import root_blocks
from adntn_deploy.compiler.schedules.generic_cpu import schedule_generic

#: the key under which :func:`schedule_untuned` counts kernels given the generic CPU schedule
GENERIC = "generic_cpu"


@dataclass(frozen=True)
class ScheduleRule:
    """One rule: its name, its searchable and default schedules, and the Relax op it rewrites (if any)."""

    name: str
    schedule: Callable[..., Any]
    schedule_default: Callable[..., Any]
    op_name: str | None = None
    rewrite: Callable[..., Any] | None = None
    #: bias / activation fuse into the kernel: FuseTIR then makes new functions whose other blocks must
    #: be left to this rule (see :func:`fuse_kernels`)
    fusable: bool = False


RULES: dict[str, ScheduleRule] = {
    module.RULE_NAME: ScheduleRule(module.RULE_NAME, module.schedule, module.schedule_default,
                                   getattr(module, "OP_NAME", None), getattr(module, "rewrite", None),
                                   fusable=getattr(module, "FUSABLE", hasattr(module, "rewrite")))
    for module in (packed_dense, packed_conv2d, pointwise_conv2d, streamed_dense)
}


def register_schedule_rules() -> None:
    """Register every rule's searchable schedule with MetaSchedule for CPU targets. Idempotent."""
    import tvm

    for rule in RULES.values():
        name = f"s_tir.meta_schedule.cpu.{rule.name}"
        if tvm.get_global_func(name, allow_missing=True) is None:
            tvm.register_global_func(name, lambda sch, block, schedule=rule.schedule: [schedule(sch, block)])


def _weight_only_vars(func) -> set:
    """Parameters of ``func`` beyond its ``num_input`` runtime inputs (the lifted weights)."""
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    if num_input is None:
        return set()
    return set(func.params[int(num_input):])


def prepack(mod, target) -> tuple[Any, dict[str, int], list[str]]:
    """Rewrite every operator of ``mod["main"]`` that a rule takes over and whose weight is known at load.

    Returns (module, {rule name: operators rewritten}, notes): one note per operator of a rule's kind
    left to TVM's generic schedule, saying why. Targets other than CPU (llvm) are returned unchanged.
    """
    counts = {name: 0 for name, rule in RULES.items() if rule.rewrite is not None}
    if target.kind.name != "llvm":
        return mod, counts, []
    from tvm import ir, relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    by_op = {ir.Op.get(rule.op_name): rule for rule in RULES.values() if rule.rewrite is not None}

    @mutator
    class Prepack(PyExprMutator):
        def __init__(self, module, weights):
            super().__init__(module)
            self.weights = set(weights)
            self.notes: list[str] = []

        def weight_only(self, expr) -> bool:
            return all(v in self.weights for v in relax.analysis.free_vars(expr))

        def visit_var_binding_(self, binding):
            value = self.visit_expr(binding.value)
            if self.weight_only(binding.value) and not isinstance(binding.value, relax.Function):
                self.weights.add(binding.var)
            elif isinstance(value, relax.Call) and isinstance(value.op, ir.Op) and value.op in by_op:
                rule = by_op[value.op]
                rewritten, why = rule.rewrite(self.builder_, value, target, self.weight_only)
                if rewritten is None:
                    self.notes.append(f"{value.op.name} -> {_var_name(binding.var)}: generic schedule ({why})")
                else:
                    value = rewritten
                    counts[rule.name] += 1
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))

    main = mod["main"]
    rewriter = Prepack(mod, _weight_only_vars(main))
    new_main = rewriter.visit_expr(main)
    out = rewriter.builder_.get()
    out["main"] = new_main
    return out, counts, rewriter.notes


def _var_name(var) -> str:
    vid = getattr(var, "vid", None)
    return str(getattr(vid, "name_hint", None) or getattr(var, "name_hint", None) or var)


def rule_of(sch, block) -> str:
    """The ``schedule_rule`` annotation of ``block`` in schedule ``sch`` ("" when it has none)."""
    return str(sch.get(block).annotations.get("schedule_rule", ""))


def _schedule_defaults(sch, target) -> list[str]:
    """Give every block of ours in ``sch`` its rule's default schedule; returns the rules applied, in order
    (empty when ``sch`` has no root block or none of our blocks)."""
    try:
        ours = [(b, name) for b in root_blocks(sch) if (name := rule_of(sch, b)) in RULES]
    except Exception:  # noqa: BLE001 - a function without a root block is not ours
        return []
    for block, name in ours:
        RULES[name].schedule_default(sch, block, target)
    return [name for _, name in ours]


def _generic(func, target):
    """``func`` under the generic CPU schedule (:mod:`.generic_cpu`), or None when that schedules nothing
    or fails: the kernel then keeps TVM's loops, as before the generic schedule existed."""
    from tvm import s_tir

    if str(target.kind.name) != "llvm":
        return None
    sch = s_tir.Schedule(func, error_render_level="none")
    try:
        return sch if schedule_generic(sch, target) else None
    except Exception:  # noqa: BLE001 - a form the primitives refuse: leave the kernel unscheduled
        return None


def default_schedule(func, target):
    """The traced schedule that :func:`schedule_untuned` gives ``func`` (a PrimFunc or IRModule): its
    rules' defaults for a kernel of ours, else the generic CPU schedule; None when neither applies.

    Tuning measures it beside the searched candidates, so a database always holds it and a compile with
    records never picks a kernel slower than the one a compile without records gets.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if _schedule_defaults(sch, target):
        return sch
    return _generic(func, target)


def fuse_kernels(mod, target):
    """The module as the build sees it and as tuning tasks are extracted from it: inference ops
    decomposed, legalised and fused, within ``target``.

    Functions holding a block of a fusable rule then get ``schedule_rule = "None"`` on their root and
    other blocks. FuseTIR builds new PrimFuncs (bias and activation fused after the product) and drops
    annotations on the root block; without this MetaSchedule's ParallelizeVectorizeUnroll would annotate
    the root and its postprocessor would reject the loops our rule already parallelised and vectorised.
    """
    import tvm
    from tvm import s_tir
    from tvm.relax import transform
    from tvm.relax.pipeline import zero_pipeline

    passes = tvm.transform.Sequential([transform.DecomposeOpsForInference(), transform.CanonicalizeBindings(), zero_pipeline()])
    with target:
        mod = passes(mod)
    fusable = {name for name, rule in RULES.items() if rule.fusable}
    for gvar, func in list(mod.functions_items()):
        if type(func).__name__ != "PrimFunc":
            continue
        sch = s_tir.Schedule(func)
        try:
            blocks = root_blocks(sch)
        except Exception:  # noqa: BLE001 - a function without a root block is not ours
            continue
        if not any(rule_of(sch, b) in fusable for b in blocks):
            continue
        sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")
        for block in blocks:
            if rule_of(sch, block) not in fusable:
                sch.annotate(block, "schedule_rule", "None")
        mod[gvar] = sch.mod["main"]
    return mod


def is_scheduled(func) -> bool:
    """Whether a PrimFunc already carries a schedule (from the database or one of our defaults)."""
    attrs = func.attrs or {}
    # the attribute's namespace moved between TVM releases (tir. -> tirx. / s_tir.)
    return any(str(k).endswith("is_scheduled") and bool(attrs[k]) for k in attrs.keys())


def count_scheduled(mod) -> tuple[int, int]:
    """(kernels that carry a schedule, all kernels) in a fused module."""
    funcs = [f for _, f in mod.functions.items() if type(f).__name__ == "PrimFunc"]
    return sum(1 for f in funcs if is_scheduled(f)), len(funcs)


def schedule_untuned(mod, target) -> tuple[Any, dict[str, int]]:
    """Give every kernel of ours that no tuning record scheduled its rule's default schedule, and (on CPU
    targets) every other unscheduled kernel the generic CPU schedule.

    Returns (module, {rule name or :data:`GENERIC`: kernels scheduled here}).

    Raises:
        StreamCompileError: a rule without a schedule for this target (the streamed kernel off CPU).
    """
    from tvm import s_tir

    counts = {name: 0 for name in RULES} | {GENERIC: 0}
    for gvar, func in list(mod.functions_items()):
        if type(func).__name__ != "PrimFunc" or is_scheduled(func):
            continue
        sch = s_tir.Schedule(func)
        applied = _schedule_defaults(sch, target)
        for name in applied:
            counts[name] += 1
        if not applied and (sch := _generic(func, target)) is not None:
            counts[GENERIC] += 1
            applied = [GENERIC]
        if applied:
            mod[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod, counts

__all__ = ["GENERIC", "RULES", "ScheduleRule", "count_scheduled", "default_schedule", "fuse_kernels", "is_scheduled",
           "prepack", "register_schedule_rules", "rule_of", "schedule_untuned"]
