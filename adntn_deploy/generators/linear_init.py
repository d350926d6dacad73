"""Initialise a generator from a dense weight: hierarchical SVD in the activations' linear regime.

Fitting a deep nonlinear network from random cores to a given weight tends to collapse to W = 0 (a
product of many small factors has vanishing gradients). Instead we start where the linear theory is
exact: every bond gets the leading left singular vectors U of the weight tensor unfolded along the modes
the bond summarises (the hierarchical Tucker / HT-SVD construction), every core becomes the projection
between its bonds' bases, disentanglers and mixers start at the identity, and the join core is
U_out^T W U_in. Cores are then rescaled so every pre-activation stays near zero (where tanh, sin and
GELU are linear with slopes 1, 1 and 1/2) while the output is unchanged. Gradient fitting refines from
this start. Weights larger than :data:`SKETCH_ABOVE` on a side are first reduced by a randomized range
finder (rank :data:`SKETCH_RANK`), which keeps the leading subspaces the bonds need.
"""

from __future__ import annotations

import math

import numpy as np
import opt_einsum

from adntn_deploy.generators.families import FamilyContext
from adntn_deploy.ir.program import GeneratorError

#: Slope at zero of the activations for which the linear start is exact to first order.
LINEAR_GAINS = {"identity": 1.0, "tanh": 1.0, "sin": 1.0, "gelu": 0.5}
SKETCH_ABOVE = 1024
SKETCH_RANK = 384
#: Magnitude of data tensors relative to their linear values (small keeps activations near-linear).
EPSILON = 0.05


def _range(matrix: np.ndarray, rank: int, rng: np.random.Generator) -> np.ndarray:
    """Orthonormal basis (cols x rank) of the leading row space of ``matrix`` (randomized, 2 power steps)."""
    omega = rng.standard_normal((matrix.shape[0], rank))
    q = np.linalg.qr(matrix.T @ omega)[0]
    for _ in range(2):
        q = np.linalg.qr(matrix.T @ (matrix @ q))[0]
    return q


def _bases(ctx: FamilyContext, weight: np.ndarray, modes: list[int], n_out: int, seed: int) -> dict[str, np.ndarray]:
    """Left singular bases U[index] of shape (prod of beneath modes, index size) for every bond index."""
    rng = np.random.default_rng(seed)
    out_dim, in_dim = weight.shape
    sides = {}
    for side, mat, first, count in (("out", weight, 0, n_out), ("in", weight.T, n_out, len(modes) - n_out)):
        other = mat.shape[1]
        reduced = mat @ _range(mat, SKETCH_RANK, rng) if other > SKETCH_ABOVE and other > SKETCH_RANK else mat
        sides[side] = (reduced.reshape(modes[first : first + count] + [reduced.shape[1]]), first, count)
    bases: dict[str, np.ndarray] = {}
    for index, under in ctx.beneath.items():
        size = ctx.builder.sizes[index]
        if size == math.prod(modes[p] for p in under):  # full rank (physical indices too): nothing to truncate
            bases[index] = np.eye(size)
            continue
        side = "out" if under[0] < n_out else "in"
        tensor, first, count = sides[side]
        axes = [p - first for p in under]
        rest = [a for a in range(tensor.ndim) if a not in axes]
        unfolded = tensor.transpose(axes + rest).reshape(math.prod(modes[p] for p in under), -1)
        bases[index] = _leading_basis(unfolded, size, rng)
    return bases


def _leading_basis(unfolded: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` orthonormal columns spanning ``unfolded``'s leading left singular subspace first.

    Tall unfoldings (the operator layout's sites below a half's top bond can hold 10^6 rows against a
    few columns) take a thin SVD instead of the rows x rows Gram matrix, and are completed with random
    orthonormal directions when the bond is wider than the unfolding's rank.
    """
    rows, cols = unfolded.shape
    if rows <= max(cols, SKETCH_ABOVE):
        vals, vecs = np.linalg.eigh(unfolded @ unfolded.T)
        return vecs[:, ::-1][:, :size]
    u = np.linalg.svd(unfolded, full_matrices=False)[0][:, :size]
    if u.shape[1] < size:
        filler = rng.standard_normal((rows, size - u.shape[1]))
        u = np.linalg.qr(np.concatenate([u, filler], axis=1))[0]
    return u


def linear_cores(
    ctx: FamilyContext, weight: np.ndarray, output_scale: float, seed: int = 0, weight_shape: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Cores that make the generator reproduce ``weight`` (out, in) as well as its bonds allow.

    ``weight_shape`` is the layer's own shape when ``weight`` is a flattened convolution kernel: the
    tensorisation depends on it (kernel axes are modes of their own).

    Raises:
        GeneratorError: shared cores, or an activation that is not linear near zero (relu, leaky_relu,
            sigmoid): such generators start from random cores instead.
    """
    if ctx.spec.share:
        raise GeneratorError("initialising from a weight needs one core per position (share=False)")
    for _, _, act in ctx.node_roles:
        if act not in LINEAR_GAINS:
            raise GeneratorError(
                f"initialising from a weight needs activations that are linear near zero "
                f"({', '.join(LINEAR_GAINS)}), not {act!r}"
            )
    out_modes, in_modes = ctx.spec.tensorize(weight_shape or weight.shape)
    if ctx.spec.layout == "operator":
        # Van Loan-Pitsianis rearrangement: the weight as a tensor over paired sites (o_k i_k), unfolded
        # into (left sites) x (right sites). Its SVD is the nearest sum of Kronecker products; the HT-SVD
        # below applies the same rearrangement recursively down each half's tree.
        weight, modes, n_left = _rearrange_paired(weight, out_modes, in_modes)
    else:
        modes, n_left = list(out_modes) + list(in_modes), len(out_modes)
    bases = _bases(ctx, weight, modes, n_left, seed)
    sizes = ctx.builder.sizes
    cores: dict[str, np.ndarray] = {}
    for name, indices in ctx.core_indices.items():
        role = ctx.builder.cores[name].role
        if role in ("disentangler", "mixer"):
            half = len(indices) // 2
            rows = math.prod(sizes[i] for i in indices[:half])
            cores[name] = np.eye(rows).reshape([sizes[i] for i in indices])
        elif role == "top":
            u_out, u_in = bases[indices[0]], bases[indices[1]]
            cores[name] = u_out.T @ weight @ u_in
        elif any(i not in ctx.beneath for i in indices):
            # an operator-layout leaf A[o_k, i_k, b]: the bond's basis over the site, split into its pair
            bond = indices[-1]
            cores[name] = bases[bond].reshape([sizes[i] for i in indices])
        else:
            operands = []
            for index in indices:
                under = ctx.beneath[index]
                operands.append(bases[index].reshape([modes[p] for p in under] + [sizes[index]]))
                operands.append([("m", p) for p in under] + [("i", index)])
            cores[name] = opt_einsum.contract(*operands, [("i", i) for i in indices])
    _rescale(ctx, cores, output_scale)
    return cores


def _rearrange_paired(weight: np.ndarray, out_modes, in_modes) -> tuple[np.ndarray, list[int], int]:
    """(W as a (left sites) x (right sites) matrix, the site sizes o_k*i_k, the number of left sites)."""
    n = len(out_modes)
    tensor = weight.reshape(list(out_modes) + list(in_modes))
    tensor = tensor.transpose([a for k in range(n) for a in (k, n + k)])
    sites = [int(o) * int(i) for o, i in zip(out_modes, in_modes)]
    n_left = (n + 1) // 2  # the families' split of the sites into halves
    return tensor.reshape(math.prod(sites[:n_left]), -1), sites, n_left


def _rescale(ctx: FamilyContext, cores: dict[str, np.ndarray], output_scale: float) -> None:
    """Scale data cores by EPSILON and operators so each node's pre-activation is EPSILON * linear / gain."""
    for data, operators, act in ctx.node_roles:
        gain = LINEAR_GAINS[act]
        for ref in data:
            if ref.name in cores:  # a raw core entering as data (TTN leaf, MERA top isometry)
                cores[ref.name] = cores[ref.name] * EPSILON
        is_join = any(ctx.builder.cores[op.name].role == "top" for op in operators)
        target = (EPSILON ** -len(data)) / (output_scale * gain) if is_join else EPSILON ** (1 - len(data)) / gain
        factor = target ** (1.0 / len(operators))
        for op in operators:
            cores[op.name] = cores[op.name] * factor
