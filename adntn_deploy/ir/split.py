"""Split a generator at its top contraction: ``W = scale * sigma(L R^T)`` with two thin factor matrices.

Every family declares the *split layout* (docs/generators.md): the last contraction of the program joins
a tensor over the output modes with a tensor over the input modes through the bond(s) between them. This
module finds that contraction in a planned program and turns its two operands into factor programs:

    L: (out, rank)  from the steps that build the output side (with the top core, where the plan put it)
    R: (in,  rank)  from the steps that build the input side

so that ``W.reshape(out, in) == scale * sigma(L @ R.T)``. Streamed weights (``compile --weights stream``)
run a layer from L and R without ever allocating W: with an identity ``sigma`` the product factors
exactly (``x W^T = scale * (x R) L^T``); otherwise a fused kernel generates W tile by tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from adntn_deploy.ir.activations import get_activation
from adntn_deploy.ir.program import Core, GeneratorError, GeneratorIR, Step


@dataclass(frozen=True)
class Factor:
    """One side of a split weight: a (rows, rank) matrix computed from some of the generator's cores.

    ``ir`` is the program computing it (its ``weight_shape`` is (rows, rank)), or None when the side is a
    single core, ``core``, used as it is: transposed by ``permutation`` and reshaped to (rows, rank).
    """

    rows: int
    rank: int
    ir: GeneratorIR | None
    core: Core | None
    permutation: tuple[int, ...]

    @property
    def core_names(self) -> tuple[str, ...]:
        """Names of the generator cores this factor reads, in the order its program takes them."""
        return self.ir.core_names if self.ir is not None else (self.core.name,)  # type: ignore[union-attr]

    def numpy(self, cores: Mapping[str, np.ndarray]) -> np.ndarray:
        """The factor matrix (rows, rank) in the cores' dtype."""
        from adntn_deploy.ir.executors import generate_numpy

        if self.ir is not None:
            return generate_numpy(self.ir, cores)
        return np.asarray(cores[self.core.name]).transpose(self.permutation).reshape(self.rows, self.rank)  # type: ignore[union-attr]


@dataclass(frozen=True)
class SplitGenerator:
    """A generator as ``W = scale * activation(left @ right.T)``, reshaped to ``weight_shape``."""

    left: Factor
    right: Factor
    activation: str
    scale: float
    weight_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        """Size of the contracted bond(s) between the two sides."""
        return self.left.rank

    @property
    def factor_elements(self) -> int:
        """Elements of both factor matrices: what a streamed layer keeps in memory instead of the weight."""
        return self.left.rows * self.rank + self.right.rows * self.rank

    def dense_numpy(self, cores: Mapping[str, np.ndarray]) -> np.ndarray:
        """The dense weight rebuilt from the factors (for tests and reference checks)."""
        left, right = self.left.numpy(cores), self.right.numpy(cores)
        weight = get_activation(self.activation).numpy(left @ right.T) * np.asarray(self.scale, dtype=left.dtype)
        return weight.reshape(self.weight_shape)


def _closure(ir: GeneratorIR, name: str) -> list[Step]:
    """The steps needed to compute ``name``, in program order."""
    producers = {s.output: s for s in ir.steps}
    needed: set[str] = set()
    stack = [name]
    while stack:
        current = stack.pop()
        if current in producers and current not in needed:
            needed.add(current)
            stack.extend((producers[current].lhs, producers[current].rhs))
    return [s for s in ir.steps if s.output in needed]


def factor_of(ir: GeneratorIR, operand: str, subscripts: str, physical: list[str], bonds: list[str], label: str) -> Factor:
    """Factor for ``operand`` (indexed by ``subscripts``): rows = ``physical`` in weight order, cols = ``bonds``.

    The rows flatten ``physical`` left-major, the columns ``bonds``; ``label`` names the factor in its
    program's metadata.
    """
    shape = dict(zip(subscripts, ir.shape_of(operand)))
    order = physical + bonds
    permutation = tuple(subscripts.index(s) for s in order)
    rows = math.prod(shape[s] for s in physical)
    rank = math.prod(shape[s] for s in bonds)
    steps = _closure(ir, operand)
    if not steps:
        core = next(c for c in ir.cores if c.name == operand)
        return Factor(rows, rank, None, core, permutation)
    used = {s.lhs for s in steps} | {s.rhs for s in steps}
    cores = tuple(c for c in ir.cores if c.name in used)
    sub = GeneratorIR(
        family=ir.family,
        weight_shape=(rows, rank),
        cores=cores,
        steps=tuple(steps),
        output_permutation=permutation,
        output_scale=1.0,
        metadata={"factor_of": label},
    )
    return Factor(rows, rank, sub, None, permutation)


def split_generator(ir: GeneratorIR) -> SplitGenerator:
    """Split ``ir`` at its last contraction into output-side and input-side factors.

    Raises:
        GeneratorError: the last contraction does not separate output modes from input modes (a program
            not built in the split layout, or one planned so that the sides meet earlier); the message
            says which indices mix.
    """
    spec = ir.metadata.get("spec") if isinstance(ir.metadata, dict) else None
    if isinstance(spec, dict) and spec.get("layout") == "operator":
        raise GeneratorError(
            f"this {ir.family} generator uses the operator layout, whose weight is a sum of Kronecker products, not "
            "a product of output and input factors: split it with adntn_deploy.ir.kron.kronecker_split"
        )
    last = ir.steps[-1]
    lhs, rhs, out = last.subscripts
    result_shape = ir.shape_of(ir.result)
    permuted = [out[p] for p in ir.output_permutation]
    dims = [result_shape[p] for p in ir.output_permutation]
    out_dim = ir.weight_shape[0]
    shared = set(lhs) & set(rhs)
    if shared & set(out):
        raise GeneratorError(
            f"the last contraction of this {ir.family} generator keeps index(es) {sorted(shared & set(out))} on both "
            "sides; it cannot be split into output and input factors (stream it with --weights load instead)"
        )
    for k in range(1, len(permuted) + 1):
        if math.prod(dims[:k]) != out_dim:
            continue
        out_side, in_side = permuted[:k], permuted[k:]
        for (a_name, a_subs), (b_name, b_subs) in (((last.lhs, lhs), (last.rhs, rhs)), ((last.rhs, rhs), (last.lhs, lhs))):
            bonds_a = [s for s in a_subs if s in shared]
            if set(a_subs) - set(bonds_a) == set(out_side) and set(b_subs) - set(bonds_a) == set(in_side):
                if set(b_subs) != set(in_side) | set(bonds_a):
                    continue
                left = factor_of(ir, a_name, a_subs, out_side, bonds_a, "left")
                right = factor_of(ir, b_name, b_subs, in_side, bonds_a, "right")
                return SplitGenerator(left, right, last.activation, ir.output_scale, ir.weight_shape)
    raise GeneratorError(
        f"the last contraction of this {ir.family} generator ({last.equation}) does not separate output modes from "
        "input modes, so its weight cannot be streamed; compile it with --weights load"
    )
