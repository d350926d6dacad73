"""NetworkBuilder: families describe their network as nodes; the builder plans them into a GeneratorIR.

A *node* is one multi-operand contraction followed by one activation (a tree vertex, a layer of
isometries, ...). Families declare cores and nodes with symbolic index names; :meth:`NetworkBuilder.build`
splits every node into pairwise steps with a path optimizer, assigns each step its own letters, and
returns the validated IR. Families therefore never write einsum strings or think about contraction order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import opt_einsum

from adntn_deploy.ir.planner import get_path_optimizer
from adntn_deploy.ir.program import Core, GeneratorError, GeneratorIR, Step


@dataclass(frozen=True)
class TensorRef:
    """A core or node result seen through symbolic index names (one name per axis)."""

    name: str
    indices: tuple[str, ...]


@dataclass(frozen=True)
class _Node:
    name: str
    inputs: tuple[TensorRef, ...]
    output: tuple[str, ...]
    activation: str


class NetworkBuilder:
    """Collects cores and nodes of one generator, then plans them into a :class:`GeneratorIR`."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.sizes: dict[str, int] = {}
        self.cores: dict[str, Core] = {}
        self.nodes: list[_Node] = []

    def index(self, name: str, size: int) -> str:
        """Declare the index ``name`` of ``size`` elements (>= 1) and return its name."""
        if size < 1:
            raise GeneratorError(f"index {name!r} has size {size}: bond dimensions and modes must be >= 1")
        if self.sizes.setdefault(name, size) != size:
            raise GeneratorError(f"index {name!r} declared with sizes {self.sizes[name]} and {size}")
        return name

    def core(self, name: str, indices: Sequence[str], role: str) -> TensorRef:
        """Declare (or reuse, when shared) the core ``name`` seen through ``indices``."""
        shape = tuple(self.sizes[i] for i in indices)
        existing = self.cores.get(name)
        if existing is None:
            self.cores[name] = Core(name, shape, role)
        elif existing.shape != shape:
            raise GeneratorError(
                f"shared core {name!r} is used with shapes {existing.shape} and {shape}: sharing needs equal "
                "mode sizes and bonds within a level (pass explicit out_modes/in_modes)"
            )
        return TensorRef(name, tuple(indices))

    def node(self, name: str, inputs: Sequence[TensorRef], output: Sequence[str], activation: str) -> TensorRef:
        """Declare ``activation(contract(inputs) -> output)``; needs at least two inputs."""
        if len(inputs) < 2:
            raise GeneratorError(f"node {name!r} needs at least two inputs, got {len(inputs)}")
        self.nodes.append(_Node(name, tuple(inputs), tuple(output), activation))
        return TensorRef(name, tuple(output))

    def build(
        self,
        result: TensorRef,
        output_order: Sequence[str],
        weight_shape: Sequence[int],
        *,
        planner: str = "min-peak",
        output_scale: float = 1.0,
        metadata: dict[str, Any] | None = None,
    ) -> GeneratorIR:
        """Plan every node into pairwise steps and return the IR.

        ``output_order`` lists ``result``'s indices in the row-major order of ``weight_shape``.
        """
        optimizer = get_path_optimizer(planner)
        steps: list[Step] = []
        for node in self.nodes:
            steps.extend(self._plan_node(node, optimizer))
        if sorted(output_order) != sorted(result.indices):
            raise GeneratorError(f"output order {output_order} does not name the result's indices {result.indices}")
        permutation = tuple(result.indices.index(i) for i in output_order)
        meta = dict(metadata or {})
        meta["planner"] = planner
        return GeneratorIR(
            family=self.family,
            weight_shape=tuple(weight_shape),
            cores=tuple(self.cores.values()),
            steps=tuple(steps),
            output_permutation=permutation,
            output_scale=output_scale,
            metadata=meta,
        )

    def _plan_node(self, node: _Node, optimizer) -> list[Step]:
        operands = [ref.indices for ref in node.inputs]
        path = optimizer(operands, node.output, self.sizes)
        refs: list[TensorRef] = list(node.inputs)
        alive = set(range(len(refs)))
        steps: list[Step] = []
        for k, (i, j) in enumerate(path):
            alive -= {i, j}
            last = k == len(path) - 1
            if last:
                out = node.output
                name = node.name
            else:
                needed = set(node.output).union(*(refs[a].indices for a in alive))
                seen: list[str] = []
                for idx in refs[i].indices + refs[j].indices:
                    if idx in needed and idx not in seen:
                        seen.append(idx)
                out = tuple(seen)
                name = f"{node.name}.t{k}"
            steps.append(self._step(refs[i], refs[j], out, name, node.activation if last else "identity"))
            refs.append(TensorRef(name, out))
            alive.add(len(refs) - 1)
        return steps

    @staticmethod
    def _step(lhs: TensorRef, rhs: TensorRef, out: tuple[str, ...], name: str, activation: str) -> Step:
        letters: dict[str, str] = {}
        for idx in lhs.indices + rhs.indices:
            letters.setdefault(idx, opt_einsum.get_symbol(len(letters)))
        if len(letters) > 52:
            raise GeneratorError(f"step {name!r} touches {len(letters)} indices; einsum allows 52")
        eq = "".join(letters[i] for i in lhs.indices) + "," + "".join(letters[i] for i in rhs.indices)
        eq += "->" + "".join(letters[i] for i in out)
        return Step(eq, lhs.name, rhs.name, name, activation)


def elements(sizes: dict[str, int], indices: Sequence[str]) -> int:
    """Number of elements of a tensor with the given indices."""
    return math.prod(sizes[i] for i in indices)
