"""Write a Triton Inference Server model repository for the onnxruntime backend.

REPO/<name>/config.pbtxt and REPO/<name>/1/model.onnx, the model in its standard-ops form (the
generators inlined, no custom domain: what any ONNX Runtime build runs). When every input and output has
a symbolic first axis, it becomes Triton's batch axis (``max_batch_size``, dims without it); otherwise
``max_batch_size: 0`` and full dims.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from adntn_deploy.errors import GeneratorError

_TRITON_TYPES = {1: "TYPE_FP32", 11: "TYPE_FP64", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32",
                 5: "TYPE_INT16", 3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}


def _tensors(values) -> list[tuple[str, str, list[int | None]]]:
    out = []
    for v in values:
        tensor = v.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            raise GeneratorError(f"tensor {v.name!r} has an element type Triton's config cannot describe here")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        out.append((v.name, _TRITON_TYPES[tensor.elem_type], dims))
    return out


def config_pbtxt(name: str, inputs, outputs, max_batch_size: int) -> str:
    """The text of config.pbtxt for an onnxruntime-backend model."""
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
    )


def package_triton(model: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                   max_batch_size: int = 32, version: int = 1) -> Path:
    """Write ``repository/<name>/{config.pbtxt, <version>/model.onnx}`` for ``model`` (an .onnx file).

    Raises:
        OnnxModelError: the ONNX file is invalid. GeneratorError: the model's folder already holds
            that version, or a name with a path separator.
    """
    import onnx

    from adntn_deploy.onnx_export.exporter import save_model_atomically, to_standard_ops
    from adntn_deploy.onnx_export.reader import load_onnx

    source = Path(model)
    proto = load_onnx(source)
    name = name or source.stem
    if "/" in name or name.startswith("."):
        raise GeneratorError(f"model name {name!r} must be a plain folder name")
    if any(o.domain == "ai.adntn" for o in proto.opset_import):
        proto = to_standard_ops(proto)
    onnx.checker.check_model(proto)
    inits = {i.name for i in proto.graph.initializer}
    inputs = _tensors(i for i in proto.graph.input if i.name not in inits)
    outputs = _tensors(proto.graph.output)
    batched = all(dims and dims[0] is None for _, _, dims in inputs + outputs)
    folder = Path(repository) / name
    target = folder / str(version) / "model.onnx"
    if target.exists():
        raise GeneratorError(f"{target} exists; give another --version or a new repository")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_model_atomically(proto, target)
        (folder / "config.pbtxt").write_text(config_pbtxt(name, inputs, outputs, max_batch_size if batched else 0))
    except BaseException:
        shutil.rmtree(target.parent, ignore_errors=True)
        raise
    return folder
