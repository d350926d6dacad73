"""ONNX Runtime predictor: generators are folded into dense weights once, at session creation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from adntn_deploy.runtime.base import TensorInfo, requested_outputs, validate_feeds

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may use (cgroup/affinity aware)."""
    from adntn_deploy.limits import usable_cpus

    return usable_cpus()


class OrtPredictor:
    """Run an ONNX file (ai.adntn or standard-ops form) with ONNX Runtime.

    Args:
        path: the .onnx file.
        providers: execution providers in priority order; default CUDA first when this onnxruntime has it,
            then CPU.
        intra_op_threads: threads per operator (default: usable CPUs); inter_op_threads: default 1. Both are
            capped to the usable CPUs, with a note on stderr (:func:`adntn_deploy.limits.cap_threads`).

    Graph optimisation runs at the "all" level, so every generator (its inputs are initializers) is
    constant-folded into a dense weight when the session is created; calls then cost what the dense model
    costs. ``run`` is thread-safe (ONNX Runtime sessions are).

    Raises:
        OnnxModelError: the file is unreadable, malformed or holds an unknown ai.adntn op or version.
        LimitError: its generated weights exceed the memory limit (:mod:`adntn_deploy.limits`).
        InferenceError: an execution provider this onnxruntime does not have.
    """

    backend = "ort"

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        from adntn_deploy.errors import InferenceError
        from adntn_deploy.limits import cap_threads, check_generators
        from adntn_deploy.onnx_export.reader import OnnxModelError, find_generators, load_onnx
        from adntn_deploy.onnx_export.streaming import resident_weight_bytes

        self.path = Path(path)
        model = load_onnx(self.path)
        self.generators = find_generators(model)
        #: weights kept after session creation: initializers plus generated dense weights; a streamed file
        #: (export --stream) keeps its factors instead
        self.resident_weight_bytes = resident_weight_bytes(model, self.generators)
        # the session reads the checked file itself: given the serialized model, onnxruntime kept those
        # bytes (every stored weight a second time) for the session's life, and this proto alive meant a
        # third copy while it loaded (64 MiB dense layer: +147 MiB after load, +285 at the peak; now +74, +138)
        del model
        check_generators({g.layer: g.ir for g in self.generators}, what=f"the generated weights of {self.path}")
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise InferenceError(f"providers= {unknown} are not in this onnxruntime; available: {available}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.threads = cap_threads(intra_op_threads, "intra-op threads") if intra_op_threads else default_threads()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = cap_threads(inter_op_threads, "inter-op threads") if inter_op_threads else 1
        options.log_severity_level = 4  # fatal only: run errors reach the caller as exceptions; ORT's own
        # multi-line copy of each (ExecuteKernel ...) would break the one-line errors of run and serve
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxModelError(f"onnxruntime cannot load {self.path}: {first}") from None
        self.providers = tuple(self.session.get_providers())
        self.inputs = tuple(self._info(i) for i in self.session.get_inputs())
        self.outputs = tuple(self._info(o) for o in self.session.get_outputs())

    @staticmethod
    def _info(arg) -> TensorInfo:
        shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
        return TensorInfo(arg.name, shape, np.dtype(_ORT_TYPES.get(arg.type, np.float32)))

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model on ``feeds`` ({input name: array}); returns {output name: array}.

        Raises:
            InputError: names, shapes or dtypes that do not match :attr:`inputs`, or unknown output names.
        """
        arrays = validate_feeds(self.inputs, feeds)
        names = requested_outputs(self.outputs, outputs)
        results = self.session.run(names, arrays)
        return dict(zip(names, results))
