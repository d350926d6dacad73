"""Elementwise activations a generator may apply after a contraction step.

One registry serves every executor: the numpy reference, torch (autograd) and, later, the ONNX and TVM
lowerings look activations up here by name, so a name in an IR file always means the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from adntn_deploy.errors import GeneratorError

#: Slope of ``leaky_relu`` for negative inputs (PyTorch's default), fixed so IR files stay portable.
LEAKY_RELU_SLOPE = 0.01


def _gelu_numpy(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf  # exact (erf) GELU, as torch's default and ONNX Gelu

    return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(x.dtype, copy=False)


@dataclass(frozen=True)
class Activation:
    """An elementwise function known to every executor.

    ``numpy`` maps an ndarray to an ndarray of the same shape and dtype; ``torch_name`` names the
    function in :mod:`adntn_deploy.ir.executors` (kept as a name so this module never imports torch).
    """

    name: str
    numpy: Callable[[np.ndarray], np.ndarray]
    description: str


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", lambda x: x, "no activation"),
        Activation("relu", lambda x: np.maximum(x, 0).astype(x.dtype, copy=False), "max(x, 0)"),
        Activation(
            "leaky_relu",
            lambda x: np.where(x > 0, x, x * LEAKY_RELU_SLOPE).astype(x.dtype, copy=False),
            f"x if x > 0 else {LEAKY_RELU_SLOPE} * x",
        ),
        Activation("tanh", np.tanh, "tanh(x)"),
        Activation("gelu", _gelu_numpy, "x * Phi(x), exact erf form"),
        Activation("sigmoid", lambda x: (1.0 / (1.0 + np.exp(-x))).astype(x.dtype, copy=False), "1 / (1 + exp(-x))"),
        Activation("sin", np.sin, "sin(x)"),
    )
}


def get_activation(name: str) -> Activation:
    """Return the registered activation called ``name``.

    Raises:
        GeneratorError: if ``name`` is not registered; the message lists the known names.
    """
    try:
        return ACTIVATIONS[name]
    except KeyError:
        known = ", ".join(sorted(ACTIVATIONS))
        raise GeneratorError(f"unknown activation {name!r}: use one of {known}") from None
