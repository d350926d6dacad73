"""``train``, ``compress`` and ``finetune``: dense baselines of the zoo models, their compression with generators,
and further fine-tuning of compressed checkpoints.

Each runs data-parallel when launched by torchrun (``torchrun --nproc_per_node N -m adntn_deploy.cli.main train ...``,
docs/distributed.md): the command joins the process group (:func:`adntn_deploy.distributed.session`), and only
rank 0 prints, shows progress and writes the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from adntn_deploy.data import DATASET_NAMES

_data_options = [
    click.option("--data", "data_name", type=click.Choice(sorted(DATASET_NAMES)), default="fashion-mnist", show_default=True,
                 help="Dataset (fashion-mnist from the Debian package dataset-fashion-mnist; digits is built in)."),
    click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder with Fashion-MNIST's gzip IDX files (default $ADNTN_DATA_DIR or /usr/share/datasets/fashion-mnist)."),
    click.option("--batch-size", default=128, show_default=True, help="Training batch size (under torchrun: the global batch, split over the ranks)."),
    click.option("--seed", default=0, show_default=True, help="Seed of initialisation and shuffling."),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
]


def data_options(func):
    """Attach the options every data-driven command shares."""
    for option in reversed(_data_options):
        func = option(func)
    return func


def _say(as_json: bool):
    """Where a workflow's one-line notes go: stderr, or nowhere when printing JSON (or on ranks other than 0)."""
    from adntn_deploy import distributed  # imports torch: only when a training command runs

    return None if as_json or not distributed.is_main_process() else (lambda line: click.echo(line, err=True))


def _on_main_rank(work):
    """Run ``work()`` inside a distributed session (a plain run: just run it); its result on rank 0, where the
    command prints, and None on the other ranks."""
    from adntn_deploy import distributed

    with distributed.session():
        outcome = work()
        main = distributed.is_main_process()
    return outcome if main else None


@click.command("train")
@click.option("--model", "model_name", required=True, help="Zoo model: vgg, alexnet, mlp or mlp4096.")
@click.option("--epochs", default=3, show_default=True, help="Training epochs.")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate (cosine decay to 0).")
@click.option("--family", type=click.Choice(["ttn", "attn", "mera"]), default=None,
              help="Train with generated layers from the start (with --ratio): the layers named by --layers.")
@click.option("--ratio", type=float, default=None, help="Per-layer compression ratio of the generated layers (with --family).")
@click.option("--layout", type=click.Choice(["operator", "split"]), default="operator", show_default=True,
              help="Generator layout of the generated layers.")
@click.option("--layers", default="classifier", show_default=True, help="Layers to generate (with --family), as in compress.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint to write (.ckpt).")
@data_options
def train_command(model_name, epochs, lr, family, ratio, layout, layers, output, data_name, data_dir, batch_size, seed, as_json):
    """Train a zoo model on a dataset (dense, or with generated layers from the start); writes a checkpoint."""
    from adntn_deploy.workflows import train_checkpoint

    if (family is None) != (ratio is None):
        raise click.UsageError("give --family and --ratio together to train generated layers from scratch")
    outcome = _on_main_rank(lambda: train_checkpoint(
        model_name, output, data_name, data_dir=data_dir, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        family=family, ratio=ratio, layout=layout, layers=layers, progress=not as_json))
    if outcome is None:
        return
    if as_json:
        click.echo(json.dumps(outcome.summary(), indent=2))
    else:
        click.echo(f"{model_name} on {outcome.data.name}: test accuracy {100 * outcome.test_accuracy:.2f}% after {epochs} "
                   f"epoch(s) ({outcome.training.seconds:.0f} s, {outcome.params:,} parameters); wrote {output}")


@click.command("compress")
@click.option("--model", "model_arg", required=True, help="A dense checkpoint (from train) or a zoo name (trained first).")
@click.option("--layers", default="classifier", show_default=True,
              help="Comma-separated: 'classifier' (hidden Linear layers), a type (Linear, Conv2d) or a module-name glob.")
@click.option("--family", type=click.Choice(["ttn", "attn", "mera"]), default="ttn", show_default=True)
@click.option("--bond-dim", type=int, default=None, help="Bond dimension (with --max-mode); or give --ratio.")
@click.option("--ratio", type=float, default=None, help="Per-layer compression ratio to reach at least (searches the configuration).")
@click.option("--layout", type=click.Choice(["operator", "split", "auto"]), default="operator", show_default=True,
              help="operator: paired (out, in) sites, full-rank weights; split: low-rank weights (for --weights stream); "
                   "auto: per layer, the one with the lower fit error.")
@click.option("--max-mode", type=int, default=4, show_default=True, help="Largest tensorisation mode (with --bond-dim).")
@click.option("--mixing", is_flag=True, help="Lateral mixing tensors (TTN, aTTN).")
@click.option("--activation", default="tanh", show_default=True, help="Activation after each tree level.")
@click.option("--fit-steps", default=200, show_default=True, help="Adam steps fitting the cores to the dense weights.")
@click.option("--calibrate", default=2000, show_default=True,
              help="Training images that calibrate Linear layers: fit on their inputs' principal subspace, correct biases (0: off).")
@click.option("--epochs", default=1, show_default=True, help="Fine-tuning epochs after fitting (0: none).")
@click.option("--scope", type=click.Choice(["all", "head"]), default="all", show_default=True,
              help="Fine-tune end to end, or only from the first compressed layer on (features frozen and cached: faster).")
@click.option("--lr", default=1e-3, show_default=True, help="Fine-tuning learning rate of dense parameters.")
@click.option("--core-lr", default=3e-2, show_default=True, help="Cores' learning rate, relative to each core's RMS.")
@click.option("--warmup", default=200, show_default=True, help="Fine-tuning steps over which learning rates ramp up from 0.")
@click.option("--distill/--no-distill", default=True, show_default=True,
              help="Fine-tune with knowledge distillation from the dense model (its softened logits) as well as the labels.")
@click.option("--distill-temperature", default=4.0, show_default=True, help="Softmax temperature of distillation.")
@click.option("--distill-weight", default=0.7, show_default=True, help="Weight of the distillation term (0..1); the labels get the rest.")
@click.option("--match-layers", default=0.0, show_default=True,
              help="Weight of matching each compressed layer's output to the dense layer's (relative squared error; 0: off).")
@click.option("--dense-epochs", default=3, show_default=True, help="Epochs of the dense baseline when --model is a zoo name.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint to write.")
@data_options
def compress_command(model_arg, layers, family, bond_dim, ratio, layout, max_mode, mixing, activation, fit_steps, epochs, scope,
                     lr, core_lr, warmup, calibrate, distill, distill_temperature, distill_weight, match_layers, dense_epochs, output, data_name, data_dir, batch_size, seed, as_json):
    """Replace layers of a trained model by generators fitted to their weights, fine-tune, report accuracy."""
    from adntn_deploy.workflows import compress_checkpoint

    if (bond_dim is None) == (ratio is None):
        raise click.UsageError("give exactly one of --bond-dim N or --ratio R")
    outcome = _on_main_rank(lambda: compress_checkpoint(
        model_arg, output, data_name, data_dir=data_dir, layers=layers, family=family, bond_dim=bond_dim, ratio=ratio,
        layout=layout, max_mode=max_mode, mixing=mixing, activation=activation, fit_steps=fit_steps, calibrate=calibrate,
        epochs=epochs, scope=scope, lr=lr, core_lr=core_lr, warmup=warmup, distill=distill,
        distill_temperature=distill_temperature, distill_weight=distill_weight, match_layers=match_layers,
        dense_epochs=dense_epochs, batch_size=batch_size, seed=seed, progress=not as_json, notes=_say(as_json),
    ))
    if outcome is None:
        return
    if as_json:
        click.echo(json.dumps(outcome.summary(), indent=2))
        return
    from adntn_deploy.reporting import render_table

    report, dense_acc, accuracy = outcome.report, outcome.dense_accuracy, outcome.accuracy
    rows = [[r.name, r.kind, "x".join(map(str, r.weight_shape)), family,
             f"{r.spec.get('layout', 'split')}, bond {r.spec['bond_dim']}, max_mode {r.spec['max_mode']}"
             f"{', shared' if r.spec['share'] else ''}",
             f"{r.params:,}", f"{r.ratio:,.0f}x", f"{r.fit_error:.3f}"] for r in report.layers]
    click.echo(render_table(["layer", "type", "weight", "family", "config", "params", "ratio", "fit error"], rows))
    click.echo(f"test accuracy: dense {100 * dense_acc:.2f}% -> compressed {100 * accuracy:.2f}% "
               f"({100 * (accuracy - dense_acc):+.2f} points); whole model {report.model_params_before:,} -> "
               f"{report.model_params_after:,} parameters ({report.model_ratio:.1f}x); wrote {output}")


@click.command("finetune")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A checkpoint to fine-tune (from compress, or train with --family).")
@click.option("--epochs", default=1, show_default=True, help="Fine-tuning epochs.")
@click.option("--scope", type=click.Choice(["all", "head"]), default="all", show_default=True,
              help="Fine-tune end to end, or only from the first generated layer on (features frozen and cached: faster).")
@click.option("--lr", default=1e-3, show_default=True, help="Learning rate of dense parameters.")
@click.option("--core-lr", default=3e-2, show_default=True, help="Cores' learning rate, relative to each core's RMS.")
@click.option("--warmup", default=200, show_default=True, help="Steps over which learning rates ramp up from 0.")
@click.option("--teacher", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A dense checkpoint of the same model to distil from (its softened logits) as well as the labels.")
@click.option("--distill-temperature", default=4.0, show_default=True, help="Softmax temperature of distillation (with --teacher).")
@click.option("--distill-weight", default=0.7, show_default=True, help="Weight of the distillation term (0..1, with --teacher).")
@click.option("--match-layers", default=0.0, show_default=True,
              help="Weight of matching each generated layer's output to the teacher's (with --teacher; 0: off).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint to write.")
@data_options
def finetune_command(model_path, epochs, scope, lr, core_lr, warmup, teacher, distill_temperature, distill_weight, match_layers,
                     output, data_name, data_dir, batch_size, seed, as_json):
    """Fine-tune a compressed checkpoint further (optionally distilling from its dense model); writes a checkpoint."""
    from adntn_deploy.workflows import finetune_checkpoint

    outcome = _on_main_rank(lambda: finetune_checkpoint(
        model_path, output, data_name, data_dir=data_dir, teacher=teacher, epochs=epochs, scope=scope, lr=lr,
        core_lr=core_lr, warmup=warmup, distill_temperature=distill_temperature, distill_weight=distill_weight,
        match_layers=match_layers, batch_size=batch_size, seed=seed, progress=not as_json))
    if outcome is None:
        return
    if as_json:
        click.echo(json.dumps(outcome.summary(), indent=2))
    else:
        click.echo(f"test accuracy {100 * outcome.accuracy_before:.2f}% -> {100 * outcome.accuracy:.2f}% after {epochs} epoch(s) "
                   f"of fine-tuning ({outcome.training.seconds:.0f} s); wrote {output}")
