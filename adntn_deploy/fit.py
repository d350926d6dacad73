"""Fit a generator's cores to a given dense weight (used by ``compress`` and the main job).

The loss is the squared relative Frobenius error ||G(cores) - W||^2 / ||W||^2. Fitting is seeded and
deterministic on CPU (torch's deterministic algorithms, one thread order), so the same call gives the
same cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from adntn_deploy.ir.executors import generate_torch
from adntn_deploy.ir.program import GeneratorError, GeneratorIR

METHODS = ("adam", "lbfgs")


@dataclass
class FitResult:
    """The best cores seen (float32 numpy, keyed by core name), their relative error, and the error history."""

    cores: dict[str, np.ndarray]
    relative_error: float
    initial_relative_error: float
    history: list[float] = field(default_factory=list)
    steps: int = 0


def relative_error(ir: GeneratorIR, cores: Mapping[str, np.ndarray], target: np.ndarray) -> float:
    """||G(cores) - target||_F / ||target||_F computed in float64."""
    with torch.no_grad():
        w = generate_torch(ir, {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in cores.items()})
    t = torch.as_tensor(np.asarray(target), dtype=torch.float64)
    return float(torch.linalg.norm(w - t) / torch.linalg.norm(t))


def fit(
    ir: GeneratorIR,
    cores: Mapping[str, np.ndarray],
    target: np.ndarray,
    *,
    steps: int = 500,
    method: str = "adam",
    lr: float | None = None,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Fit ``cores`` so the generator reproduces ``target`` (shape ``ir.weight_shape``).

    Args:
        steps: optimizer steps (Adam) or iterations (L-BFGS).
        method: "adam" (robust; cosine decay) or "lbfgs" (fast on small generators).
        lr: learning rate; None picks the method's default. For Adam it is relative: each core's step is
            ``lr`` times that core's initial RMS (default 1e-2); for L-BFGS it is absolute (default 1).
        seed: seeds torch for anything random in the optimizer.
        callback: called as ``callback(step, relative_error)`` after every step (progress bars).

    Raises:
        GeneratorError: the target's shape differs from the generator's weight shape, or is all zeros.
    """
    if method not in METHODS:
        raise GeneratorError(f"unknown fit method {method!r}: use one of {', '.join(METHODS)}")
    target = np.asarray(target)
    if tuple(target.shape) != ir.weight_shape:
        raise GeneratorError(f"target has shape {tuple(target.shape)}, the generator makes {ir.weight_shape}")
    torch.manual_seed(seed)
    t = torch.as_tensor(target, dtype=torch.float32)
    norm2 = float((t.double() ** 2).sum())
    if norm2 == 0.0:
        raise GeneratorError("the target weight is all zeros; there is nothing to fit")
    params = {k: torch.tensor(np.asarray(v), dtype=torch.float32, requires_grad=True) for k, v in cores.items()}

    def loss_fn() -> torch.Tensor:
        return ((generate_torch(ir, params) - t) ** 2).sum() / norm2

    initial = math.sqrt(float(loss_fn().detach()))
    history: list[float] = []
    # Adam's first steps can overshoot a good (SVD) start: keep the best cores seen, evaluated before each step
    best = (initial, {k: v.detach().clone() for k, v in params.items()})

    def remember(err: float) -> None:
        nonlocal best
        if err < best[0]:
            best = (err, {k: v.detach().clone() for k, v in params.items()})
    if method == "adam":
        # one group per core, its learning rate relative to the core's RMS: cores span orders of magnitude
        # (the SVD start scales some by 0.05, others by 1/0.05) and one absolute step size fits none of them
        base = lr or 1e-2
        groups = [{"params": [p], "lr": base * max(float(p.detach().pow(2).mean().sqrt()), 1e-6)} for p in params.values()]
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            history.append(math.sqrt(float(loss.detach())))
            remember(history[-1])
            opt.step()
            sched.step()
            if callback:
                callback(step, history[-1])
    else:
        opt_l = torch.optim.LBFGS(params.values(), lr=lr or 1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
        for step in range(steps):
            def closure() -> torch.Tensor:
                opt_l.zero_grad(set_to_none=True)
                loss = loss_fn()
                loss.backward()
                return loss

            loss = opt_l.step(closure)
            history.append(math.sqrt(float(loss.detach())))
            remember(history[-1])
            if callback:
                callback(step, history[-1])
    with torch.no_grad():
        remember(math.sqrt(float(loss_fn())))
    final, fitted_tensors = best
    if not math.isfinite(final):
        raise GeneratorError("fitting diverged (non-finite error); lower the learning rate")
    return FitResult({k: v.numpy().copy() for k, v in fitted_tensors.items()}, final, initial, history, steps)
