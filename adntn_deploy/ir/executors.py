"""Run a generator program: a numpy reference executor and a torch executor (autograd-capable).

Both replay ``ir.steps`` in order and free each intermediate after its last use, so the peak memory is
the one :meth:`GeneratorIR.report` predicts. Results agree to floating-point rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from adntn_deploy.ir.activations import LEAKY_RELU_SLOPE, get_activation
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
        env[step.output] = get_activation(step.activation).numpy(out)
        for name in (step.lhs, step.rhs):
            if ir.last_use[name] == i and name not in cores:
                del env[name]
    result = env[ir.result].transpose(ir.output_permutation).reshape(ir.weight_shape)
    return result * np.asarray(ir.output_scale, dtype=result.dtype)


def _torch_activation(name: str):
    import torch
    import torch.nn.functional as F

    get_activation(name)  # raises a clear error for unknown names
    return {
        "identity": lambda x: x,
        "relu": torch.relu,
        "leaky_relu": lambda x: F.leaky_relu(x, LEAKY_RELU_SLOPE),
        "tanh": torch.tanh,
        "gelu": F.gelu,
        "sigmoid": torch.sigmoid,
        "sin": torch.sin,
    }[name]


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
        env[step.output] = _torch_activation(step.activation)(out)
        for name in (step.lhs, step.rhs):
            if ir.last_use[name] == i and name not in cores:
                del env[name]
    result = env[ir.result].permute(ir.output_permutation).reshape(ir.weight_shape)
    return result * ir.output_scale
