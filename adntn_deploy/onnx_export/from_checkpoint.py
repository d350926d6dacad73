"""Export a checkpoint file to ONNX in one call (``adntn-deploy export``): read it, build the model, export."""

from __future__ import annotations

import numbers
import os
from typing import Iterable, Mapping, Sequence

from adntn_deploy.errors import CheckpointError, ExportError
from adntn_deploy.onnx_export.exporter import DEFAULT_OPSET, ExportResult, export_onnx

__all__ = ["checkpoint_inputs", "export_checkpoint"]

_SHAPE_HINT = "NAME:D1,D2,... (e.g. input:1,1,28,28)"


def checkpoint_inputs(info, given: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]] | None = None,
                      ) -> list[tuple[str, tuple[int, ...]]]:
    """[(input name, shape)] of the model in checkpoint ``info`` (a CheckpointInfo): ``given`` when not empty,
    else the shapes the checkpoint records (``extra["inputs"]``, written by ``train`` and ``compress``).

    Raises:
        ExportError: nothing given and nothing recorded, or a given shape that is not positive integers.
        CheckpointError: the recorded shapes are malformed.
    """
    pairs = list(given.items()) if isinstance(given, Mapping) else list(given or ())
    if pairs:
        checked = []
        for name, shape in pairs:
            dims = tuple(shape) if isinstance(shape, (tuple, list)) else ()
            if not isinstance(name, str) or not dims or not all(
                    isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in dims):
                raise ExportError(f"input_shapes= {name!r}: {shape!r} is not a shape of positive integers; give {_SHAPE_HINT}")
            checked.append((name, tuple(int(d) for d in dims)))
        return checked
    stored = info.extra.get("inputs")
    if not stored:
        raise ExportError(f"{info.path} records no input shape: pass input_shapes= {_SHAPE_HINT}")
    well_formed = isinstance(stored, list) and all(
        isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("shape"), list)
        and i["shape"] and all(type(d) is int and d >= 1 for d in i["shape"]) for i in stored)
    if not well_formed:
        raise CheckpointError(f"{info.path} records malformed input shapes: pass input_shapes= {_SHAPE_HINT}")
    return [(i["name"], tuple(i["shape"])) for i in stored]


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]] | None = None,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    standard_ops: bool = False,
    stream: bool | str = "off",
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export the model of ``checkpoint`` (built from its stored architecture) to the ONNX file ``output``.

    The example inputs are seeded standard-normal tensors of ``input_shapes`` ({name: shape}, or (name, shape)
    pairs; default: the shapes the checkpoint records). With ``dynamic_batch`` axis 0 of every input is
    symbolic (an example batch of 1 is raised to 2, which torch needs). ``opset``, ``standard_ops``, ``stream``
    and ``output_names`` are :func:`~adntn_deploy.onnx_export.export_onnx`'s. Returns what was written (path,
    size in bytes, the generators, what streaming decided).

    Raises:
        OutputError: ``output`` is the checkpoint, holds it, or is the current folder.
        CheckpointError: an unreadable or corrupt checkpoint, or malformed recorded input shapes.
        ExportError: no input shape recorded or given, or torch cannot export the model.
        StreamError: ``stream="on"`` and a layer that cannot stream.
        LimitError: an example input or the generated weights above the memory limit (:mod:`adntn_deploy.limits`).
    """
    import torch

    from adntn_deploy.checkpoint import load_checkpoint, read_checkpoint
    from adntn_deploy.limits import check_tensor
    from adntn_deploy.outputs import refuse_overwriting_inputs

    refuse_overwriting_inputs(output, checkpoint)
    info = read_checkpoint(checkpoint)
    inputs = checkpoint_inputs(info, input_shapes)
    model = load_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for name, shape in inputs:
        if dynamic_batch and shape[0] < 2:
            shape = (2,) + shape[1:]  # torch specialises a batch of 1; the exported axis is symbolic anyway
        check_tensor(f"example input {name!r}", shape)
        examples.append(torch.randn(shape, generator=generator))
    return export_onnx(model, examples, output, input_names=[n for n, _ in inputs], output_names=list(output_names or ()) or None,
                       dynamic_batch=dynamic_batch, opset=opset, standard_ops=standard_ops, stream=stream)
