"""Write a Triton Inference Server model repository for the onnxruntime backend.

REPO/<name>/config.pbtxt and REPO/<name>/1/model.onnx, the model in its standard-ops form (the
generators inlined, no custom domain: what any ONNX Runtime build runs). When every input and output has
a symbolic first axis, it becomes Triton's batch axis (``max_batch_size``, dims without it) and the config
asks for Triton's dynamic batcher (``dynamic_batching``: concurrent requests merged into one run, as
``adntn-deploy serve --max-batch-size`` does); otherwise ``max_batch_size: 0``, full dims and no batcher.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from adntn_deploy.errors import ServingError
from adntn_deploy.outputs import OutputError, refuse_overwriting_inputs, replace_output_dir, staging_dir

_TRITON_TYPES = {1: "TYPE_FP32", 11: "TYPE_FP64", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32",
                 5: "TYPE_INT16", 3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}


def _tensors(values) -> list[tuple[str, str, list[int | None]]]:
    out = []
    for v in values:
        tensor = v.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise ServingError(f"tensor {v.name!r} has an element type Triton's config cannot describe here")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        out.append((v.name, _TRITON_TYPES[tensor.elem_type], dims))
    return out


def config_pbtxt(name: str, inputs, outputs, max_batch_size: int, max_queue_delay_us: int = 0) -> str:
    """The text of config.pbtxt for an onnxruntime-backend model; with ``max_batch_size`` > 0 it enables
    Triton's dynamic batcher, whose batches wait at most ``max_queue_delay_us`` microseconds for more requests."""
    def block(kind: str, tensors) -> str:
        items = []
        for tname, ttype, dims in tensors:
            shown = dims[1:] if max_batch_size > 0 else dims
            dims_text = ", ".join(str(d if d is not None else -1) for d in shown)
            items.append(f'  {{\n    name: "{tname}"\n    data_type: {ttype}\n    dims: [ {dims_text} ]\n  }}')
        return f"{kind} [\n" + ",\n".join(items) + "\n]\n"

    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
        + block("input", inputs) + block("output", outputs)
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        + (f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n" if max_batch_size > 0 else "")
    )


def package_triton(model: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                   max_batch_size: int = 32, version: int = 1, max_queue_delay_us: int = 0) -> Path:
    """Write ``repository/<name>/{config.pbtxt, <version>/model.onnx}`` for ``model`` (an .onnx file).

    A model whose inputs and outputs all have a symbolic first axis gets ``max_batch_size`` and Triton's
    dynamic batcher (``max_queue_delay_us``: microseconds a batch waits for more requests).

    Nothing this tool did not write is overwritten: a new model folder, or a new version in an existing
    one, is written beside and renamed into place. An existing model folder must hold only config.pbtxt
    and version folders, and its config.pbtxt must be the one this model needs (it is written when missing).

    Raises:
        OnnxModelError: the ONNX file is invalid. ServingError: a name with a path separator, or a tensor
            type Triton's config cannot describe.
        OutputError: the model's folder already holds that version, holds files this tool did not write,
            or has a different config.pbtxt.
    """
    import onnx

    from adntn_deploy.onnx_export.exporter import save_model_atomically, to_standard_ops
    from adntn_deploy.onnx_export.reader import load_onnx

    source = Path(model)
    proto = load_onnx(source)
    name = name or source.stem
    if "/" in name or name.startswith("."):
        raise ServingError(f"name= {name!r} must be a plain folder name")
    if any(o.domain == "ai.adntn" for o in proto.opset_import):
        proto = to_standard_ops(proto)
    onnx.checker.check_model(proto)
    inits = {i.name for i in proto.graph.initializer}
    inputs = _tensors(i for i in proto.graph.input if i.name not in inits)
    outputs = _tensors(proto.graph.output)
    batched = all(dims and dims[0] is None for _, _, dims in inputs + outputs)
    config = config_pbtxt(name, inputs, outputs, max_batch_size if batched else 0, max_queue_delay_us)
    folder = Path(repository) / name
    version_dir = folder / str(version)
    refuse_overwriting_inputs(version_dir, source, option="repository=")
    if os.path.lexists(version_dir):
        raise OutputError(f"{version_dir} exists; give another version= or a new repository")
    existing = os.path.lexists(folder)
    if existing:
        _check_model_folder(folder, config)
    staging = staging_dir(folder)  # beside the model folder: a leftover is hidden from the repository
    try:
        model_file = staging / (f"{version}/model.onnx" if not existing else "model.onnx")
        save_model_atomically(proto, model_file)
        if not existing:
            (staging / "config.pbtxt").write_text(config)
        for path in (staging, *staging.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)  # mkdtemp makes 0700, mkstemp 0600
        if existing:
            replace_output_dir(staging, version_dir, lambda _: False, option="version=", what="a model version")
            if not (folder / "config.pbtxt").exists():
                _write_new_file(folder / "config.pbtxt", config)
        else:
            replace_output_dir(staging, folder, lambda _: False, option="name=", what="a model folder")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _check_model_folder(folder: Path, config: str) -> None:
    """Refuse adding a version to ``folder`` unless it is a model folder as this tool writes them.

    Raises:
        OutputError: ``folder`` is not a real folder, holds anything but config.pbtxt and version
            folders, or its config.pbtxt differs from ``config`` (another model, other options, or edited).
    """
    if folder.is_symlink() or not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a model folder; choose another name= or repository=")
    for entry in folder.iterdir():
        if entry.is_symlink() or not (entry.name == "config.pbtxt" and entry.is_file()
                                      or entry.name.isdigit() and entry.is_dir()):
            raise OutputError(f"{folder} holds {entry.name!r}, which this tool did not write; choose another name= or repository=")
    current = folder / "config.pbtxt"
    if current.exists() and current.read_text(errors="replace") != config:
        raise OutputError(f"{current} differs from the one this model needs (another model, other options, or edited "
                          "by hand) and is not overwritten; choose another name= or repository=")


def _write_new_file(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a hard link, which fails instead of replacing a file
    that appeared meanwhile."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputError(f"{path} appeared while this command ran and is not overwritten; check it") from None
        except OSError:  # a file system without hard links: a plain rename, after checking
            if os.path.lexists(path):
                raise OutputError(f"{path} appeared while this command ran and is not overwritten; check it") from None
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
