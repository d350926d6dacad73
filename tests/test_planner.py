"""Path optimizers: every registered one is correct; min-peak never has a larger peak than the others."""

import math

import numpy as np
import opt_einsum
import pytest

from adntn_deploy.ir.planner import PATH_OPTIMIZERS


def _peak(path, operands, output, sizes):
    tensors = list(operands)
    peak = 0
    for i, j in path:
        rest = [t for k, t in enumerate(tensors) if k not in (i, j) and t is not None]
        needed = set(output).union(*rest) if rest else set(output)
        out = tuple(x for x in dict.fromkeys(tensors[i] + tensors[j]) if x in needed)
        peak = max(peak, math.prod(sizes[x] for x in out))
        tensors[i] = tensors[j] = None
        tensors.append(out)
    return peak


NETWORKS = [
    # a TTN node with two big children and a small core
    ([("m", "a"), ("n", "b"), ("a", "b", "c")], ("m", "n", "c"), {"m": 64, "n": 64, "a": 4, "b": 4, "c": 4}),
    # the join of two halves
    ([("o", "a"), ("a", "b"), ("i", "b")], ("o", "i"), {"o": 256, "i": 512, "a": 8, "b": 8}),
    # a MERA isometry layer over a state
    ([("t", "p", "q"), ("p", "x", "y"), ("q", "z", "w")], ("t", "x", "y", "z", "w"), dict(t=4, p=4, q=4, x=4, y=4, z=4, w=4)),
]


@pytest.mark.parametrize("name", sorted(PATH_OPTIMIZERS))
@pytest.mark.parametrize("operands, output, sizes", NETWORKS)
def test_paths_contract_to_the_einsum_result(name, operands, output, sizes, rng):
    path = PATH_OPTIMIZERS[name](operands, output, sizes)
    arrays = [rng.standard_normal([sizes[i] for i in op]) for op in operands]
    symbols = {i: opt_einsum.get_symbol(k) for k, i in enumerate(sorted(sizes))}
    spec = lambda idx: "".join(symbols[i] for i in idx)  # noqa: E731
    expected = np.einsum(",".join(spec(op) for op in operands) + "->" + spec(output), *arrays)
    tensors, labels = list(arrays), list(operands)
    for i, j in path:
        rest = [labels[k] for k in range(len(labels)) if k not in (i, j) and labels[k] is not None]
        needed = set(output).union(*rest) if rest else set(output)
        out = tuple(x for x in dict.fromkeys(labels[i] + labels[j]) if x in needed)
        tensors.append(np.einsum(f"{spec(labels[i])},{spec(labels[j])}->{spec(out)}", tensors[i], tensors[j]))
        labels.append(out)
        labels[i] = labels[j] = None
    final = np.einsum(f"{spec(labels[-1])}->{spec(output)}", tensors[-1])
    np.testing.assert_allclose(final, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("operands, output, sizes", NETWORKS)
def test_min_peak_has_the_smallest_peak(operands, output, sizes):
    ours = _peak(PATH_OPTIMIZERS["min-peak"](operands, output, sizes), operands, output, sizes)
    for name in ("greedy", "optimal"):
        assert ours <= _peak(PATH_OPTIMIZERS[name](operands, output, sizes), operands, output, sizes)
