"""Time a predictor: untimed warm-up calls, then timed calls; latencies in milliseconds."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from adntn_deploy.errors import InferenceError


@dataclass
class Timing:
    """What :func:`benchmark` measured: the last call's outputs and every timed call's latency (milliseconds)."""

    outputs: Any
    times_ms: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def calls(self) -> int:
        """Number of timed calls."""
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        """Median latency of the timed calls, in milliseconds."""
        return float(np.median(self.times_ms))

    def stats(self) -> dict[str, float]:
        """JSON-ready statistics, in milliseconds: calls (a count), mean, p50, p90, p99 and min."""
        ms = np.asarray(self.times_ms, dtype=np.float64)
        return {"calls": len(ms), "mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
                "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)), "min": float(ms.min())}


def benchmark(predictor: Any, feeds: Mapping[str, Any], repeat: int = 1, warmup: int = 1) -> Timing:
    """Call ``predictor`` ``warmup`` times untimed, then ``repeat`` times timed, always on the same ``feeds``.

    ``predictor`` is anything with ``run(feeds) -> outputs`` (every runtime's predictor), or a plain callable
    taking ``feeds`` (e.g. a lambda around a torch model). Each timed call is measured with
    ``time.perf_counter`` (wall-clock; milliseconds in the result). The outputs of the last call are kept.

    Raises:
        InferenceError: ``repeat`` below 1 or ``warmup`` below 0 (or not integers).
        Whatever the predictor raises for ``feeds`` (``InputError`` for names, shapes, dtypes), unchanged.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, (int, np.integer)) or repeat < 1:
        raise InferenceError(f"repeat= must be an integer of at least 1, not {repeat!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
        raise InferenceError(f"warmup= must be an integer of at least 0, not {warmup!r}")
    call = predictor.run if hasattr(predictor, "run") else predictor
    if not callable(call):
        raise InferenceError(f"predictor= must have a run(feeds) method or be callable, not {type(predictor).__name__}")
    outputs = None
    for _ in range(int(warmup)):
        outputs = call(feeds)
    times = []
    for _ in range(int(repeat)):
        start = time.perf_counter()
        outputs = call(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(outputs, times, int(warmup))
