"""The three generator families, each a function that declares its network on a NetworkBuilder.

Every family uses the *split layout*: the output modes and the input modes each get their own half
network, whose top carries one bond; a top core joins the two halves:

    W[o..., i...] = top_activation( sum_ab L[o..., a] G[a, b] R[i..., b] ) * scale

so the weight's top-level contraction separates output modes from input modes (what streamed weights and
low-rank products rely on). The families differ in their halves; docs/generators.md has the math.
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
        """Declare a core; with ``spec.share`` all cores of one (half, level, kind) use ``shared_name``."""
        key = shared_name if self.spec.share else name
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

    def fan(self, indices: list[str]) -> float:
        """1/sqrt(product of the sizes of ``indices``): the std that keeps a contraction at unit variance."""
        return 1.0 / math.sqrt(math.prod(self.builder.sizes[i] for i in indices))


def _leaves_bottom_up(ctx: FamilyContext, side: str, modes: tuple[int, ...], offset: int) -> list[_Item]:
    spec = ctx.spec
    items = []
    for k, d in enumerate(modes):
        phys = ctx.index(f"{side}.m{k}", d, (offset + k,))
        bond = ctx.index(f"{side}.l0.b{k}", min(spec.bond_at(0), d), (offset + k,))
        ref = ctx.core(f"{side}.leaf{k}", f"{side}.leaf", [phys, bond], "leaf", ("normal", 1.0))
        items.append(_Item(ref, bond, d, [phys]))
    return items


def ttn_half(ctx: FamilyContext, side: str, modes: tuple[int, ...], offset: int) -> Half:
    """Bottom-up tree: leaves map modes to bonds; each node contracts ``arity`` children into a parent bond."""
    b, spec = ctx.builder, ctx.spec
    items = _leaves_bottom_up(ctx, side, modes, offset)
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
            under = tuple(pos for p in physical for pos in ctx.beneath[p])
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


def attn_half(ctx: FamilyContext, side: str, modes: tuple[int, ...], offset: int) -> Half:
    """A TTN half followed by a linear layer of two-mode disentanglers on the boundary pairs."""
    half = ttn_half(ctx, side, modes, offset)
    pairs = boundary_pairs(len(modes), ctx.spec.arity)
    if not pairs:
        return half
    b = ctx.builder
    physical = list(half.physical)
    gates = []
    for k, (p, q) in enumerate(pairs):
        new_p = ctx.index(f"{side}.m{p}.d", b.sizes[physical[p]], ctx.beneath[physical[p]])
        new_q = ctx.index(f"{side}.m{q}.d", b.sizes[physical[q]], ctx.beneath[physical[q]])
        gates.append(
            ctx.core(f"{side}.dis{k}", f"{side}.dis", [new_p, new_q, physical[p], physical[q]], "disentangler",
                     ("identity", 0.1))
        )
        physical[p], physical[q] = new_p, new_q
    out = [half.bond] + physical
    ref = ctx.node(f"{side}.disentangled", [half.ref], gates, out, "identity")
    return Half(ref, physical, half.bond)


def mera_half(ctx: FamilyContext, side: str, modes: tuple[int, ...], offset: int) -> Half:
    """Top-down MERA: isometries refine each site into two, disentanglers mix across isometry boundaries."""
    b, spec = ctx.builder, ctx.spec
    n = len(modes)
    physical = [ctx.index(f"{side}.m{k}", d, (offset + k,)) for k, d in enumerate(modes)]
    if n == 1:
        bond = ctx.index(f"{side}.top", min(spec.bond_at(0), modes[0]), (offset,))
        ref = ctx.core(f"{side}.leaf0", f"{side}.leaf", [physical[0], bond], "leaf", ("normal", 1.0))
        return Half(ref, physical, bond)
    counts = [n]
    below = [list(modes)]
    under = [[(offset + k,) for k in range(n)]]
    while counts[-1] > 1:
        prev, prev_under = below[-1], under[-1]
        below.append([math.prod(prev[2 * j : 2 * j + 2]) for j in range((len(prev) + 1) // 2)])
        under.append([sum(prev_under[2 * j : 2 * j + 2], ()) for j in range((len(prev) + 1) // 2)])
        counts.append(len(below[-1]))
    levels = len(counts) - 1
    sites = [
        [ctx.index(f"{side}.s{lvl}.{j}", min(spec.bond_at(lvl), below[lvl][j]), under[lvl][j]) for j in range(counts[lvl])]
        for lvl in range(levels + 1)
    ]
    top = sites[levels][0]
    state: TensorRef | None = None
    for lvl in range(levels - 1, -1, -1):
        act = spec.activation_at(lvl + 1)
        isometries = []
        for j, parent in enumerate(sites[lvl + 1]):
            children = sites[lvl][2 * j : 2 * j + 2]
            kind = "iso" if len(children) == 2 else "iso1"
            std = 1.0 if state is None else ctx.fan([parent])
            isometries.append(
                ctx.core(f"{side}.l{lvl}.{kind}{j}", f"{side}.l{lvl}.{kind}", [parent] + children, "isometry",
                         ("normal", std))
            )
        current = list(sites[lvl])
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
        sites[lvl] = current
    leaves = [
        ctx.core(f"{side}.leaf{k}", f"{side}.leaf", [physical[k], sites[0][k]], "leaf", ("normal", ctx.fan([sites[0][k]])))
        for k in range(n)
    ]
    assert state is not None
    ref = ctx.node(f"{side}.leaves", [state], leaves, [top] + physical, spec.activation_at(1))
    return Half(ref, physical, top)


HALVES: dict[str, Callable[[FamilyContext, str, tuple[int, ...], int], Half]] = {
    "ttn": ttn_half,
    "attn": attn_half,
    "mera": mera_half,
}


def declare_network(spec: GeneratorSpec, weight_shape: tuple[int, ...]) -> tuple[FamilyContext, TensorRef, list[str]]:
    """Declare the whole generator for ``weight_shape``; returns the context, the result and its output order."""
    out_modes, in_modes = spec.tensorize(weight_shape)
    ctx = FamilyContext(spec.family, spec)
    half = HALVES[spec.family]
    out_half = half(ctx, "out", out_modes, 0)
    in_half = half(ctx, "in", in_modes, len(out_modes))
    top = ctx.core("top", "top", [out_half.bond, in_half.bond], "top", ("normal", ctx.fan([out_half.bond, in_half.bond])))
    order = out_half.physical + in_half.physical
    result = ctx.node("weight", [out_half.ref, in_half.ref], [top], order, spec.top_activation)
    return ctx, result, order
