"""Core initialisation and variance calibration.

Cores are drawn so every contraction keeps roughly unit variance (normal cores scaled by 1/sqrt(fan),
mixing tensors near the identity). The generated weight is then measured once and ``output_scale`` is set
so the weight's standard deviation equals the dense initialisation's (Kaiming: sqrt(2/fan_in), Xavier:
sqrt(2/(fan_in+fan_out))), whatever the activations did to the variance on the way.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from adntn_deploy.generators.families import CoreInit
from adntn_deploy.generators.spec import GeneratorSpec, fan_in_out
from adntn_deploy.ir.executors import generate_numpy
from adntn_deploy.ir.program import GeneratorError, GeneratorIR


def sample_cores(ir: GeneratorIR, inits: dict[str, CoreInit], seed: int) -> dict[str, np.ndarray]:
    """Draw every core of ``ir`` as float64 from ``inits`` with a numpy Generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    cores = {}
    for core in ir.cores:
        kind, std = inits[core.name]
        if kind == "normal":
            cores[core.name] = rng.normal(0.0, std, size=core.shape)
        elif kind == "identity":
            half = len(core.shape) // 2
            rows = math.prod(core.shape[:half])
            cols = math.prod(core.shape[half:])
            eye = np.eye(rows, cols)
            cores[core.name] = (eye + rng.normal(0.0, std / math.sqrt(cols), size=(rows, cols))).reshape(core.shape)
        else:  # pragma: no cover - families only emit the two kinds above
            raise GeneratorError(f"unknown core init {kind!r}")
    return cores


def target_std(spec: GeneratorSpec, weight_shape: Sequence[int]) -> float:
    """Standard deviation of the dense initialisation named by ``spec.init`` for this weight shape."""
    fan_in, fan_out = fan_in_out(weight_shape)
    if spec.init == "kaiming":
        return math.sqrt(2.0 / fan_in)
    return math.sqrt(2.0 / (fan_in + fan_out))


def calibrate_scale(ir: GeneratorIR, cores: dict[str, np.ndarray], std: float) -> GeneratorIR:
    """Return ``ir`` with ``output_scale`` chosen so the generated weight has standard deviation ``std``.

    Raises:
        GeneratorError: the generated weight is constant (zero variance), e.g. relu at every level killed it.
    """
    weight = generate_numpy(replace(ir, output_scale=1.0), {k: v.astype(np.float32) for k, v in cores.items()})
    measured = float(weight.std(dtype=np.float64))
    if not math.isfinite(measured) or measured < 1e-30:
        raise GeneratorError(
            "the generated weight is constant at initialisation; choose another activation or seed"
        )
    return replace(ir, output_scale=std / measured)
