"""Run a generator program: a numpy reference executor and a torch executor (autograd-capable).

Both replay ``ir.steps`` in order and free each intermediate after its last use, so the peak memory is
the one :meth:`GeneratorIR.report` predicts. Results agree to floating-point rounding.

This module also registers the activations' torch lowerings in :mod:`adntn_deploy.ir.activations`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from adntn_deploy.ir.activations import LEAKY_RELU_SLOPE, get_lowering, register_lowerings
from adntn_deploy.ir.program import GeneratorError, GeneratorIR

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _check_cores(ir: GeneratorIR, cores: Mapping[str, Any]) -> None:
    for core in ir.cores:
        if core.name not in cores:
            raise GeneratorError(f"core {core.name!r} is missing: the generator needs {list(ir.core_names)}")
        shape = tuple(cores[core.name].shape)
        if shape != core.shape:
            raise GeneratorError(f"core {core.name!r} has shape {shape}, the generator expects {core.shape}")


def generate_numpy(ir: GeneratorIR, cores: Mapping[str, np.ndarray]) -> np.ndarray:
    """Generate the weight with numpy, in the cores' dtype; returns an array of shape ``ir.weight_shape``.

    Raises:
        GeneratorError: a core is missing or has the wrong shape.
    """
    _check_cores(ir, cores)
    env: dict[str, np.ndarray] = {name: np.asarray(cores[name]) for name in ir.core_names}
    for i, step in enumerate(ir.steps):
        out = np.einsum(step.equation, env[step.lhs], env[step.rhs], optimize=True)
        env[step.output] = get_lowering("numpy", step.activation)(out)
        for name in (step.lhs, step.rhs):
            if ir.last_use[name] == i and name not in cores:
                del env[name]
    result = env[ir.result].transpose(ir.output_permutation).reshape(ir.weight_shape)
    return result * np.asarray(ir.output_scale, dtype=result.dtype)


def _torch():
    import torch  # at call time: the ir layer never imports torch when loaded

    return torch


def _functional():
    import torch.nn.functional as F

    return F


# the torch lowerings of the activations in adntn_deploy.ir.activations (see BACKENDS["torch"])
register_lowerings("torch", {
    "identity": lambda x: x,
    "relu": lambda x: _torch().relu(x),
    "leaky_relu": lambda x: _functional().leaky_relu(x, LEAKY_RELU_SLOPE),
    "tanh": lambda x: _torch().tanh(x),
    "gelu": lambda x: _functional().gelu(x),
    "sigmoid": lambda x: _torch().sigmoid(x),
    "sin": lambda x: _torch().sin(x),
})


def generate_torch(ir: GeneratorIR, cores: Mapping[str, "torch.Tensor"], precise: bool = False) -> "torch.Tensor":
    """Generate the weight with torch (differentiable w.r.t. the cores), in the cores' dtype and device.

    ``precise=True`` runs every step but the last in float64 and the last (the one that writes the big
    weight) in the cores' dtype: the weight is then within a few float32 ulps of exact, which is what the
    ONNX and TVM lowerings compute too (see :mod:`adntn_deploy.onnx_export.lowering`), at no extra memory
    for the weight itself. Used for inference; training keeps one dtype throughout.

    Raises:
        GeneratorError: a core is missing or has the wrong shape.
    """
    import torch

    _check_cores(ir, cores)
    out_dtype = next(iter(cores.values())).dtype if cores else torch.float32
    env: dict[str, torch.Tensor] = {
        name: cores[name].to(torch.float64) if precise else cores[name] for name in ir.core_names
    }
    last = len(ir.steps) - 1
    for i, step in enumerate(ir.steps):
        lhs, rhs = env[step.lhs], env[step.rhs]
        if precise and i == last:
            lhs, rhs = lhs.to(out_dtype), rhs.to(out_dtype)
        out = torch.einsum(step.equation, lhs, rhs)
        env[step.output] = get_lowering("torch", step.activation)(out)
        for name in (step.lhs, step.rhs):
            if ir.last_use[name] == i and name not in cores:
                del env[name]
    result = env[ir.result].permute(ir.output_permutation).reshape(ir.weight_shape)
    return result * ir.output_scale
