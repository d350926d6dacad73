"""The training-side workflows as one call each: train a zoo model into a checkpoint, compress a model into one.

``adntn-deploy train`` / ``compress``, the demo (:mod:`adntn_deploy.demo`) and the accuracy benchmark
(``benchmarks/accuracy.py``) all run these, so the three cannot drift apart. Each returns an outcome
object whose :meth:`summary` is the JSON the command prints; the command line only parses and formats.

Under a torch.distributed process group (``torchrun``, :mod:`adntn_deploy.distributed`) training and
fine-tuning run data-parallel on every rank, compression (calibration and fitting) runs on rank 0 and is
broadcast, and only rank 0 writes checkpoints; every rank returns the same outcome.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from adntn_deploy import distributed
from adntn_deploy.compression import CompressionReport
from adntn_deploy.data import Dataset
from adntn_deploy.errors import CheckpointError, GeneratorError
from adntn_deploy.training import TrainResult

__all__ = ["CompressOutcome", "FinetuneOutcome", "TrainOutcome", "compress_checkpoint", "finetune_checkpoint", "input_records",
           "train_checkpoint"]


def input_records(data: Dataset) -> list[dict[str, Any]]:
    """The ``inputs`` entry a checkpoint records for ``data``'s models (name "input", batch 1), as export reads it."""
    return [{"name": "input", "shape": [1, *data.input_shape]}]


def _dataset(data: Dataset | str, data_dir: str | os.PathLike | None) -> Dataset:
    from adntn_deploy.data import load_dataset

    return data if isinstance(data, Dataset) else load_dataset(data, data_dir)


def _save(output: str | os.PathLike | None, model: nn.Module, extra: dict[str, Any]) -> Path | None:
    """Write the checkpoint on rank 0 only (a plain run: here); every rank returns its path once it is written."""
    from adntn_deploy.checkpoint import save_checkpoint

    if output is None:
        return None
    return distributed.run_on_main(lambda: save_checkpoint(output, model, extra), str, Path)


def _refuse_overwrite(model: Any, output: str | os.PathLike | None) -> None:
    from adntn_deploy.outputs import OutputError

    if output is not None and not isinstance(model, nn.Module):
        given = Path(model)
        if given.exists() and Path(output).resolve() == given.resolve():
            raise OutputError(f"output= {output} would overwrite the input checkpoint; write to another path")


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
    shows progress bars on stderr (rank 0 only). The checkpoint records the input shape (for export), the
    dataset, the test accuracy and the run. Under torchrun, ``batch_size`` is the global batch, split over
    the ranks; only rank 0 writes.

    Raises:
        GeneratorError: an unknown zoo name (raised before any data is read), ``family`` without ``ratio``
            or the reverse, a selection or ratio the generated layers cannot reach, bad hyper-parameters,
            or a diverging run.
        DataError: the dataset is unknown, missing or corrupt.
    """
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
    path = _save(output, net, {"inputs": input_records(dataset), "dataset": dataset.name,
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
    accuracies and the compression report. Under torchrun, fitting (with calibration) runs on rank 0 and
    its model is broadcast, fine-tuning is data-parallel with ``batch_size`` as the global batch, and only
    rank 0 writes.

    Raises:
        OutputError: ``output`` is the input checkpoint (checked before anything runs).
        CheckpointError: ``model`` is neither a checkpoint file nor a zoo name, or an unreadable checkpoint.
        GeneratorError: both or neither of bond_dim / ratio, a selection matching no layer, a ratio some layer
            cannot reach, bad fine-tuning options, or a diverging run.
        DataError: the dataset is unknown, missing or corrupt.
    """
    from tqdm import tqdm

    from adntn_deploy.compression import compress
    from adntn_deploy.training import Distillation, evaluate, finetune

    say = notes if notes is not None and distributed.is_main_process() else (lambda line: None)
    if (bond_dim is None) == (ratio is None):
        raise GeneratorError("give exactly one of bond_dim= or ratio=")
    _refuse_overwrite(model, output)
    dataset = _dataset(data, data_dir)
    dense, source = _dense_model(model, dataset, dense_epochs, batch_size, seed, progress, say)
    if dense_accuracy is None:
        dense_accuracy = evaluate(dense, dataset.test_x, dataset.test_y)
    teacher = Distillation(dense, distill_temperature, distill_weight, match_layers) if distill else None
    start = time.perf_counter()

    def fit_cores() -> tuple[nn.Module, CompressionReport]:
        bar = tqdm(desc="fit cores", unit="step", disable=None if progress and distributed.is_main_process() else True, leave=False)

        def fit_progress(layer: str, step: int, total: int) -> None:
            bar.set_postfix(layer=layer)
            bar.update(1)

        try:
            return compress(dense, layers, family, bond_dim=bond_dim, ratio=ratio, layout=layout,
                            activation=activation, fit_steps=fit_steps, seed=seed, progress=fit_progress,
                            calibration=dataset.train_x[:calibrate] if calibrate > 0 else None,
                            max_mode=max_mode, mixing=mixing)
        finally:
            bar.close()

    if getattr(dense, "adntn_architecture", None) is not None and isinstance(dense, nn.Sequential):
        # rank 0 fits; the others rebuild the model from its architecture and generator IRs
        compressed, report = distributed.run_on_main(fit_cores, _share_compressed, _receive_compressed)
    else:  # a model without a JSON architecture cannot be rebuilt elsewhere: every rank fits (seeded, the same)
        compressed, report = fit_cores()
    distributed.broadcast_module(compressed)  # rank 0's tensors everywhere (no-op in a plain run)
    fitted = evaluate(compressed, dataset.test_x, dataset.test_y) if measure_fit else None
    tuned = finetune(compressed, dataset, epochs=epochs, scope=scope, batch_size=batch_size, lr=lr, core_lr=core_lr,
                     warmup=warmup, seed=seed, progress=progress, distill=teacher) if epochs > 0 else None
    compressed.eval()
    accuracy = evaluate(compressed, dataset.test_x, dataset.test_y)
    seconds = time.perf_counter() - start
    path = _save(output, compressed, {"inputs": input_records(dataset), "dataset": dataset.name,
                                      "dense_accuracy": dense_accuracy, "test_accuracy": accuracy,
                                      "compression": report.as_dict()})
    return CompressOutcome(compressed, dense, report, dataset, source, dense_accuracy, accuracy, seconds, tuned, fitted, path)


def _share_compressed(result: tuple[nn.Module, CompressionReport]) -> dict[str, Any]:
    """What the other ranks need to rebuild rank 0's compressed model (its tensors follow separately)."""
    from adntn_deploy.nn import generated_layers

    model, report = result
    return {"architecture": model.adntn_architecture, "report": report.as_dict(),
            "generators": {name: gw.ir.to_dict() for name, gw in generated_layers(model)}}


def _receive_compressed(shared: dict[str, Any]) -> tuple[nn.Module, CompressionReport]:
    from adntn_deploy.ir.program import GeneratorIR
    from adntn_deploy.models import build_sequential

    model = build_sequential(shared["architecture"], {k: GeneratorIR.from_dict(v) for k, v in shared["generators"].items()})
    return model.eval(), CompressionReport.from_dict(shared["report"])


@dataclass
class FinetuneOutcome:
    """What :func:`finetune_checkpoint` did: the model, test accuracy (0..1) before and after, the run, the file written."""

    model: nn.Module
    data: Dataset
    source: str
    accuracy_before: float
    accuracy: float
    training: TrainResult
    checkpoint: Path | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready: source, data, accuracy_before, test_accuracy (0..1), finetune (the run), checkpoint."""
        return {"source": self.source, "data": self.data.describe(), "accuracy_before": self.accuracy_before,
                "test_accuracy": self.accuracy, "finetune": self.training.as_dict(),
                "checkpoint": str(self.checkpoint) if self.checkpoint else None}


def finetune_checkpoint(
    model: str | os.PathLike,
    output: str | os.PathLike | None,
    data: Dataset | str = "fashion-mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    epochs: int = 1,
    scope: str = "all",
    lr: float = 1e-3,
    core_lr: float = 3e-2,
    warmup: int = 200,
    distill_temperature: float = 4.0,
    distill_weight: float = 0.7,
    match_layers: float = 0.0,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> FinetuneOutcome:
    """Fine-tune the (compressed) checkpoint ``model`` on ``data`` and write the checkpoint ``output`` (None: nothing).

    :func:`~adntn_deploy.training.finetune` with ``epochs``, ``scope``, ``lr`` / ``core_lr`` and ``warmup``;
    with ``teacher`` (a dense checkpoint of the same architecture) it distils at ``distill_temperature`` and
    ``distill_weight`` (plus ``match_layers``). The new checkpoint keeps the input's recorded metadata and
    updates the test accuracy, adding the run as ``finetune``. Under torchrun it is data-parallel with
    ``batch_size`` as the global batch, and only rank 0 writes.

    Raises:
        OutputError: ``output`` is the input checkpoint (checked before anything runs).
        CheckpointError: a missing or unreadable checkpoint (``model`` or ``teacher``).
        GeneratorError: bad fine-tuning options, or a diverging run.
        DataError: the dataset is unknown, missing or corrupt.
    """
    from adntn_deploy.checkpoint import load_checkpoint, read_checkpoint
    from adntn_deploy.training import Distillation, evaluate, finetune

    _refuse_overwrite(model, output)
    info = read_checkpoint(model)
    net = load_checkpoint(model)
    dense = load_checkpoint(teacher) if teacher is not None else None
    dataset = _dataset(data, data_dir)
    before = evaluate(net, dataset.test_x, dataset.test_y)
    distill = Distillation(dense, distill_temperature, distill_weight, match_layers) if dense is not None else None
    result = finetune(net, dataset, epochs=epochs, scope=scope, batch_size=batch_size, lr=lr, core_lr=core_lr, warmup=warmup,
                      seed=seed, progress=progress, distill=distill)
    accuracy = evaluate(net, dataset.test_x, dataset.test_y)
    extra = {**info.extra, "inputs": input_records(dataset), "dataset": dataset.name, "test_accuracy": accuracy,
             "finetune": result.as_dict()}
    path = _save(output, net, extra)
    return FinetuneOutcome(net, dataset, f"checkpoint {model}", before, accuracy, result, path)
