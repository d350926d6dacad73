"""Training and fine-tuning loops for image classifiers (dense baselines and compressed models).

Everything is seeded: the same call on the same machine gives the same model. Optimiser: Adam with a
cosine learning-rate decay to zero over the run. Generator cores get per-core learning rates relative to
each core's RMS (``core_lr`` times it): the cores of one generator span orders of magnitude after the
SVD start, and one absolute step size would wreck the small ones and freeze the large ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from adntn_deploy import distributed
from adntn_deploy.data import Dataset
from adntn_deploy.errors import GeneratorError
from adntn_deploy.nn.generated import GeneratedWeight

SCOPES = ("all", "head")


@dataclass
class TrainResult:
    """What a training run did: per-epoch validation accuracy (0..1) and mean loss, and wall time (s)."""

    epochs: int
    val_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    scope: str = "all"

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return {"epochs": self.epochs, "val_accuracy": self.val_accuracy, "train_loss": self.train_loss,
                "seconds": self.seconds, "scope": self.scope}


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``model`` (put in eval mode) on ``x``, computed in batches on the model's device; returned on ``x``'s."""
    model.eval()
    dev = next((p.device for p in model.parameters()), x.device)
    return (torch.cat([model(x[i:i + batch_size].to(dev)).to(x.device) for i in range(0, len(x), batch_size)])
            if len(x) else torch.empty(0))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``(x, y)``.

    Raises:
        GeneratorError: x and y hold different numbers of examples, or none.
    """
    if len(x) != len(y) or len(y) == 0:
        raise GeneratorError(f"evaluate needs as many labels as inputs (got {len(x)} inputs, {len(y)} labels)")
    return float((predict_logits(model, x, batch_size).argmax(1) == y).float().mean())


def _param_groups(module: nn.Module, lr: float, core_lr: float) -> list[dict]:
    cores, core_ids = [], set()
    for sub in module.modules():
        if isinstance(sub, GeneratedWeight):
            for p in sub.cores.values():
                if p.requires_grad:
                    rms = max(float(p.detach().pow(2).mean().sqrt()), 1e-6)
                    cores.append({"params": [p], "lr": core_lr * rms})
                    core_ids.add(id(p))
    dense = [p for p in module.parameters() if p.requires_grad and id(p) not in core_ids]
    return ([{"params": dense, "lr": lr}] if dense else []) + cores


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from a dense teacher while fine-tuning a compressed student.

    The loss is ``(1 - weight) * CE(student, labels) + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T))``
    plus, when ``match_layers`` > 0, ``match_layers`` times the mean over the compressed layers of
    ``||student layer output - teacher layer output||^2 / ||teacher layer output||^2`` (layers matched by
    module name). ``teacher`` must take the same inputs as the student (for scope "head", the same
    Sequential model: it is cut at the same index).
    """

    teacher: nn.Module
    temperature: float = 4.0
    weight: float = 0.7
    match_layers: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 <= self.weight <= 1 or not self.match_layers >= 0:
            raise GeneratorError(
                f"distillation needs temperature > 0, 0 <= weight <= 1 and match_layers >= 0 "
                f"(got {self.temperature}, {self.weight}, {self.match_layers})"
            )


class _DistillLoss:
    """Computes the distillation loss of one batch; hooks capture matched layers' outputs."""

    def __init__(self, student: nn.Module, distill: Distillation) -> None:
        self.distill, self.teacher = distill, distill.teacher
        self.teacher.eval()
        self.captured: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self.hooks = []
        if distill.match_layers > 0:
            teacher_modules = dict(self.teacher.named_modules())
            for name, sub in student.named_modules():
                if any(isinstance(m, GeneratedWeight) for m in sub.children()) and name in teacher_modules:
                    self.hooks.append(sub.register_forward_hook(self._capture("student", name)))
                    self.hooks.append(teacher_modules[name].register_forward_hook(self._capture("teacher", name)))

    def _capture(self, who: str, name: str):
        def hook(module, args, output):
            self.captured[who][name] = output
        return hook

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.distill
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        t = d.temperature
        soft = nn.functional.kl_div(nn.functional.log_softmax(logits / t, -1), nn.functional.log_softmax(teacher_logits / t, -1),
                                    reduction="batchmean", log_target=True) * t * t
        loss = (1 - d.weight) * nn.functional.cross_entropy(logits, y) + d.weight * soft
        names = [n for n in self.captured["student"] if n in self.captured["teacher"]]
        if names:
            terms = [((self.captured["student"][n] - self.captured["teacher"][n]) ** 2).sum()
                     / self.captured["teacher"][n].pow(2).sum().clamp_min(1e-12) for n in names]
            loss = loss + d.match_layers * torch.stack(terms).mean()
        self.captured = {"student": {}, "teacher": {}}
        return loss

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _fit_loop(
    module: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, val: Callable[[], float], *,
    epochs: int, batch_size: int, lr: float, core_lr: float, seed: int, progress: bool, desc: str, warmup: int = 0,
    distill: Distillation | None = None,
) -> TrainResult:
    """The shared loop. Under an initialised process group (:mod:`adntn_deploy.distributed`) every rank draws
    the same order, trains on its shard of each global batch of ``batch_size`` through DDP, and the loss of
    each shard is weighted by its share of the batch, so the averaged gradient is the global batch's mean
    gradient even when the shards differ in size; dropout draws from ``seed + rank``."""
    from tqdm import tqdm

    if epochs < 0 or batch_size < 1 or lr <= 0 or core_lr <= 0:
        raise GeneratorError(f"need epochs >= 0, batch size >= 1 and positive learning rates (got {epochs}, {batch_size}, {lr}, {core_lr})")
    world = distributed.world_size()
    torch.manual_seed(seed + distributed.rank())
    home = next((p.device for p in module.parameters()), torch.device("cpu"))
    net = distributed.wrap(module)  # the module itself in a plain run; DDP (on the rank's device) when distributed
    dev = distributed.device() if net is not module else home
    opt = torch.optim.Adam(_param_groups(module, lr, core_lr))
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    warm = min(warmup, total_steps // 4)

    def factor(step: int) -> float:  # linear warmup, then cosine decay to 0
        ramp = min(1.0, (step + 1) / warm) if warm else 1.0
        return ramp * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    cross_entropy = nn.CrossEntropyLoss()
    teacher_home = None
    if distill is not None:
        teacher_home = next((p.device for p in distill.teacher.parameters()), dev)
        distill.teacher.to(dev)
    distill_loss = _DistillLoss(module, distill) if distill is not None else None

    def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return distill_loss(logits, x, y) if distill_loss is not None else cross_entropy(logits, y)

    result = TrainResult(epochs)
    start = time.perf_counter()
    shuffler = torch.Generator().manual_seed(seed)
    try:
        for epoch in range(epochs):
            module.train()
            order = torch.randperm(len(train_y), generator=shuffler)
            total, seen = 0.0, 0
            bar = tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                       disable=None if progress and distributed.is_main_process() else True, leave=False)
            for step in bar:
                batch = order[step * batch_size:(step + 1) * batch_size]
                idx = distributed.shard(batch)
                opt.zero_grad(set_to_none=True)
                batch_x, batch_y = train_x[idx].to(dev), train_y[idx].to(dev)
                logits = net(batch_x)
                if len(idx):
                    loss = loss_fn(logits, batch_x, batch_y)
                    total += float(loss.detach()) * len(idx)
                    seen += len(idx)
                else:  # a batch smaller than the group leaves this rank nothing: zero gradients, DDP still syncs
                    loss = logits.sum() * 0.0
                # DDP averages over ranks: weighting each shard's mean by world * its share of the batch makes
                # that average the whole batch's mean gradient (a plain run: a factor of exactly 1)
                (loss * (world * len(idx) / len(batch)) if world > 1 else loss).backward()
                opt.step()
                sched.step()
                if step % 20 == 0 and seen:
                    bar.set_postfix(loss=f"{total / seen:.4f}")
            bar.close()
            total, seen = distributed.all_reduce_sum([total, seen])
            if not math.isfinite(total):
                raise GeneratorError(f"training diverged in epoch {epoch + 1} (non-finite loss); lower the learning rate")
            result.train_loss.append(total / max(seen, 1))
            result.val_accuracy.append(val())
    finally:
        if distill_loss is not None:
            distill_loss.close()
        if teacher_home is not None:
            distill.teacher.to(teacher_home)
        module.to(home)
    result.seconds = time.perf_counter() - start
    module.eval()
    return result


def train(model: nn.Module, data: Dataset, *, epochs: int = 3, batch_size: int = 128, lr: float = 1e-3,
          seed: int = 0, progress: bool = True) -> TrainResult:
    """Train every parameter of ``model`` on ``data``'s training split (cross-entropy, Adam, cosine decay).

    Returns per-epoch validation accuracy and loss; the model is left in eval mode. Under an initialised
    torch.distributed group (torchrun, :mod:`adntn_deploy.distributed`) the run is data-parallel with
    ``batch_size`` as the global batch, and matches one process up to float summation order.

    Raises:
        GeneratorError: invalid hyper-parameters, or a diverging run.
    """
    return _fit_loop(model, data.train_x, data.train_y, lambda: evaluate(model, data.val_x, data.val_y),
                     epochs=epochs, batch_size=batch_size, lr=lr, core_lr=1e-2, seed=seed, progress=progress, desc="train")


def first_generated_index(model: nn.Sequential) -> int:
    """Index of the first child of ``model`` that holds a generated layer.

    Raises:
        GeneratorError: ``model`` is not ``nn.Sequential`` or has no generated layer.
    """
    if not isinstance(model, nn.Sequential):
        raise GeneratorError("scope 'head' needs an nn.Sequential model; use scope 'all' for other modules")
    for k, child in enumerate(model):
        if any(isinstance(m, GeneratedWeight) for m in child.modules()):
            return k
    raise GeneratorError("the model has no generated layer to fine-tune: compress it first")


def finetune(model: nn.Module, data: Dataset, *, epochs: int = 1, scope: str = "all", batch_size: int = 128,
             lr: float = 1e-3, core_lr: float = 3e-2, warmup: int = 200, seed: int = 0, progress: bool = True,
             distill: Distillation | None = None) -> TrainResult:
    """Fine-tune a compressed model on ``data`` end to end (``scope="all"``) or only from its first generated
    layer on (``scope="head"``).

    With "head" (``nn.Sequential`` models), the layers before the first generated layer are frozen and run
    once, in eval mode, over the whole dataset; the head then trains on those cached features, which is
    several times faster for conv nets whose classifier was compressed. ``lr`` is the dense parameters'
    learning rate, ``core_lr`` the cores' rate relative to each core's RMS. Learning rates ramp up linearly
    over the first ``warmup`` steps (at most a quarter of the run): right after compression the loss is
    high, and full-size first steps shrink the cores' product until the next ReLUs die (measured: a
    2,000x aTTN VGG classifier stuck at chance without warmup, trained with it).

    ``distill`` (a :class:`Distillation` holding the dense model) adds knowledge distillation: the
    student learns the teacher's softened logits (and optionally each compressed layer's output) as
    well as the labels. With "head" the teacher is cut at the same index and runs on the cached features.

    Under an initialised torch.distributed group the training is data-parallel, as in :func:`train`
    (with "head", every rank computes the cached features itself).

    Raises:
        GeneratorError: unknown scope, "head" on a model that is not Sequential or has no generated layer,
            invalid hyper-parameters, or a diverging run.
    """
    if scope not in SCOPES:
        raise GeneratorError(f"unknown fine-tuning scope {scope!r}: use one of {', '.join(SCOPES)}")
    if scope == "all":
        result = _fit_loop(model, data.train_x, data.train_y, lambda: evaluate(model, data.val_x, data.val_y),
                           epochs=epochs, batch_size=batch_size, lr=lr, core_lr=core_lr, seed=seed, progress=progress, desc="finetune",
                           warmup=warmup, distill=distill)
        return result
    k = first_generated_index(model)
    prefix, head = model[:k], model[k:]
    if distill is not None:
        if not isinstance(distill.teacher, nn.Sequential) or len(distill.teacher) != len(model):
            raise GeneratorError("distillation with scope 'head' needs the dense teacher as the same Sequential model")
        distill = Distillation(distill.teacher[k:], distill.temperature, distill.weight, distill.match_layers)
    for p in prefix.parameters():
        p.requires_grad_(False)
    try:
        train_f, val_f = predict_logits(prefix, data.train_x), predict_logits(prefix, data.val_x)
        result = _fit_loop(head, train_f, data.train_y, lambda: evaluate(head, val_f, data.val_y),
                           epochs=epochs, batch_size=batch_size, lr=lr, core_lr=core_lr, seed=seed, progress=progress, desc="finetune head",
                           warmup=warmup, distill=distill)
    finally:
        for p in prefix.parameters():
            p.requires_grad_(True)
    result.scope = "head"
    model.eval()
    return result
