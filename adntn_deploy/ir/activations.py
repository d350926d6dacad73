"""Elementwise activations a generator may apply after a contraction step, and their lowerings.

One registry serves every backend, so a name in an IR file always means the same function:

* :data:`ACTIVATIONS` holds each activation's name, description and numpy reference (the ``numpy``
  backend; the reference executor runs it).
* The other backends (:data:`BACKENDS`: torch, ONNX, TIR) register their lowerings here with
  :func:`register_lowering` / :func:`register_lowerings` when their module is imported, and look them up
  with :func:`get_lowering`. This module imports none of torch, onnx or tvm: the lowerings live beside
  the code that uses them.
* :func:`missing_lowerings` lists the (backend, activation) pairs that have no lowering;
  ``tests/test_activations.py`` fails on any and checks that every lowering agrees with the reference.
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

    ``numpy`` is the reference: it maps an ndarray to an ndarray of the same shape and dtype (float32 or
    float64), and it is the ``numpy`` backend's lowering. The other backends register theirs with
    :func:`register_lowering` under the same ``name``.
    """

    name: str
    numpy: Callable[[np.ndarray], np.ndarray]
    description: str


#: Every activation by name, with its numpy reference; add a new one here (docs/architecture.md, "How to add")
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


def register_activation(activation: Activation) -> Activation:
    """Add ``activation`` (its name, numpy reference and description) to :data:`ACTIVATIONS`; returns it.

    This declares the name for every backend: until each of torch, ONNX and TIR registers a lowering
    for it (:func:`register_lowering`), :func:`missing_lowerings` lists those pairs. Built-in
    activations are entries of the :data:`ACTIVATIONS` table above instead.

    Raises:
        GeneratorError: the name is empty, not a string, or already registered.
    """
    if not isinstance(activation.name, str) or not activation.name:
        raise GeneratorError(f"an activation's name must be a non-empty string, not {activation.name!r}")
    if activation.name in ACTIVATIONS:
        raise GeneratorError(f"activation {activation.name!r} is already registered: choose another name")
    if not callable(activation.numpy):
        raise GeneratorError(f"activation {activation.name!r}: its numpy reference must be callable")
    ACTIVATIONS[activation.name] = activation
    return activation


@dataclass(frozen=True)
class Backend:
    """A place activations run: which module registers its lowerings and how a lowering is called.

    ``module`` is the dotted name of the module that registers the backend's lowerings when imported
    (and where a new one goes); ``signature`` describes a lowering's arguments and result.
    """

    name: str
    module: str
    signature: str


#: Every backend, in pipeline order; each activation needs a lowering in each (numpy: the reference).
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("numpy", "adntn_deploy.ir.activations",
                "f(x: np.ndarray) -> np.ndarray of the same shape and dtype: the Activation's numpy field"),
        Backend("torch", "adntn_deploy.ir.executors",
                "f(x: torch.Tensor) -> torch.Tensor of the same shape and dtype, differentiable"),
        Backend("onnx", "adntn_deploy.onnx_export.lowering",
                "f(emitter: NodeEmitter, x: str, dtype: np.float32 | np.float64) -> str, the name of the value "
                "holding the result after appending the nodes that compute it"),
        Backend("tir", "adntn_deploy.compiler.schedules.streamed_dense",
                "f(x: tvm.tirx.PrimExpr, dtype: str) -> PrimExpr, a scalar expression of dtype"),
    )
}

#: backend -> activation name -> lowering, filled by the backend modules (numpy reads ACTIVATIONS)
_LOWERINGS: dict[str, dict[str, Callable]] = {name: {} for name in BACKENDS if name != "numpy"}


def _check_backend(backend: str) -> Backend:
    if backend not in BACKENDS:
        raise GeneratorError(f"unknown activation backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return BACKENDS[backend]


def register_lowering(backend: str, name: str, lowering: Callable, *, replace: bool = False) -> Callable:
    """Register ``lowering`` as activation ``name``'s implementation in ``backend``; returns ``lowering``.

    ``lowering`` is called as :data:`BACKENDS` ``[backend].signature`` says. Backend modules call this at
    import time for each activation, so importing the module is what makes its lowerings available.

    Raises:
        GeneratorError: ``backend`` is unknown or is ``numpy`` (the reference is the Activation's own
            ``numpy`` field); ``name`` is not a registered activation (add it to :data:`ACTIVATIONS` first);
            ``lowering`` is not callable; or ``name`` already has a lowering there and ``replace`` is false.
    """
    _check_backend(backend)
    if backend == "numpy":
        raise GeneratorError(
            f"activation {name!r}: the numpy lowering is the activation's reference; set it as the Activation's "
            "numpy field in ACTIVATIONS (adntn_deploy/ir/activations.py), not with register_lowering"
        )
    if name not in ACTIVATIONS:
        raise GeneratorError(
            f"cannot register a {backend} lowering for unknown activation {name!r}: add an Activation (name, numpy "
            "reference, description) to ACTIVATIONS in adntn_deploy/ir/activations.py first"
        )
    if not callable(lowering):
        raise GeneratorError(f"the {backend} lowering of activation {name!r} must be callable, not {lowering!r}")
    table = _LOWERINGS[backend]
    if name in table and not replace:
        raise GeneratorError(
            f"activation {name!r} already has a {backend} lowering: pass replace=True to override it"
        )
    table[name] = lowering
    return lowering


def register_lowerings(backend: str, lowerings: dict[str, Callable], *, replace: bool = False) -> None:
    """Register each ``name: lowering`` of ``lowerings`` in ``backend`` (see :func:`register_lowering`).

    Raises:
        GeneratorError: as :func:`register_lowering`, for the first entry that fails (the ones before it
            stay registered).
    """
    for name, lowering in lowerings.items():
        register_lowering(backend, name, lowering, replace=replace)


def get_lowering(backend: str, name: str) -> Callable:
    """Return activation ``name``'s lowering in ``backend`` (for ``numpy``: its reference function).

    Raises:
        GeneratorError: the activation or the backend is unknown, or the backend has no lowering for it;
            the message names both and the module where the missing lowering goes.
    """
    activation = get_activation(name)
    info = _check_backend(backend)
    if backend == "numpy":
        return activation.numpy
    lowering = _LOWERINGS[backend].get(name)
    if lowering is not None:
        return lowering
    hint = (f" (no {backend} lowering is registered at all: is {info.module} imported?)"
            if not _LOWERINGS[backend] else "")
    raise GeneratorError(
        f"activation {name!r} has no {backend} lowering{hint}: add register_lowering({backend!r}, {name!r}, f) "
        f"to {info.module}, where f is {info.signature}"
    )


def missing_lowerings(backends: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """The (backend, activation name) pairs without a lowering, in :data:`BACKENDS` then registry order.

    ``backends`` restricts the check (default: all of :data:`BACKENDS`). A backend's lowerings exist once
    its module (``BACKENDS[backend].module``) is imported; import those first, or every activation counts
    as missing there. An empty list means every activation runs everywhere.

    Raises:
        GeneratorError: an unknown backend name.
    """
    chosen = tuple(BACKENDS) if backends is None else tuple(backends)
    for backend in chosen:
        _check_backend(backend)
    return [
        (backend, name)
        for backend in BACKENDS if backend in chosen
        for name, activation in ACTIVATIONS.items()
        if not (callable(activation.numpy) if backend == "numpy" else name in _LOWERINGS[backend])
    ]
