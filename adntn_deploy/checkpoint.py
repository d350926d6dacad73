"""Checkpoints: safetensors tensors plus JSON metadata (architecture and generator IRs). No pickle.

Layout of the safetensors header metadata (all values are strings):
    adntn.format        "adntn-checkpoint"
    adntn.version       "1"
    adntn.architecture  JSON of the model description (see adntn_deploy.models), or "null" for user models
    adntn.generators    JSON {layer name: generator IR dict}
    adntn.extra         JSON of anything the caller adds (training metrics, dataset, ...)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from adntn_deploy.ir.program import GeneratorError, GeneratorIR

FORMAT = "adntn-checkpoint"
VERSION = 1


class CheckpointError(GeneratorError):
    """A checkpoint file is missing, corrupt, from a newer version, or does not match the model."""


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, read without building the model."""

    path: Path
    architecture: dict[str, Any] | None
    generators: dict[str, GeneratorIR]
    extra: dict[str, Any] = field(default_factory=dict)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, model, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model``'s parameters, buffers, architecture (if it has one) and generator IRs to ``path``.

    The file is written to a temporary name and renamed, so an interrupted save never leaves a half file
    in place of a good one. Returns the path.
    """
    from safetensors.torch import save_file

    from adntn_deploy.nn import generated_layers

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    generators = {name: gw.ir.to_dict() for name, gw in generated_layers(model)}
    metadata = {
        "adntn.format": FORMAT,
        "adntn.version": str(VERSION),
        "adntn.architecture": json.dumps(getattr(model, "adntn_architecture", None)),
        "adntn.generators": json.dumps(generators),
        "adntn.extra": json.dumps(dict(extra or {})),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Read a checkpoint's metadata and tensor shapes (not the tensors).

    Raises:
        CheckpointError: missing file, not a safetensors file, not an adntn checkpoint, newer version,
            or malformed metadata.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc}); re-save or re-download it") from None
    if meta.get("adntn.format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an adntn-deploy checkpoint (no adntn.format)")
    try:
        version = int(meta.get("adntn.version", "0"))
    except ValueError:
        version = 0
    if not 1 <= version <= VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('adntn.version')}; this adntn-deploy reads 1..{VERSION}")
    try:
        architecture = json.loads(meta.get("adntn.architecture", "null"))
        generators = {k: GeneratorIR.from_dict(v) for k, v in json.loads(meta.get("adntn.generators", "{}")).items()}
        extra = json.loads(meta.get("adntn.extra", "{}"))
    except (json.JSONDecodeError, GeneratorError, AttributeError) as exc:
        raise CheckpointError(f"{path} has malformed metadata: {exc}") from None
    return CheckpointInfo(path, architecture, generators, extra, shapes)


def load_checkpoint(path: str | os.PathLike, model=None):
    """Load a checkpoint into ``model``, or build the model from the stored architecture when None.

    Returns the model (in eval mode). Every tensor must match in name and shape, and every generator in
    ``model`` must equal the stored IR.

    Raises:
        CheckpointError: anything in :func:`read_checkpoint`, no architecture stored and no model given,
            or a mismatch between the file and the model (named in the message).
    """
    from safetensors.torch import load_file

    from adntn_deploy.models import build_sequential
    from adntn_deploy.nn import generated_layers

    info = read_checkpoint(path)
    if model is None:
        if info.architecture is None:
            raise CheckpointError(f"{info.path} stores no architecture: pass the model to load it into")
        model = build_sequential(info.architecture, info.generators)
    for name, gw in generated_layers(model):
        stored = info.generators.get(name)
        if stored is None:
            raise CheckpointError(f"layer {name!r} is generated in the model but not in {info.path}")
        if stored.to_dict() != gw.ir.to_dict():
            raise CheckpointError(f"layer {name!r}: the model's generator differs from the one stored in {info.path}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(info.tensor_shapes))
    unexpected = sorted(set(info.tensor_shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{info.path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, shape in expected.items():
        if info.tensor_shapes[k] != shape:
            raise CheckpointError(f"tensor {k!r} has shape {info.tensor_shapes[k]} in {info.path}, the model expects {shape}")
    model.load_state_dict(load_file(str(info.path)), strict=True)
    model.eval()
    return model
