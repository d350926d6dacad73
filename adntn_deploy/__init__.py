"""adntn-deploy: tensor-network generated layers, from PyTorch to devices."""

from adntn_deploy.errors import AdntnError
from adntn_deploy.version import __version__

__all__ = ["AdntnError", "__version__", "compress", "export_onnx", "finetune", "load"]


def load(path, backend=None, **options):
    """Open an .onnx file (ONNX Runtime) or a compiled artifact folder (TVM) and return a predictor.

    The predictor has ``.inputs`` / ``.outputs`` (names, shapes, dtypes) and a thread-safe
    ``.run({name: array}) -> {name: array}``. See :func:`adntn_deploy.runtime.load` for options and errors.
    """
    from adntn_deploy.runtime import load as _load

    return _load(path, backend=backend, **options)


def export_onnx(model, example_inputs, path, **options):
    """Export a model with generated layers to ONNX (ai.adntn nodes holding only the cores).

    See :func:`adntn_deploy.onnx_export.export_onnx` for the options (input_names, output_names,
    dynamic_batch, opset, standard_ops) and errors.
    """
    from adntn_deploy.onnx_export import export_onnx as _export

    return _export(model, example_inputs, path, **options)


def compress(model, layers="classifier", family="ttn", **options):
    """Replace the selected Linear / Conv2d layers of a trained ``model`` by generated layers fitted to their
    weights; returns ``(model, report)``.

    See :func:`adntn_deploy.compression.compress` for the options (bond_dim or ratio, activation,
    fit_steps, inplace, ...) and errors.
    """
    from adntn_deploy.compression import compress as _compress

    return _compress(model, layers, family, **options)


def finetune(model, data, **options):
    """Fine-tune a compressed model on a :class:`adntn_deploy.data.Dataset` (end to end, or its head only).

    See :func:`adntn_deploy.training.finetune` for the options (epochs, scope, lr, core_lr) and errors.
    """
    from adntn_deploy.training import finetune as _finetune

    return _finetune(model, data, **options)
