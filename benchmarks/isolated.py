"""Latency (and peak memory) of one model under one runtime, measured in a fresh process.

Why a process each: ONNX Runtime's and TVM's thread pools both spin for a while after a call, so two
runtimes interleaved in one process slow each other down. Measured on the 2-core host, MLP 784-1024-1024-10
at batch 32: ONNX Runtime 0.31 ms alone, 0.60-0.76 ms right after TVM calls in the same process, and
TVM 0.31 ms alone, 0.55-0.61 ms right after ONNX Runtime calls.

    python benchmarks/isolated.py MODEL --inputs X.npz [--calls 50] [--backend ort|tvm] [--outputs Y.npz]

prints {"latency_ms": median, "threads": N, "load_s": seconds, "peak_mb": MiB} as JSON. MODEL is an .onnx
file or a compiled artifact folder, as ``adntn_deploy.runtime.load`` takes. ``peak_mb`` is the peak RSS
growth over the process after its imports (VmHWM, so load-time weight generation counts; both runtimes are
imported in every worker so the baselines match). The benchmarks call :func:`measure` or :func:`latency_ms`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def measure(model: str | os.PathLike, feeds: dict[str, np.ndarray], calls: int = 50, backend: str | None = None,
            outputs: str | os.PathLike | None = None) -> dict:
    """Run ``model`` on ``feeds`` in a fresh process: one warm-up call, then ``calls`` timed calls.

    Returns {"latency_ms": median in ms, "threads", "load_s": seconds, "peak_mb": MiB}. ``outputs``: an .npz
    to write the last call's outputs to (to check them in the caller).

    Raises:
        RuntimeError: the worker process failed (its last stderr line is in the message).
    """
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, **feeds)
        cmd = [sys.executable, __file__, str(model), "--inputs", str(inputs), "--calls", str(calls)]
        cmd += ["--backend", backend] if backend else []
        cmd += ["--outputs", str(outputs)] if outputs else []
        return worker_json(cmd, f"measuring {model}")


def worker_json(cmd: list[str], what: str) -> dict:
    """Run ``cmd`` (a fresh worker process) and return the JSON object its last stdout line prints.

    Raises:
        RuntimeError: the worker failed; the message is ``what`` and its last stderr line.
    """
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise RuntimeError(f"{what} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def latency_ms(model: str | os.PathLike, feeds: dict[str, np.ndarray], calls: int = 50, backend: str | None = None,
               outputs: str | os.PathLike | None = None) -> float:
    """The median latency in ms of :func:`measure`."""
    return float(measure(model, feeds, calls, backend, outputs)["latency_ms"])


def _status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def interleaved_medians(models: dict[str, str | os.PathLike], feeds: dict[str, np.ndarray], calls: int | dict[str, int] = 50,
                        rounds: int = 3, reference: str = "ort", tolerance: float = 1e-4) -> dict[str, float]:
    """Median latency in ms per model name over ``rounds`` interleaved rounds (:func:`interleaved_samples`)."""
    samples = interleaved_samples(models, feeds, calls, rounds, reference, tolerance)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_samples(models: dict[str, str | os.PathLike], feeds: dict[str, np.ndarray],
                        calls: int | dict[str, int] = 50, rounds: int = 3, reference: str = "ort",
                        tolerance: float = 1e-4) -> dict[str, list[float]]:
    """Latency in ms per model name and round, over ``rounds`` interleaved rounds: in each round every model
    runs once, in a fresh process (:func:`latency_ms`), so ``samples[a][i] / samples[b][i]`` is a ratio
    measured under the same machine conditions.

    The first round also checks every model's outputs against those of ``models[reference]``: the largest
    error relative to the reference's largest magnitude must stay under ``tolerance``. ``calls`` may be
    one count or one per model name.

    Raises:
        AssertionError: a model's outputs differ from the reference's. RuntimeError: see :func:`latency_ms`.
    """
    samples: dict[str, list[float]] = {name: [] for name in models}
    with tempfile.TemporaryDirectory() as tmp:
        written = {name: Path(tmp) / f"outputs-{index}.npz" for index, name in enumerate(models)}
        for round_index in range(rounds):
            for name, model in models.items():
                count = calls[name] if isinstance(calls, dict) else calls
                samples[name].append(latency_ms(model, feeds, count, outputs=written[name] if round_index == 0 else None))
            if round_index == 0:
                with np.load(written[reference]) as stored:
                    want = {key: stored[key] for key in stored.files}
                for name in models:
                    with np.load(written[name]) as got:
                        for key, expected in want.items():
                            error = float(np.abs(got[key] - expected).max() / np.abs(expected).max())
                            assert error < tolerance, f"{name} output {key} is off by {error:.2e} (relative) from {reference}"
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--backend", choices=["ort", "tvm"], default=None)
    parser.add_argument("--outputs", default=None)
    args = parser.parse_args()
    import onnxruntime  # noqa: F401  -- both runtimes in every worker, so the memory baselines match
    import tvm  # noqa: F401

    from adntn_deploy.runtime import load

    with np.load(args.inputs) as stored:
        feeds = {name: stored[name] for name in stored.files}
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    predictor = load(args.model, backend=args.backend)
    load_s = time.perf_counter() - start
    out = predictor.run(feeds)
    samples = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        out = predictor.run(feeds)
        samples.append((time.perf_counter() - t0) * 1e3)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    peak_mb = (_status_bytes("VmHWM") - baseline) / 2**20
    if args.outputs:
        np.savez(args.outputs, **out)
    print(json.dumps({"latency_ms": statistics.median(samples), "threads": predictor.threads, "load_s": load_s,
                      "peak_mb": peak_mb}))


if __name__ == "__main__":
    main()
