"""Predictors: one interface (``inputs``, ``outputs``, ``run``) over ONNX Runtime and, later, TVM."""

from __future__ import annotations

import os
from pathlib import Path

from adntn_deploy.errors import GeneratorError
from adntn_deploy.runtime.base import InputError, TensorInfo, validate_feeds

BACKENDS = ("ort",)


def load(path: str | os.PathLike, backend: str | None = None, **options):
    """Open ``path`` with the right runtime and return a predictor.

    ``backend`` None picks by file: ``.onnx`` -> ONNX Runtime. Options go to the predictor
    (e.g. ``providers``, ``intra_op_threads`` for ONNX Runtime).

    Raises:
        GeneratorError: unknown backend, or a file no backend can open.
    """
    path = Path(path)
    if backend is None:
        if path.suffix.lower() == ".onnx":
            backend = "ort"
        else:
            raise GeneratorError(f"cannot tell which runtime opens {path}: pass backend= one of {', '.join(BACKENDS)}")
    if backend == "ort":
        from adntn_deploy.runtime.ort import OrtPredictor

        return OrtPredictor(path, **options)
    raise GeneratorError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "InputError", "TensorInfo", "load", "validate_feeds"]
