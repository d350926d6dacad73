"""GeneratorSpec: the user-facing configuration of a generator, and the tensorisation of weight shapes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

from adntn_deploy.ir.activations import get_activation
from adntn_deploy.ir.planner import get_path_optimizer
from adntn_deploy.ir.program import GeneratorError

FAMILIES = ("ttn", "attn", "mera")
INITS = ("kaiming", "xavier")
#: "split": one half network over the output modes, one over the input modes (low-rank join);
#: "operator": paired (output mode, input mode) sites, the halves split the sites (Kronecker join).
LAYOUTS = ("split", "operator")


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` (>= 1) in ascending order, with multiplicity."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def factorize(n: int, max_mode: int) -> tuple[int, ...]:
    """Split ``n`` into physical modes of at most ``max_mode`` each (a prime above it stays one mode).

    Best-fit-decreasing packing of the prime factors: few, balanced modes. Modes are returned largest first.
    """
    if n < 1:
        raise GeneratorError(f"cannot tensorise a dimension of size {n}")
    if max_mode < 2:
        raise GeneratorError(f"max_mode must be >= 2, got {max_mode}")
    bins: list[int] = []
    for p in sorted(prime_factors(n), reverse=True):
        fits = [k for k, b in enumerate(bins) if b * p <= max_mode]
        if fits:
            k = max(fits, key=lambda k: bins[k])
            bins[k] *= p
        else:
            bins.append(p)
    return tuple(sorted(bins, reverse=True)) or (1,)


@dataclass(frozen=True)
class GeneratorSpec:
    """How to build a generator. Every field is JSON-serialisable; see docs/generators.md for the math.

    Attributes:
        family: "ttn", "attn" (augmented TTN with boundary disentanglers) or "mera".
        bond_dim: bond dimension per level counted from the leaves up; an int applies to every level and
            the last entry of a tuple repeats. Bonds are clamped to the dimension of the modes below them.
        activation: activation after each level below the top (a name, or a tuple per level; last repeats).
        top_activation: activation applied to the joined weight (default identity, so weights can be negative).
        out_modes / in_modes: explicit tensorisation of the output / input dimension (input = Cin*kh*kw for
            convolutions); None factorises automatically into modes of at most ``max_mode``.
        arity: children per tree node (TTN and aTTN).
        share: one core per (half, level) -- a uniform network; needs equal mode sizes per half.
        mixing: lateral mixing tensors between sibling bonds before each coarse-graining (TTN and aTTN).
        init: variance target of the generated weight: "kaiming" (2/fan_in) or "xavier" (2/(fan_in+fan_out)).
        seed: seed of the core initialisation; None draws one from torch's global RNG when a torch layer is
            built (so ``torch.manual_seed`` decides, as for torch's own layers) and uses 0 elsewhere.
        layout: "split" (output modes and input modes in separate halves: the weight's matrix rank is at
            most the top bond) or "operator" (each site pairs an output mode with an input mode; the
            halves split the sites, so the weight is a sum of Kronecker products and can be full rank).
        planner: path optimizer splitting each node into pairwise steps (see adntn_deploy.ir.planner).
    """

    family: str = "ttn"
    bond_dim: int | tuple[int, ...] = 4
    activation: str | tuple[str, ...] = "tanh"
    top_activation: str = "identity"
    out_modes: tuple[int, ...] | None = None
    in_modes: tuple[int, ...] | None = None
    max_mode: int = 4
    arity: int = 2
    share: bool = False
    mixing: bool = False
    init: str = "kaiming"
    seed: int | None = None
    planner: str = "min-peak"
    layout: str = "split"

    def __post_init__(self) -> None:
        for name in ("bond_dim", "activation", "out_modes", "in_modes"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if self.family not in FAMILIES:
            raise GeneratorError(f"unknown generator family {self.family!r}: use one of {', '.join(FAMILIES)}")
        bonds = self.bond_dims
        if not bonds or any(not isinstance(b, int) or b < 1 for b in bonds):
            raise GeneratorError(f"bond_dim must be a positive integer or a tuple of them, got {self.bond_dim!r}")
        for act in self.activations + (self.top_activation,):
            get_activation(act)
        if self.arity < 2:
            raise GeneratorError(f"arity must be >= 2, got {self.arity}")
        if self.layout not in LAYOUTS:
            raise GeneratorError(f"unknown layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise GeneratorError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        if self.init not in INITS:
            raise GeneratorError(f"unknown init {self.init!r}: use one of {', '.join(INITS)}")
        if self.mixing and self.family == "mera":
            raise GeneratorError("mixing tensors belong to TTN and aTTN; MERA already mixes with its disentanglers")
        if self.family == "mera" and self.arity != 2:
            raise GeneratorError("MERA is binary (arity 2); arity applies to TTN and aTTN")
        get_path_optimizer(self.planner)
        if self.max_mode < 2:
            raise GeneratorError(f"max_mode must be >= 2, got {self.max_mode}")

    @property
    def bond_dims(self) -> tuple[int, ...]:
        """Bond dimensions per level as a tuple."""
        return (self.bond_dim,) if isinstance(self.bond_dim, int) else tuple(self.bond_dim)

    @property
    def activations(self) -> tuple[str, ...]:
        """Activations per level as a tuple."""
        return (self.activation,) if isinstance(self.activation, str) else tuple(self.activation)

    def bond_at(self, level: int) -> int:
        """Bond dimension of level ``level`` (0 = leaves); the last configured value repeats."""
        bonds = self.bond_dims
        return bonds[min(level, len(bonds) - 1)]

    def activation_at(self, level: int) -> str:
        """Activation after level ``level`` (1 = first contraction level); the last value repeats."""
        acts = self.activations
        return acts[min(level - 1, len(acts) - 1)]

    def tensorize(self, weight_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Output and input modes for a weight of shape (out, in) or (Cout, Cin, kh, kw).

        Raises:
            GeneratorError: the shape has the wrong rank, or explicit modes do not multiply to the dimension.
        """
        if len(weight_shape) not in (2, 3, 4, 5):
            raise GeneratorError(f"weight shape {tuple(weight_shape)} must be (out, in) or (out, in, *kernel)")
        out_dim = int(weight_shape[0])
        in_dim = math.prod(int(d) for d in weight_shape[1:])
        if self.out_modes is not None:
            out_modes = tuple(int(m) for m in self.out_modes)
        else:
            out_modes = factorize(out_dim, self.max_mode)
        if self.in_modes is not None:
            in_modes = tuple(int(m) for m in self.in_modes)
        else:
            kernel = tuple(int(d) for d in weight_shape[2:] if int(d) > 1)
            in_modes = factorize(int(weight_shape[1]), self.max_mode) + kernel
            in_modes = tuple(m for m in in_modes if m > 1) or (1,)
        for label, modes, dim in (("out_modes", out_modes, out_dim), ("in_modes", in_modes, in_dim)):
            if not modes or any(m < 1 for m in modes) or math.prod(modes) != dim:
                raise GeneratorError(
                    f"{label}={list(modes)} multiply to {math.prod(modes)}, not to the dimension {dim}: "
                    f"give modes whose product is {dim} (its prime factors are {prime_factors(dim)})"
                )
        if self.layout == "operator":
            out_modes, in_modes = pair_modes(out_modes, in_modes)
        return out_modes, in_modes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GeneratorSpec":
        """Inverse of :meth:`to_dict`; GeneratorError on unknown fields.

        A dict without ``layout`` (written before the operator layout existed) is the split layout.
        """
        data = {"layout": "split", **data}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise GeneratorError(f"unknown generator option(s) {sorted(unknown)}: known are {sorted(known)}")
        return cls(**dict(data))

    def with_options(self, **changes: Any) -> "GeneratorSpec":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def pair_modes(out_modes: Sequence[int], in_modes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Output and input modes of equal count for the operator layout: site k pairs ``out[k]`` with ``in[k]``.

    Modes of size 1 are dropped, then the shorter list is padded with 1s at its end (for a convolution the
    kernel's spatial modes, last on the input side, then pair with output modes of size 1 or with the last
    output modes). The layout needs two sites: a single pair raises.

    Raises:
        GeneratorError: fewer than two sites (both dimensions fit one mode each).
    """
    out = [int(m) for m in out_modes if int(m) > 1]
    inp = [int(m) for m in in_modes if int(m) > 1]
    count = max(len(out), len(inp))
    if count < 2:
        raise GeneratorError(
            f"the operator layout needs at least two paired sites, but out_modes={list(out_modes)} and "
            f"in_modes={list(in_modes)} give {count}: lower max_mode or pass out_modes/in_modes with two modes"
        )
    out += [1] * (count - len(out))
    inp += [1] * (count - len(inp))
    return tuple(out), tuple(inp)


def fan_in_out(weight_shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear (out, in) or Conv (Cout, Cin, *kernel) weight, as torch defines them."""
    receptive = math.prod(int(d) for d in weight_shape[2:])
    return int(weight_shape[1]) * receptive, int(weight_shape[0]) * receptive

