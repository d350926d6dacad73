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

from adntn_deploy.errors import CheckpointError
from adntn_deploy.ir.program import GeneratorError, GeneratorIR

__all__ = ["CheckpointError", "CheckpointInfo", "check_declared_model", "load_checkpoint", "parse_metadata",
           "read_checkpoint", "save_checkpoint"]

FORMAT = "adntn-checkpoint"
VERSION = 1


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
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc}); re-save or re-download it") from None
    architecture, generators, extra = parse_metadata(meta, str(path))
    return CheckpointInfo(path, architecture, generators, extra, shapes)


def parse_metadata(
    meta: Mapping[str, Any], where: str = "checkpoint",
) -> tuple[dict[str, Any] | None, dict[str, GeneratorIR], dict[str, Any]]:
    """(architecture, generators, extra) from a checkpoint's safetensors header metadata (see the module doc).

    Every JSON value is parsed with a nesting bound (64 levels) and checked for its type; ``where`` (the
    file) names the source in messages. Nothing here allocates more than the text itself.

    Raises:
        CheckpointError: not an adntn-deploy checkpoint, a newer version, malformed or too deeply nested
            JSON, values of the wrong type, or an invalid generator IR.
    """
    from adntn_deploy.safejson import loads_bounded

    if not isinstance(meta, Mapping) or meta.get("adntn.format") != FORMAT:
        raise CheckpointError(f"{where} is a safetensors file but not an adntn-deploy checkpoint (no adntn.format)")
    raw = meta.get("adntn.version", "0")
    version = int(raw) if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) < 6 else 0
    if not 1 <= version <= VERSION:
        raise CheckpointError(f"{where} has checkpoint version {str(raw)[:20]}; this adntn-deploy reads 1..{VERSION}")
    values = {}
    for key, default in (("adntn.architecture", "null"), ("adntn.generators", "{}"), ("adntn.extra", "{}")):
        text = meta.get(key, default)
        try:
            if not isinstance(text, str):
                raise CheckpointError("not a string")
            values[key] = loads_bounded(text, what=key)
        except ValueError as exc:  # JsonLimitError, or json's own limits (an integer of over 4,300 digits)
            raise CheckpointError(f"{where} has malformed metadata {key}: {str(exc)[:160]}") from None
    architecture, stored, extra = values["adntn.architecture"], values["adntn.generators"], values["adntn.extra"]
    if architecture is not None and not isinstance(architecture, dict):
        raise CheckpointError(f"{where} has malformed metadata: adntn.architecture must be an object or null")
    if not isinstance(stored, dict) or not isinstance(extra, dict):
        raise CheckpointError(f"{where} has malformed metadata: adntn.generators and adntn.extra must be objects")
    try:
        generators = {str(k): GeneratorIR.from_dict(v) for k, v in stored.items()}
    except GeneratorError as exc:
        raise CheckpointError(f"{where} has malformed metadata: {exc}") from None
    return architecture, generators, extra


def check_declared_model(info: CheckpointInfo) -> None:
    """Refuse, before building anything, a checkpoint whose architecture does not fit its own tensors.

    The architecture is JSON: it may declare layers of any size. The state-dict shapes it implies must
    equal the tensors the file holds (whose bytes are really there), and its generated weights must fit
    the memory limit (:mod:`adntn_deploy.limits`), so building the model allocates no more than that.

    Raises:
        CheckpointError: no architecture, a malformed one, or one that does not fit the stored tensors.
        LimitError: the generated weights exceed the limit.
    """
    from adntn_deploy.limits import check_generators, gib, tensor_bytes
    from adntn_deploy.models.sequential import declared_state_shapes

    if info.architecture is None:
        raise CheckpointError(f"{info.path} stores no architecture: pass the model to load it into")
    try:
        expected = declared_state_shapes(info.architecture, info.generators)
    except GeneratorError as exc:
        raise CheckpointError(f"{info.path} has a malformed architecture: {exc}") from None
    _require_same_names(info, expected, "its own architecture")
    for name, shape in expected.items():
        if info.tensor_shapes[name] != shape:
            raise CheckpointError(
                f"{info.path}: the architecture declares tensor {name!r} of shape {shape} ({gib(tensor_bytes(shape))}), "
                f"the file holds {info.tensor_shapes[name]}; the checkpoint is corrupt or edited, re-save it"
            )
    check_generators(info.generators, what=f"the generated weights of {info.path}")


def _require_same_names(info, expected: dict, against: str) -> None:
    """CheckpointError unless the file holds exactly the tensors named in ``expected``."""
    missing = sorted(set(expected) - set(info.tensor_shapes))
    unexpected = sorted(set(info.tensor_shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{info.path} does not fit {against}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _structure(ir) -> dict:
    """The IR as a dict without what a layer's random start decides (its seed and output scale)."""
    data = ir.to_dict()
    data.pop("output_scale", None)
    spec = dict(data.get("metadata", {}).get("spec", {}))
    spec.pop("seed", None)
    spec.setdefault("layout", "split")  # written before layouts existed
    data["metadata"] = {**data.get("metadata", {}), "spec": spec}
    return data


def load_checkpoint(path: str | os.PathLike, model=None):
    """Load a checkpoint into ``model``, or build the model from the stored architecture when None.

    Returns the model (in eval mode). Every tensor must match in name and shape, and every generator in
    ``model`` must equal the stored IR.

    Raises:
        CheckpointError: anything in :func:`read_checkpoint`, no architecture stored and no model given,
            a stored architecture that does not fit the stored tensors (checked before building), or a
            mismatch between the file and the model (named in the message).
        LimitError: the stored generators' weights exceed the memory limit (:mod:`adntn_deploy.limits`).
    """
    from safetensors.torch import load_file

    from adntn_deploy.models import build_sequential
    from adntn_deploy.nn import generated_layers

    info = read_checkpoint(path)
    if model is None:
        check_declared_model(info)  # before any module exists: the JSON may declare anything
        model = build_sequential(info.architecture, info.generators)
    for name, gw in generated_layers(model):
        stored = info.generators.get(name)
        if stored is None:
            raise CheckpointError(f"layer {name!r} is generated in the model but not in {info.path}")
        if _structure(stored) != _structure(gw.ir):
            raise CheckpointError(f"layer {name!r}: the model's generator differs from the one stored in {info.path}")
        # same program; the stored output scale (and seed) belong to the stored cores
        gw.use_program(stored)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _require_same_names(info, expected, "the model")
    for k, shape in expected.items():
        if info.tensor_shapes[k] != shape:
            raise CheckpointError(f"tensor {k!r} has shape {info.tensor_shapes[k]} in {info.path}, the model expects {shape}")
    model.load_state_dict(load_file(str(info.path)), strict=True)
    model.eval()
    return model
