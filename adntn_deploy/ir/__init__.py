"""Generator IR: the contraction program every later stage (torch, ONNX, TVM) replays."""

from adntn_deploy.ir.activations import ACTIVATIONS, get_activation
from adntn_deploy.ir.executors import generate_numpy, generate_torch
from adntn_deploy.ir.planner import PATH_OPTIMIZERS, get_path_optimizer
from adntn_deploy.ir.program import (
    CORE_ROLES,
    Core,
    GeneratorError,
    GeneratorIR,
    GeneratorReport,
    Step,
)

__all__ = [
    "ACTIVATIONS",
    "CORE_ROLES",
    "Core",
    "GeneratorError",
    "GeneratorIR",
    "GeneratorReport",
    "PATH_OPTIMIZERS",
    "Step",
    "generate_numpy",
    "generate_torch",
    "get_activation",
    "get_path_optimizer",
]
