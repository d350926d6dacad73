"""Split an operator-layout generator at its top join: ``W = scale * sigma(sum_b A_b (x) B_b)``.

In the operator layout (docs/generators.md) each site pairs an output mode with an input mode; the
first half of the sites forms the left half network, the rest the right, and the top node joins them over
one bond. Its last pairwise step therefore contracts a tensor over the left sites' (o, i) indices with a
tensor over the right sites' indices through the bond ``b``. Read as matrices,

    A_b: (O_L, I_L)  the left half (with the top core, where the plan put it) at bond value b
    B_b: (O_R, I_R)  the right half at bond value b

and the weight, rows (o_L, o_R) and columns (i_L, i_R) both left-major, is ``scale * sigma(sum_b A_b (x)
B_b)``. With an identity ``sigma``, ``y = W x`` never needs W: reshape ``x`` to ``X`` (I_L, I_R), then
``Y = scale * sum_b A_b X B_b^T`` (O_L, O_R) -- two small matrix products per bond value
(:meth:`KroneckerSplit.apply_numpy`, and the ONNX form in :mod:`adntn_deploy.onnx_export.streaming`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from adntn_deploy.ir.activations import get_activation
from adntn_deploy.ir.program import GeneratorError, GeneratorIR
from adntn_deploy.ir.split import Factor, factor_of


@dataclass(frozen=True)
class KroneckerSplit:
    """An operator-layout generator as ``W = scale * activation(sum_b A_b (x) B_b)``.

    ``left`` computes the (O_L * I_L, rank) matrix whose column b is A_b flattened (o_L major); ``right``
    likewise B_b. ``weight_shape`` is the layer's weight (Linear (out, in) or Conv (Cout, Cin, kh, kw));
    its rows are (o_L, o_R) and its flattened columns (i_L, i_R).
    """

    left: Factor
    right: Factor
    out_left: int
    in_left: int
    out_right: int
    in_right: int
    activation: str
    scale: float
    weight_shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        """Size of the bond between the halves: the number of Kronecker terms."""
        return self.left.rank

    @property
    def factor_elements(self) -> int:
        """Elements of both halves' matrices: what a streamed layer keeps instead of the weight."""
        return self.rank * (self.out_left * self.in_left + self.out_right * self.in_right)

    @property
    def dense_elements(self) -> int:
        """Elements of the dense weight this split stands in for."""
        return math.prod(self.weight_shape)

    def order_flops(self, rows: int, order: str) -> int:
        """FLOPs (multiply-add = 2) of ``y = W x`` for ``rows`` input vectors, contracting one half first.

        ``order`` "right" applies the B_b first (``X B_b^T``, then ``A_b (.)``); "left" the A_b first.
        """
        if order == "right":
            first = self.in_left * self.in_right * self.rank * self.out_right
            second = self.out_right * self.rank * self.in_left * self.out_left
        elif order == "left":
            first = self.in_right * self.in_left * self.rank * self.out_left
            second = self.out_left * self.rank * self.in_right * self.out_right
        else:
            raise ValueError(f"order must be 'left' or 'right', not {order!r}")
        return 2 * rows * (first + second)

    def best_order(self) -> str:
        """The half to apply first for the fewest FLOPs (ties: "right", which needs no input transpose).

        The orders differ by the intermediate they make, rows x rank x (I_L O_R or I_R O_L): for a 64 x 784
        left half and a 64 x 32 right half at rank 30 (VGG fc6) "left" needs 36% of the FLOPs.
        """
        return "left" if self.order_flops(1, "left") < self.order_flops(1, "right") else "right"

    def matmul_flops(self, rows: int) -> int:
        """FLOPs (multiply-add = 2) of ``y = W x`` for ``rows`` input vectors, in the cheaper order."""
        return self.order_flops(rows, self.best_order())

    def halves_numpy(self, cores: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) as arrays of shape (rank, O_L, I_L) and (rank, O_R, I_R), in the cores' dtype."""
        a = self.left.numpy(cores).reshape(self.out_left, self.in_left, self.rank).transpose(2, 0, 1)
        b = self.right.numpy(cores).reshape(self.out_right, self.in_right, self.rank).transpose(2, 0, 1)
        return a, b

    def dense_numpy(self, cores: Mapping[str, np.ndarray]) -> np.ndarray:
        """The dense weight rebuilt from the halves (for tests and reference checks)."""
        a, b = self.halves_numpy(cores)
        total = np.einsum("bpq,brs->prqs", a, b).reshape(self.out_left * self.out_right, self.in_left * self.in_right)
        weight = get_activation(self.activation).numpy(total) * np.asarray(self.scale, dtype=total.dtype)
        return weight.reshape(self.weight_shape)

    def apply_numpy(self, x: np.ndarray, cores: Mapping[str, np.ndarray]) -> np.ndarray:
        """``x @ W.T`` for ``x`` (rows, in) without forming W (identity top only).

        Raises:
            GeneratorError: a non-identity top activation (the weight then does not factor).
        """
        if self.activation != "identity":
            raise GeneratorError(f"a {self.activation} top activation does not factor into Kronecker terms")
        a, b = self.halves_numpy(cores)
        rows = x.shape[0]
        grid = x.reshape(rows, self.in_left, self.in_right)
        y = np.einsum("bpq,nqs,brs->npr", a, grid, b, optimize=True) * self.scale
        return y.reshape(rows, self.out_left * self.out_right)


def kronecker_split(ir: GeneratorIR) -> KroneckerSplit:
    """Split an operator-layout ``ir`` at its last contraction into its two halves' matrices.

    Raises:
        GeneratorError: ``ir`` is not in the operator layout, or its last contraction does not separate a
            leading block of sites from the rest (the message says which indices mix).
    """
    spec = ir.metadata.get("spec") if isinstance(ir.metadata, dict) else None
    if not (isinstance(spec, dict) and spec.get("layout") == "operator"):
        raise GeneratorError(f"this {ir.family} generator is not in the operator layout; split it with split_generator")
    last = ir.steps[-1]
    lhs, rhs, out = last.subscripts
    ordered = [out[p] for p in ir.output_permutation]
    sites = len(ordered) // 2
    outs, ins = ordered[:sites], ordered[sites:]
    sizes = dict(zip(out, ir.shape_of(ir.result)))
    bonds = sorted(set(lhs) & set(rhs))
    if not bonds or set(bonds) & set(out):
        raise GeneratorError(
            f"the last contraction of this {ir.family} generator ({last.equation}) does not join two halves over a "
            "bond; compile it with --weights load"
        )
    for (a_name, a_subs), (b_name, b_subs) in (((last.lhs, lhs), (last.rhs, rhs)), ((last.rhs, rhs), (last.lhs, lhs))):
        a_out = [s for s in outs if s in a_subs]
        a_in = [s for s in ins if s in a_subs]
        if a_out != outs[: len(a_out)] or a_in != ins[: len(a_in)] or not a_out:
            continue
        b_out, b_in = outs[len(a_out):], ins[len(a_in):]
        if set(b_subs) != set(b_out) | set(b_in) | set(bonds):
            continue
        bond_order = [s for s in a_subs if s in bonds]
        left = factor_of(ir, a_name, a_subs, a_out + a_in, bond_order, "left")
        right = factor_of(ir, b_name, b_subs, b_out + b_in, bond_order, "right")
        dims = [math.prod(sizes[s] for s in part) for part in (a_out, a_in, b_out, b_in)]
        return KroneckerSplit(left, right, *dims, activation=last.activation, scale=ir.output_scale,
                              weight_shape=ir.weight_shape)
    raise GeneratorError(
        f"the last contraction of this {ir.family} generator ({last.equation}) does not separate a leading block of "
        "sites from the rest, so its weight is not a sum of Kronecker products; compile it with --weights load"
    )
