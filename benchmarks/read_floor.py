"""How long this machine takes to read N bytes of float32 once, on every usable core: a model's weight-read floor.

    python benchmarks/read_floor.py BYTES [--calls 50]

prints {"floor_ms": median ms, "bytes": bytes read, "gb_per_s": ..., "threads": N} as JSON. A batch-1 dense
layer reads each weight once and does one multiply-add with it, so no schedule runs faster than its weights
can be read: this is that bound, measured with the same buffer size (and so the same cache level) as the
model's weights, in a fresh process (as benchmarks/isolated.py measures the models) and with TVM's thread
pool on every usable CPU. The kernel is a parallel vector sum with four accumulator chains per task, so it
is bound by the reads, not by the add latency. benchmarks/models.py calls :func:`measure`.

Measured on the 2-core AVX-512 Xeon of 2026-12-02: 1-4 MiB (in the two L2s) 124-131 GB/s, 7-64 MiB (L3)
49-61 GB/s (between runs), 256 MiB and more 30-35 GB/s (memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

FLOAT_BYTES = 4
ACCUMULATOR_CHAINS = 4
TASKS_PER_THREAD = 8
BLOCKS = 5


def measure(nbytes: int, calls: int = 50) -> dict:
    """:func:`read_floor` in a fresh process (the caller's thread pools do not interfere).

    Raises:
        RuntimeError: the worker failed (its last stderr line is in the message).
    """
    from isolated import worker_json

    return worker_json([sys.executable, __file__, str(nbytes), "--calls", str(calls)],
                       f"measuring the read floor of {nbytes} bytes")


def read_floor(nbytes: int, calls: int = 50) -> dict:
    """The lowest of 5 medians over ``calls`` each to sum ``nbytes`` of float32 (rounded up to whole vectors per
    task) with TVM's thread pool on every usable CPU; returns {"floor_ms", "bytes", "gb_per_s", "threads"}.

    Raises:
        ValueError: ``nbytes`` or ``calls`` is not positive.
    """
    if nbytes < 1 or calls < 1:
        raise ValueError(f"bytes and calls must be positive, got {nbytes} and {calls}")
    threads = len(os.sched_getaffinity(0))
    os.environ["TVM_NUM_THREADS"] = str(threads)  # TVM's x86 default is half the CPUs (assumes hyper-threads)
    import numpy as np
    import tvm
    from tvm import s_tir, te

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target, vector_shape

    target = tvm_target(resolve_target("host"))
    lanes = vector_shape(target)[0]
    tasks = TASKS_PER_THREAD * threads
    per_task = max(1, -(-nbytes // FLOAT_BYTES // (tasks * ACCUMULATOR_CHAINS * lanes)))
    shape = (tasks, per_task, ACCUMULATOR_CHAINS, lanes)
    data = te.placeholder(shape, "float32", "data")
    step = te.reduce_axis((0, per_task), "step")
    sums = te.compute((tasks, ACCUMULATOR_CHAINS, lanes), lambda t, c, lane: te.sum(data[t, step, c, lane], axis=step),
                      name="sums")
    sch = s_tir.Schedule(te.create_prim_func([data, sums]))
    block = sch.get_sblock("sums")
    task, chain, lane, step_loop = sch.get_loops(block)
    sch.reorder(task, step_loop, chain, lane)
    sch.parallel(task)
    sch.unroll(chain)
    sch.vectorize(lane)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(block, step_loop))[-1])
    kernel = tvm.compile(sch.mod, target=target).mod["main"]
    source = tvm.runtime.tensor(np.ones(shape, "float32"))
    out = tvm.runtime.tensor(np.zeros(shape[:1] + shape[2:], "float32"))
    for _ in range(5):
        kernel(source, out)
    if float(out.numpy().sum()) != float(np.prod(shape)):  # the kernel read every element
        raise RuntimeError("the read-floor kernel summed the wrong count")
    medians = []
    for _ in range(BLOCKS):  # a floor is the best the machine does: the lowest of a few blocks' medians
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            kernel(source, out)
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    read = int(np.prod(shape)) * FLOAT_BYTES
    floor_ms = min(medians) * 1e3
    return {"floor_ms": floor_ms, "bytes": read, "gb_per_s": read / floor_ms / 1e6, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bytes", type=int)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    if args.bytes < 1 or args.calls < 1:
        parser.error(f"BYTES and --calls must be positive, got {args.bytes} and {args.calls}")
    print(json.dumps(read_floor(args.bytes, args.calls)))


if __name__ == "__main__":
    main()
