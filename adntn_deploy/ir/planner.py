"""Contraction planning: split one multi-operand contraction into a sequence of pairwise contractions.

Path optimizers live in a registry (as in opt_einsum). Each takes the operands' index tuples, the output
indices and the index sizes, and returns an SSA path: a list of ``(i, j)`` pairs where operands are
numbered 0..n-1 and each contraction's result takes the next free number.

``min-peak`` (the default) is an exact dynamic program over operand subsets that minimises the largest
intermediate first and FLOPs second -- the order that matters for generating big weights on small devices.
Above :data:`MAX_EXACT_OPERANDS` operands it falls back to opt_einsum's greedy search.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import opt_einsum

from adntn_deploy.errors import GeneratorError

Indices = tuple[str, ...]
SSAPath = list[tuple[int, int]]
PathOptimizer = Callable[[Sequence[Indices], Indices, dict[str, int]], SSAPath]

MAX_EXACT_OPERANDS = 10


def _result_indices(group: frozenset[int], operands: Sequence[Indices], output: Indices) -> frozenset[str]:
    inside = set().union(*(operands[i] for i in group))
    outside = set(output).union(*(operands[i] for i in range(len(operands)) if i not in group))
    return frozenset(inside & outside)


def min_peak_path(operands: Sequence[Indices], output: Indices, sizes: dict[str, int]) -> SSAPath:
    """Exact subset DP minimising (largest intermediate, total FLOPs); greedy above MAX_EXACT_OPERANDS."""
    n = len(operands)
    if n > MAX_EXACT_OPERANDS:
        return opt_einsum_path("greedy")(operands, output, sizes)
    full = frozenset(range(n))
    # best[subset] = (peak elements, flops, tree) where tree is an int or a (left, right) pair
    best: dict[frozenset[int], tuple[int, int, object]] = {frozenset([i]): (0, 0, i) for i in range(n)}
    result = {s: _result_indices(s, operands, output) for s in best}
    for size in range(2, n + 1):
        for combo in _subsets_of_size(n, size):
            res = _result_indices(combo, operands, output)
            out_elems = math.prod(sizes[s] for s in res)
            choice = None
            members = sorted(combo)
            first = members[0]
            rest = members[1:]
            # enumerate splits where ``left`` contains the smallest member, so each split is seen once
            for mask in range(0, 1 << len(rest)):
                left = frozenset([first] + [rest[k] for k in range(len(rest)) if mask >> k & 1])
                right = combo - left
                if not right or left not in best or right not in best:
                    continue
                lp, lf, lt = best[left]
                rp, rf, rt = best[right]
                loop = set(result[left]) | set(result[right])
                loop_elems = math.prod(sizes[s] for s in loop)
                flops = lf + rf + (2 * loop_elems if loop - res else loop_elems)
                cand = (max(lp, rp, out_elems), flops, (lt, rt))
                if choice is None or cand[:2] < choice[:2]:
                    choice = cand
            if choice is not None:
                best[combo] = choice
                result[combo] = res
    tree = best[full][2]
    path: SSAPath = []
    counter = [n]

    def emit(node: object) -> int:
        if isinstance(node, int):
            return node
        left, right = node  # type: ignore[misc]
        i, j = emit(left), emit(right)
        path.append((i, j))
        counter[0] += 1
        return counter[0] - 1

    emit(tree)
    return path


def _subsets_of_size(n: int, size: int):
    from itertools import combinations

    for c in combinations(range(n), size):
        yield frozenset(c)


def opt_einsum_path(strategy: str) -> PathOptimizer:
    """Wrap an opt_einsum path strategy ('greedy', 'optimal', 'dp', ...) as an SSA path optimizer."""

    def optimizer(operands: Sequence[Indices], output: Indices, sizes: dict[str, int]) -> SSAPath:
        symbols: dict[str, str] = {}
        for idx in list(output) + [i for op in operands for i in op]:
            symbols.setdefault(idx, opt_einsum.get_symbol(len(symbols)))
        eq = ",".join("".join(symbols[i] for i in op) for op in operands) + "->" + "".join(symbols[i] for i in output)
        shapes = [tuple(sizes[i] for i in op) for op in operands]
        linear, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=strategy)
        return [tuple(p) for p in opt_einsum.paths.linear_to_ssa(linear)]  # type: ignore[misc]

    return optimizer


PATH_OPTIMIZERS: dict[str, PathOptimizer] = {
    "min-peak": min_peak_path,
    "greedy": opt_einsum_path("greedy"),
    "optimal": opt_einsum_path("optimal"),
    "dp": opt_einsum_path("dp"),
}


def get_path_optimizer(name: str) -> PathOptimizer:
    """Return the registered path optimizer ``name``; GeneratorError listing the known ones otherwise."""
    try:
        return PATH_OPTIMIZERS[name]
    except KeyError:
        raise GeneratorError(f"unknown planner {name!r}: use one of {', '.join(PATH_OPTIMIZERS)}") from None
