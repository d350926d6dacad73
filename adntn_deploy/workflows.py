"""The training-side workflows as one call each: train a zoo model into a checkpoint, compress a model into one.

``adntn-deploy train`` / ``compress``, the demo (:mod:`adntn_deploy.demo`) and the accuracy benchmark
(``benchmarks/accuracy.py``) all run these, so the three cannot drift apart. Each returns an outcome
object whose :meth:`summary` is the JSON the command prints; the command line only parses and formats.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from adntn_deploy.compression import CompressionReport
from adntn_deploy.data import Dataset
from adntn_deploy.errors import CheckpointError, GeneratorError
from adntn_deploy.training import TrainResult

__all__ = ["CompressOutcome", "TrainOutcome", "compress_checkpoint", "input_records", "train_checkpoint"]


def input_records(data: Dataset) -> list[dict[str, Any]]:
    """The ``inputs`` entry a checkpoint records for ``data``'s models (name "input", batch 1), as export reads it."""
    return [{"name": "input", "shape": [1, *data.input_shape]}]


def _dataset(data: Dataset | str, data_dir: str | os.PathLike | None) -> Dataset:
    from adntn_deploy.data import load_dataset

    return data if isinstance(data, Dataset) else load_dataset(data, data_dir)


@dataclass
class TrainOutcome:
    """What :func:`train_checkpoint` did: the trained model, its test accuracy (0..1), the run, the file written."""

    model: nn.Module
    name: str
    data: Dataset
    test_accuracy: float
    training: TrainResult
    generated: dict[str, Any] | None = None
    checkpoint: Path | None = None

    @property
    def params(self) -> int:
        """Parameters of the trained model (a count)."""
        return sum(p.numel() for p in self.model.parameters())

    def summary(self) -> dict[str, Any]:
        """JSON-ready: model, data, test_accuracy (0..1), training (seconds, per-epoch values), generated, params, checkpoint."""
        return {"model": self.name, "data": self.data.describe(), "test_accuracy": self.test_accuracy,
                "training": self.training.as_dict(), "generated": self.generated, "params": self.params,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def train_checkpoint(
    model: str,
    output: str | os.PathLike | None,
    data: Dataset | str = "fashion-mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    family: str | None = None,
    ratio: float | None = None,
    layout: str = "operator",
    layers: str | Sequence[str] = "classifier",
    progress: bool = False,
) -> TrainOutcome:
    """Train zoo model ``model`` on ``data`` and write it to the checkpoint ``output`` (None: write nothing).

    Dense by default; with ``family`` and ``ratio`` the ``layers`` are generated layers from the start
    (random, variance-calibrated cores reaching ``ratio`` per layer, :func:`~adntn_deploy.compression.generated_from_scratch`).
    ``data`` is a :class:`~adntn_deploy.data.Dataset` or a dataset name (read from ``data_dir`` for
    Fashion-MNIST). ``lr`` is Adam's learning rate (cosine decay to 0), ``epochs`` full passes, ``progress``
    shows progress bars on stderr. The checkpoint records the input shape (for export), the dataset, the
    test accuracy and the run.

    Raises:
        GeneratorError: an unknown zoo name (raised before any data is read), ``family`` without ``ratio``
            or the reverse, a selection or ratio the generated layers cannot reach, bad hyper-parameters,
            or a diverging run.
        DataError: the dataset is unknown, missing or corrupt.
    """
    from adntn_deploy.checkpoint import save_checkpoint
    from adntn_deploy.models.zoo import ZOO, build_model
    from adntn_deploy.training import evaluate, train

    if (family is None) != (ratio is None):
        raise GeneratorError("give family= and ratio= together to train generated layers from scratch")
    if model not in ZOO:
        build_model(model)  # raises the zoo's message (it lists the zoo) before any data is read
    dataset = _dataset(data, data_dir)
    net = build_model(model, dataset.num_classes, seed)
    generated = None
    if family is not None:
        from adntn_deploy.compression import generated_from_scratch

        net, _ = generated_from_scratch(net, layers, family, ratio=ratio, layout=layout, seed=seed)
        generated = {"family": family, "ratio": ratio, "layout": layout, "layers": layers}
    result = train(net, dataset, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    accuracy = evaluate(net, dataset.test_x, dataset.test_y)
    path = None
    if output is not None:
        path = save_checkpoint(output, net, {"inputs": input_records(dataset), "dataset": dataset.name,
                                             "test_accuracy": accuracy, "training": result.as_dict(), "zoo": model})
    return TrainOutcome(net, model, dataset, accuracy, result, generated, path)


@dataclass
class CompressOutcome:
    """What :func:`compress_checkpoint` did. Accuracies are test-set fractions (0..1), ``seconds`` wall-clock
    seconds from fitting to the final evaluation."""

    model: nn.Module
    dense: nn.Module
    report: CompressionReport
    data: Dataset
    source: str
    dense_accuracy: float
    accuracy: float
    seconds: float
    finetune: TrainResult | None = None
    fitted_accuracy: float | None = None
    checkpoint: Path | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready: source, data, dense_accuracy, accuracy, compression (the report), finetune, seconds, checkpoint."""
        return {"source": self.source, "data": self.data.describe(), "dense_accuracy": self.dense_accuracy,
                "accuracy": self.accuracy, "compression": self.report.as_dict(),
                "finetune": self.finetune.as_dict() if self.finetune else None, "seconds": self.seconds,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def _dense_model(model: nn.Module | str | os.PathLike, data: Dataset, dense_epochs: int, batch_size: int, seed: int,
                 progress: bool, say: Callable[[str], None]) -> tuple[nn.Module, str]:
    """(dense model, where it came from): the given module, a checkpoint file, or a zoo model trained now."""
    from adntn_deploy.checkpoint import load_checkpoint
    from adntn_deploy.models.zoo import ZOO, build_model
    from adntn_deploy.training import train

    if isinstance(model, nn.Module):
        return model, "the given model"
    path = Path(model)
    if path.is_file():
        return load_checkpoint(path), f"checkpoint {path}"
    if str(model) not in ZOO:
        raise CheckpointError(
            f"model= {str(model)!r} is neither a checkpoint file nor a zoo model ({', '.join(ZOO)}): "
            "pass a checkpoint written by 'adntn-deploy train' or a zoo name"
        )
    say(f"no checkpoint given: training a dense {model} for {dense_epochs} epoch(s) first")
    net = build_model(str(model), data.num_classes, seed)
    train(net, data, epochs=dense_epochs, batch_size=batch_size, seed=seed, progress=progress)
    return net, f"zoo {model} trained {dense_epochs} epoch(s)"


def compress_checkpoint(
    model: nn.Module | str | os.PathLike,
    output: str | os.PathLike | None,
    data: Dataset | str = "fashion-mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    layers: str | Sequence[str] = "classifier",
    family: str = "ttn",
    bond_dim: int | None = None,
    ratio: float | None = None,
    layout: str = "operator",
    max_mode: int = 4,
    mixing: bool = False,
    activation: str = "tanh",
    fit_steps: int = 200,
    calibrate: int = 2000,
    epochs: int = 1,
    scope: str = "all",
    lr: float = 1e-3,
    core_lr: float = 3e-2,
    warmup: int = 200,
    distill: bool = True,
    distill_temperature: float = 4.0,
    distill_weight: float = 0.7,
    match_layers: float = 0.0,
    dense_epochs: int = 3,
    dense_accuracy: float | None = None,
    measure_fit: bool = False,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
    notes: Callable[[str], None] | None = None,
) -> CompressOutcome:
    """Compress a trained model's ``layers`` into generators, fine-tune it, and write the checkpoint ``output``.

    The steps of ``adntn-deploy compress``: get the dense model (``model`` is an ``nn.Module``, a checkpoint
    path, or a zoo name trained for ``dense_epochs`` first), measure its test accuracy (or take
    ``dense_accuracy``), fit generators to the selected layers (:func:`~adntn_deploy.compression.compress`:
    exactly one of ``bond_dim`` -- with ``max_mode``, ``mixing`` -- or a per-layer ``ratio``; Linear layers
    calibrated on the first ``calibrate`` training images, 0: off), fine-tune for ``epochs`` (0: none; ``scope``
    "all" or "head", learning rates ``lr`` / ``core_lr`` ramped up over ``warmup`` steps; with ``distill``,
    knowledge distillation from the dense model at ``distill_temperature`` and ``distill_weight``, plus
    ``match_layers`` times the layer-output match), measure the test accuracy again and save (None: save
    nothing). ``measure_fit`` also measures the accuracy right after fitting, before fine-tuning.

    ``data`` is a :class:`~adntn_deploy.data.Dataset` or a dataset name (``data_dir``: Fashion-MNIST's
    folder). ``progress`` shows progress bars on stderr; ``notes`` gets one-line messages (e.g. that a zoo
    model is trained first). The checkpoint records the input shape (for export), the dataset, both
    accuracies and the compression report.

    Raises:
        OutputError: ``output`` is the input checkpoint (checked before anything runs).
        CheckpointError: ``model`` is neither a checkpoint file nor a zoo name, or an unreadable checkpoint.
        GeneratorError: both or neither of bond_dim / ratio, a selection matching no layer, a ratio some layer
            cannot reach, bad fine-tuning options, or a diverging run.
        DataError: the dataset is unknown, missing or corrupt.
    """
    from tqdm import tqdm

    from adntn_deploy.checkpoint import save_checkpoint
    from adntn_deploy.compression import compress
    from adntn_deploy.outputs import OutputError
    from adntn_deploy.training import Distillation, evaluate, finetune

    say = notes or (lambda line: None)
    if (bond_dim is None) == (ratio is None):
        raise GeneratorError("give exactly one of bond_dim= or ratio=")
    if output is not None and not isinstance(model, nn.Module):
        given = Path(model)
        if given.exists() and Path(output).resolve() == given.resolve():
            raise OutputError(f"output= {output} would overwrite the input checkpoint; write to another path")
    dataset = _dataset(data, data_dir)
    dense, source = _dense_model(model, dataset, dense_epochs, batch_size, seed, progress, say)
    if dense_accuracy is None:
        dense_accuracy = evaluate(dense, dataset.test_x, dataset.test_y)
    teacher = Distillation(dense, distill_temperature, distill_weight, match_layers) if distill else None
    bar = tqdm(desc="fit cores", unit="step", disable=None if progress else True, leave=False)
    start = time.perf_counter()

    def fit_progress(layer: str, step: int, total: int) -> None:
        bar.set_postfix(layer=layer)
        bar.update(1)

    try:
        compressed, report = compress(dense, layers, family, bond_dim=bond_dim, ratio=ratio, layout=layout,
                                      activation=activation, fit_steps=fit_steps, seed=seed, progress=fit_progress,
                                      calibration=dataset.train_x[:calibrate] if calibrate > 0 else None,
                                      max_mode=max_mode, mixing=mixing)
    finally:
        bar.close()
    fitted = evaluate(compressed, dataset.test_x, dataset.test_y) if measure_fit else None
    tuned = finetune(compressed, dataset, epochs=epochs, scope=scope, batch_size=batch_size, lr=lr, core_lr=core_lr,
                     warmup=warmup, seed=seed, progress=progress, distill=teacher) if epochs > 0 else None
    compressed.eval()
    accuracy = evaluate(compressed, dataset.test_x, dataset.test_y)
    seconds = time.perf_counter() - start
    path = None
    if output is not None:
        path = save_checkpoint(output, compressed, {"inputs": input_records(dataset), "dataset": dataset.name,
                                                    "dense_accuracy": dense_accuracy, "test_accuracy": accuracy,
                                                    "compression": report.as_dict()})
    return CompressOutcome(compressed, dense, report, dataset, source, dense_accuracy, accuracy, seconds, tuned, fitted, path)
