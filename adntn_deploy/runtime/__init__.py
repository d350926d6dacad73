"""Predictors: one interface (``inputs``, ``outputs``, ``run``) over ONNX Runtime (:mod:`.ort`) and the TVM runtime (:mod:`.tvm`).

Also: :func:`benchmark` (time a predictor, :mod:`.timing`), :func:`load_feeds` / :func:`read_npz`
(its inputs, :mod:`.feeds`) and :func:`~.session.run_model` (open, feed, time and save in one call: `adntn-deploy run`).
"""

from __future__ import annotations

import os
from pathlib import Path

from adntn_deploy.errors import InferenceError
from adntn_deploy.runtime.base import InputError, TensorInfo, validate_feeds
from adntn_deploy.runtime.feeds import load_feeds, read_npz
from adntn_deploy.runtime.timing import Timing, benchmark

BACKENDS = ("ort", "tvm")


def load(path: str | os.PathLike, backend: str | None = None, **options):
    """Open ``path`` with the right runtime and return a predictor.

    ``backend`` None picks by file: ``.onnx`` -> ONNX Runtime, a compiled artifact folder (with
    manifest.json) -> TVM. Options go to the predictor (``intra_op_threads`` for both; ``providers`` for
    ONNX Runtime; ``device_id`` for TVM).

    Raises:
        InferenceError: unknown backend, or a path whose runtime cannot be told (pass ``backend=``).
        OnnxModelError (an ExportError) / ArtifactError (a CompileError): a file the runtime cannot open.
    """
    path = Path(path)
    if backend is None:
        if path.suffix.lower() == ".onnx":
            backend = "ort"
        elif path.is_dir() and (path / "manifest.json").exists():
            backend = "tvm"
        else:
            raise InferenceError(f"cannot tell which runtime opens {path}: pass backend= one of {', '.join(BACKENDS)}")
    if backend == "ort":
        from adntn_deploy.runtime.ort import OrtPredictor

        return OrtPredictor(path, **options)
    if backend == "tvm":
        from adntn_deploy.runtime.tvm import TvmPredictor

        return TvmPredictor(path, **options)
    raise InferenceError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "InferenceError", "InputError", "TensorInfo", "Timing", "benchmark", "load", "load_feeds",
           "read_npz", "validate_feeds"]
