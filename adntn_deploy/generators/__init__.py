"""Generator families (TTN, aTTN, MERA): build a validated IR plus initial cores for a weight shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from adntn_deploy.generators.families import declare_network
from adntn_deploy.generators.init import calibrate_scale, sample_cores, target_std
from adntn_deploy.generators.spec import FAMILIES, GeneratorSpec, factorize
from adntn_deploy.ir.program import GeneratorIR


@dataclass(frozen=True)
class Generator:
    """A generator program and its initial cores (float64 numpy arrays keyed by core name)."""

    ir: GeneratorIR
    cores: dict[str, np.ndarray]


def build_structure(spec: GeneratorSpec, weight_shape: Sequence[int]) -> tuple[GeneratorIR, dict]:
    """Plan the program for ``weight_shape`` without sampling cores; returns (ir with scale 1, core inits).

    Cheap (no weight is generated): use it to count parameters and costs of big configurations.
    """
    shape = tuple(int(d) for d in weight_shape)
    ctx, result, order = declare_network(spec, shape)
    out_modes, in_modes = spec.tensorize(shape)
    metadata = {"spec": spec.to_dict(), "out_modes": list(out_modes), "in_modes": list(in_modes)}
    ir = ctx.builder.build(result, order, shape, planner=spec.planner, metadata=metadata)
    return ir, ctx.inits


def build_generator(spec: GeneratorSpec, weight_shape: Sequence[int]) -> Generator:
    """Build the IR for ``weight_shape`` ((out, in) or (Cout, Cin, kh, kw)) and initialise its cores.

    The output scale is calibrated so the generated weight has the dense initialisation's variance; this
    generates the weight once (for a 4096x25088 weight about a second and 0.4 GB).

    Raises:
        GeneratorError: invalid spec, modes that do not factorise the shape, or a degenerate initialisation.
    """
    ir, inits = build_structure(spec, weight_shape)
    cores = sample_cores(ir, inits, spec.seed)
    ir = calibrate_scale(ir, cores, target_std(spec, ir.weight_shape))
    return Generator(ir, cores)


__all__ = ["FAMILIES", "Generator", "GeneratorSpec", "build_generator", "build_structure", "factorize"]
