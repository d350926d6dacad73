"""The three generator families, each a function that declares its network on a NetworkBuilder.

A family builds two *half networks* over physical *sites* and a top core joins them over one bond:

    W = scale * top_activation( sum_ab L[sites of L, a] G[a, b] R[sites of R, b] )

Two layouts decide what a site is (docs/generators.md has the math and drawings):

* split: a site is one mode; the output modes form one half and the input modes the other, so
  W = L G R^T is a low-rank product (what streamed weights rely on);
* operator: a site is a pair (o_k, i_k) of an output and an input mode; the first half of the sites
  forms L, the rest R, so W = sum_b L_b (x) R_b, a sum of Kronecker products that can be full rank.

In both the join is one node whose last pairwise step contracts the two halves over one bond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from adntn_deploy.generators.builder import NetworkBuilder, TensorRef
from adntn_deploy.generators.spec import GeneratorSpec

#: How to initialise one core: ("normal", std) or ("identity", noise std)
CoreInit = tuple[str, float]


@dataclass
class Half:
    """What a half network hands to the join: its result, physical indices in order, and its top bond."""

    ref: TensorRef
    physical: list[str]
    bond: str


@dataclass(frozen=True)
class Site:
    """A physical site: its index names (one mode, or an (output, input) pair), their product, its position.

    ``position`` is what :attr:`FamilyContext.beneath` records for the indices above it: the mode's
    position in the weight's output order (split layout) or the pair's site number (operator layout).
    """

    indices: tuple[str, ...]
    dim: int
    position: int


@dataclass
class _Item:
    ref: TensorRef
    bond: str
    dim_below: int
    physical: list[str]


class FamilyContext:
    """Shared state while one family declares its network: the builder, the spec, and core inits."""

    def __init__(self, family: str, spec: GeneratorSpec) -> None:
        self.builder = NetworkBuilder(family)
        self.spec = spec
        self.inits: dict[str, CoreInit] = {}
        self.core_indices: dict[str, list[str]] = {}
        #: physical positions (in the weight's output order) that each index summarises
        self.beneath: dict[str, tuple[int, ...]] = {}
        #: per node: (data inputs, operator cores, activation); data are tensors flowing up the network
        self.node_roles: list[tuple[list[TensorRef], list[TensorRef], str]] = []

    def core(self, name: str, shared_name: str, indices: list[str], role: str, init: CoreInit) -> TensorRef:
        """Declare a core; with ``spec.share`` all cores of one (half, level, kind) use ``shared_name``.

        In the operator layout, sites of unequal sizes (a padded site, a kernel mode) are common, so sharing
        there groups cores by shape too: cores whose shape differs from the first get ``shared_name.<shape>``.
        """
        key = shared_name if self.spec.share else name
        if self.spec.share and self.spec.layout == "operator":
            shape = tuple(self.builder.sizes[i] for i in indices)
            first = self.builder.cores.get(shared_name)
            if first is not None and first.shape != shape:
                key = f"{shared_name}.{'x'.join(map(str, shape))}"
        self.inits.setdefault(key, init)
        self.core_indices.setdefault(key, list(indices))
        return self.builder.core(key, indices, role)

    def node(self, name: str, data: list[TensorRef], operators: list[TensorRef], output: list[str], act: str) -> TensorRef:
        """Declare ``act(contract(data + operators) -> output)``; ``data`` are the tensors flowing through."""
        self.node_roles.append((list(data), list(operators), act))
        return self.builder.node(name, list(data) + list(operators), output, act)

    def index(self, name: str, size: int, beneath: tuple[int, ...]) -> str:
        """Declare an index and the physical positions it summarises."""
        self.beneath[name] = tuple(beneath)
        return self.builder.index(name, size)

    def relabel(self, name: str) -> str:
        """A new index like ``name`` (same size, same positions beneath): the output leg of a gate."""
        if name in self.beneath:
            return self.index(f"{name}.d", self.builder.sizes[name], self.beneath[name])
        return self.builder.index(f"{name}.d", self.builder.sizes[name])  # an operator-layout physical index

    def fan(self, indices: list[str]) -> float:
        """1/sqrt(product of the sizes of ``indices``): the std that keeps a contraction at unit variance."""
        return 1.0 / math.sqrt(math.prod(self.builder.sizes[i] for i in indices))


def _leaves_bottom_up(ctx: FamilyContext, side: str, sites: list[Site]) -> list[_Item]:
    spec = ctx.spec
    items = []
    for k, site in enumerate(sites):
        bond = ctx.index(f"{side}.l0.b{k}", min(spec.bond_at(0), site.dim), (site.position,))
        ref = ctx.core(f"{side}.leaf{k}", f"{side}.leaf", [*site.indices, bond], "leaf", ("normal", 1.0))
        items.append(_Item(ref, bond, site.dim, list(site.indices)))
    return items


def ttn_half(ctx: FamilyContext, side: str, sites: list[Site]) -> Half:
    """Bottom-up tree: leaves map sites to bonds; each node contracts ``arity`` children into a parent bond."""
    b, spec = ctx.builder, ctx.spec
    items = _leaves_bottom_up(ctx, side, sites)
    height = 0
    while len(items) > 1:
        height += 1
        act = spec.activation_at(height)
        groups = [items[k : k + spec.arity] for k in range(0, len(items), spec.arity)]
        merged = []
        for g, group in enumerate(groups):
            if len(group) == 1:  # an odd child out is carried up unchanged
                merged.append(group[0])
                continue
            inputs = [it.ref for it in group]
            child_bonds = [it.bond for it in group]
            physical = [p for it in group for p in it.physical]
            under = tuple(pos for it in group for pos in ctx.beneath[it.bond])
            if spec.mixing:
                mixed = [
                    ctx.index(f"{side}.l{height}.g{g}.x{c}", b.sizes[cb], ctx.beneath[cb]) for c, cb in enumerate(child_bonds)
                ]
                mixer = ctx.core(
                    f"{side}.l{height}.mix{g}", f"{side}.l{height}.mix", mixed + child_bonds, "mixer", ("identity", 0.1)
                )
                inputs = [ctx.node(f"{side}.l{height}.mixed{g}", inputs, [mixer], physical + mixed, act)]
                child_bonds = mixed
            below = math.prod(it.dim_below for it in group)
            bond = ctx.index(f"{side}.l{height}.b{g}", min(spec.bond_at(height), below), under)
            core = ctx.core(
                f"{side}.l{height}.node{g}", f"{side}.l{height}.node", child_bonds + [bond], "node",
                ("normal", ctx.fan(child_bonds)),
            )
            ref = ctx.node(f"{side}.l{height}.n{g}", inputs, [core], physical + [bond], act)
            merged.append(_Item(ref, bond, below, physical))
        items = merged
    top = items[0]
    return Half(top.ref, top.physical, top.bond)


def boundary_pairs(n: int, arity: int) -> list[tuple[int, int]]:
    """Neighbouring leaf pairs that the tree does not join first: (k, k+1) across first-level groups."""
    return [(k, k + 1) for k in range(arity - 1, n - 1, arity)]


def attn_half(ctx: FamilyContext, side: str, sites: list[Site]) -> Half:
    """A TTN half followed by a linear layer of two-site disentanglers on the boundary pairs.

    In the operator layout a gate acts on the *output* modes of its two sites (a local operator applied
    from the left, W -> D W), which keeps the weight's Kronecker structure and costs (o_p o_q)^2 parameters.
    """
    half = ttn_half(ctx, side, sites)
    pairs = boundary_pairs(len(sites), ctx.spec.arity)
    if not pairs:
        return half
    physical = list(half.physical)
    per_site = len(sites[0].indices)  # 1 (split) or 2 (operator: output index first)
    gates = []
    for k, (site_p, site_q) in enumerate(pairs):
        p, q = site_p * per_site, site_q * per_site
        new_p, new_q = ctx.relabel(physical[p]), ctx.relabel(physical[q])
        gates.append(
            ctx.core(f"{side}.dis{k}", f"{side}.dis", [new_p, new_q, physical[p], physical[q]], "disentangler",
                     ("identity", 0.1))
        )
        physical[p], physical[q] = new_p, new_q
    out = [half.bond] + physical
    ref = ctx.node(f"{side}.disentangled", [half.ref], gates, out, "identity")
    return Half(ref, physical, half.bond)


def mera_half(ctx: FamilyContext, side: str, sites: list[Site]) -> Half:
    """Top-down MERA: isometries refine each site into two, disentanglers mix across isometry boundaries."""
    b, spec = ctx.builder, ctx.spec
    n = len(sites)
    physical = [i for site in sites for i in site.indices]
    if n == 1:
        bond = ctx.index(f"{side}.top", min(spec.bond_at(0), sites[0].dim), (sites[0].position,))
        ref = ctx.core(f"{side}.leaf0", f"{side}.leaf", [*sites[0].indices, bond], "leaf", ("normal", 1.0))
        return Half(ref, physical, bond)
    counts = [n]
    below = [[site.dim for site in sites]]
    under = [[(site.position,) for site in sites]]
    while counts[-1] > 1:
        prev, prev_under = below[-1], under[-1]
        below.append([math.prod(prev[2 * j : 2 * j + 2]) for j in range((len(prev) + 1) // 2)])
        under.append([sum(prev_under[2 * j : 2 * j + 2], ()) for j in range((len(prev) + 1) // 2)])
        counts.append(len(below[-1]))
    levels = len(counts) - 1
    levels_sites = [
        [ctx.index(f"{side}.s{lvl}.{j}", min(spec.bond_at(lvl), below[lvl][j]), under[lvl][j]) for j in range(counts[lvl])]
        for lvl in range(levels + 1)
    ]
    top = levels_sites[levels][0]
    state: TensorRef | None = None
    for lvl in range(levels - 1, -1, -1):
        act = spec.activation_at(lvl + 1)
        isometries = []
        for j, parent in enumerate(levels_sites[lvl + 1]):
            children = levels_sites[lvl][2 * j : 2 * j + 2]
            kind = "iso" if len(children) == 2 else "iso1"
            std = 1.0 if state is None else ctx.fan([parent])
            isometries.append(
                ctx.core(f"{side}.l{lvl}.{kind}{j}", f"{side}.l{lvl}.{kind}", [parent] + children, "isometry",
                         ("normal", std))
            )
        current = list(levels_sites[lvl])
        if state is None:
            state = isometries[0]  # the top isometry starts the state; it has no input to activate
        else:
            state = ctx.node(f"{side}.l{lvl}.refined", [state], isometries, [top] + current, act)
        gates = []
        for k, (p, q) in enumerate(boundary_pairs(len(current), 2)):
            new_p = ctx.index(f"{current[p]}.d", b.sizes[current[p]], ctx.beneath[current[p]])
            new_q = ctx.index(f"{current[q]}.d", b.sizes[current[q]], ctx.beneath[current[q]])
            gates.append(
                ctx.core(f"{side}.l{lvl}.dis{k}", f"{side}.l{lvl}.dis", [new_p, new_q, current[p], current[q]],
                         "disentangler", ("identity", 0.1))
            )
            current[p], current[q] = new_p, new_q
        if gates:
            state = ctx.node(f"{side}.l{lvl}.disentangled", [state], gates, [top] + current, act)
        levels_sites[lvl] = current
    leaves = [
        ctx.core(f"{side}.leaf{k}", f"{side}.leaf", [*site.indices, levels_sites[0][k]], "leaf",
                 ("normal", ctx.fan([levels_sites[0][k]])))
        for k, site in enumerate(sites)
    ]
    assert state is not None
    ref = ctx.node(f"{side}.leaves", [state], leaves, [top] + physical, spec.activation_at(1))
    return Half(ref, physical, top)


HALVES: dict[str, Callable[[FamilyContext, str, list[Site]], Half]] = {
    "ttn": ttn_half,
    "attn": attn_half,
    "mera": mera_half,
}


def declare_sites(ctx: FamilyContext, out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> list[Site]:
    """Declare the physical indices of ``ctx.spec.layout`` and return the sites in weight order.

    Split: one site per mode, output modes first (positions 0..p+q-1). Operator: site k pairs ``o{k}``
    with ``i{k}`` (positions 0..n-1; ``out_modes`` and ``in_modes`` have equal counts, see pair_modes).
    """
    if ctx.spec.layout == "operator":
        sites = []
        for k, (o, i) in enumerate(zip(out_modes, in_modes)):
            o_index = ctx.builder.index(f"o{k}", o)
            i_index = ctx.builder.index(f"i{k}", i)
            sites.append(Site((o_index, i_index), o * i, k))
        return sites
    sites = []
    for side, modes, offset in (("out", out_modes, 0), ("in", in_modes, len(out_modes))):
        for k, d in enumerate(modes):
            sites.append(Site((ctx.index(f"{side}.m{k}", d, (offset + k,)),), d, offset + k))
    return sites


def declare_network(spec: GeneratorSpec, weight_shape: tuple[int, ...]) -> tuple[FamilyContext, TensorRef, list[str]]:
    """Declare the whole generator for ``weight_shape``; returns the context, the result and its output order."""
    out_modes, in_modes = spec.tensorize(weight_shape)
    ctx = FamilyContext(spec.family, spec)
    half = HALVES[spec.family]
    sites = declare_sites(ctx, out_modes, in_modes)
    if spec.layout == "operator":
        middle = (len(sites) + 1) // 2
        out_half = half(ctx, "left", sites[:middle])
        in_half = half(ctx, "right", sites[middle:])
        physical = out_half.physical + in_half.physical  # (o_k, i_k) interleaved, sites in order
        order = physical[0::2] + physical[1::2]
    else:
        out_half = half(ctx, "out", sites[: len(out_modes)])
        in_half = half(ctx, "in", sites[len(out_modes):])
        order = out_half.physical + in_half.physical
    top = ctx.core("top", "top", [out_half.bond, in_half.bond], "top", ("normal", ctx.fan([out_half.bond, in_half.bond])))
    result = ctx.node("weight", [out_half.ref, in_half.ref], [top], order, spec.top_activation)
    return ctx, result, order
