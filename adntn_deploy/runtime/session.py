"""Run a model file once, end to end: open it with its runtime, feed it, time it, save its outputs.

The library side of ``adntn-deploy run``: the command parses its flags, calls :func:`run_model`, and
formats the :class:`RunReport`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adntn_deploy.runtime.timing import Timing


@dataclass
class RunReport:
    """What :func:`run_model` did: the predictor's backend and threads, load time (seconds), the feeds,
    the timing (outputs and latencies in milliseconds) and the .npz written (or None)."""

    model: Path
    backend: str
    threads: int | None
    load_seconds: float
    feeds: dict[str, np.ndarray]
    timing: Timing
    written: Path | None

    @property
    def outputs(self) -> dict[str, np.ndarray]:
        """The outputs of the last timed call, by name."""
        return self.timing.outputs

    def summary(self) -> dict[str, Any]:
        """JSON-ready: model, backend, threads, load_seconds, input shapes, output shapes and dtypes,
        latency_ms statistics (:meth:`Timing.stats`)."""
        return {
            "model": str(self.model), "backend": self.backend, "threads": self.threads, "load_seconds": self.load_seconds,
            "inputs": {k: list(v.shape) for k, v in self.feeds.items()},
            "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in self.outputs.items()},
            "latency_ms": self.timing.stats(),
        }


def run_model(model: str | os.PathLike, inputs: str | os.PathLike | None = None, outputs: str | os.PathLike | None = None,
              *, backend: str | None = None, repeat: int = 1, warmup: int = 1, threads: int | None = None,
              seed: int = 0) -> RunReport:
    """Open ``model`` (an .onnx file or a compiled artifact folder), run it on ``inputs`` (an .npz with one
    array per input name; None: random normal inputs of batch 1 drawn with ``seed``), ``warmup`` untimed
    and ``repeat`` timed calls, and save the last outputs to ``outputs`` (.npz; the suffix is added when
    missing, as numpy does).

    Raises:
        OutputError: ``outputs`` would overwrite ``inputs`` or ``model`` (checked before anything runs).
        InferenceError / InputError, ExportError, CompileError: as :func:`~adntn_deploy.runtime.load`,
        :func:`~adntn_deploy.runtime.load_feeds` and :func:`~adntn_deploy.runtime.benchmark` raise them.
    """
    from adntn_deploy.outputs import refuse_overwriting_inputs
    from adntn_deploy.runtime import benchmark, load, load_feeds

    written = None
    if outputs is not None:
        written = Path(outputs)
        if written.suffix != ".npz":  # numpy.savez appends .npz: that is the file written
            written = written.with_name(written.name + ".npz")
        refuse_overwriting_inputs(written, inputs, model, option="outputs=")
    start = time.perf_counter()
    predictor = load(model, backend=backend, **({"intra_op_threads": threads} if threads else {}))
    load_seconds = time.perf_counter() - start
    feeds = load_feeds(predictor, inputs, seed)
    timing = benchmark(predictor, feeds, repeat=repeat, warmup=warmup)
    if written is not None:
        np.savez(written, **timing.outputs)
    return RunReport(Path(model), predictor.backend, predictor.threads, load_seconds, feeds, timing, written)
