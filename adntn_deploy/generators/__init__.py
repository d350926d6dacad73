"""Generator families (TTN, aTTN, MERA): build a validated IR plus initial cores for a weight shape."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from adntn_deploy.generators.families import declare_network
from adntn_deploy.generators.init import calibrate_scale, sample_cores, target_std
from adntn_deploy.generators.spec import FAMILIES, GeneratorSpec, factorize
from adntn_deploy.ir.program import GeneratorError, GeneratorIR


@dataclass(frozen=True)
class Generator:
    """A generator program and its initial cores (float64 numpy arrays keyed by core name)."""

    ir: GeneratorIR
    cores: dict[str, np.ndarray]


def build_structure(spec: GeneratorSpec, weight_shape: Sequence[int]) -> tuple[GeneratorIR, dict]:
    """Plan the program for ``weight_shape`` without sampling cores; returns (ir with scale 1, core inits).

    Cheap (no weight is generated): use it to count parameters and costs of big configurations.
    """
    ir, inits, _ = _plan(spec, weight_shape)
    return ir, inits


def _plan(spec: GeneratorSpec, weight_shape: Sequence[int]):
    shape = tuple(int(d) for d in weight_shape)
    ctx, result, order = declare_network(spec, shape)
    out_modes, in_modes = spec.tensorize(shape)
    metadata = {"spec": spec.to_dict(), "out_modes": list(out_modes), "in_modes": list(in_modes)}
    ir = ctx.builder.build(result, order, shape, planner=spec.planner, metadata=metadata)
    return ir, ctx.inits, ctx


def build_generator(spec: GeneratorSpec, weight_shape: Sequence[int], target: np.ndarray | None = None) -> Generator:
    """Build the IR for ``weight_shape`` ((out, in) or (Cout, Cin, kh, kw)) and initialise its cores.

    The output scale is calibrated so the generated weight has the dense initialisation's variance; this
    generates the weight once (for a 4096x25088 weight about a second and 0.4 GB).

    With ``target`` (a dense weight of that shape), the cores instead start from the hierarchical SVD of
    the target in the activations' linear regime (see :mod:`adntn_deploy.generators.linear_init`), the
    best start for :func:`adntn_deploy.fit.fit`; the output scale is then the target's standard deviation.

    Raises:
        GeneratorError: invalid spec, modes that do not factorise the shape, a target of another shape,
            a degenerate initialisation, or a target init for shared cores or non-linear-at-zero activations.
    """
    ir, inits, ctx = _plan(spec, weight_shape)
    seed = 0 if spec.seed is None else spec.seed  # torch layers resolve None from torch's RNG before this
    if target is None:
        cores = sample_cores(ir, inits, seed)
        ir = calibrate_scale(ir, cores, target_std(spec, ir.weight_shape))
        return Generator(ir, cores)
    from adntn_deploy.generators.linear_init import linear_cores

    weight = np.asarray(target, dtype=np.float64)
    if weight.shape != ir.weight_shape:
        raise GeneratorError(f"target has shape {weight.shape}, the generator makes {ir.weight_shape}")
    scale = float(weight.std()) or 1.0
    matrix = weight.reshape(weight.shape[0], -1)
    return Generator(replace(ir, output_scale=scale), linear_cores(ctx, matrix, scale, seed, weight.shape))


__all__ = ["FAMILIES", "Generator", "GeneratorSpec", "build_generator", "build_structure", "factorize"]
