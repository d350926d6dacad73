"""Dynamic batching: concurrent requests for one model version merged into one runtime call.

How it works (Triton's dynamic batcher, on one asyncio loop):
- Requests wait in arrival order. A batch is formed when a run slot ("model instance") is free, so while
  every slot is busy, requests pile up and the next batch is bigger, which is what raises throughput.
- A batch holds requests whose inputs agree on names, dtypes and every axis but the first, up to
  ``max_batch_size`` rows in all. It waits at most ``max_queue_delay`` seconds after its oldest request
  arrived for more rows; when it is full, it runs at once.
- The merged inputs are concatenated on axis 0 and every output is split back by each request's rows.
- A batch that fails as a whole is run again request by request, so each request gets its own answer or
  its own error, and one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def batch_key(inputs: Mapping[str, np.ndarray]) -> tuple | None:
    """What requests must share to be merged: each input's name, dtype and shape after axis 0.

    None when ``inputs`` cannot be merged at all: an input without a first axis, or inputs whose first
    axes differ (their rows would not line up).
    """
    rows = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(rows) != 1 or None in rows:
        return None
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in inputs.items()))


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray] = field(repr=False)
    rows: int
    key: tuple | None
    arrived: float
    future: asyncio.Future = field(repr=False)
    queued: bool = True  # still in the batcher's queue (not yet taken into a batch)


class DynamicBatcher:
    """Merge concurrent :meth:`submit` calls into runs of ``run`` (called in a worker thread).

    Args:
        run: the model call, {input: array} -> {output: array}; every output must have the batch on axis 0.
        max_batch_size: most rows one run takes (a single request with more rows runs alone).
        max_queue_delay: seconds a batch may wait, after its oldest request arrived, for more rows.
        instances: batches that may run at once.
        on_batch: called with (requests, rows) for every run, e.g. to feed a metrics histogram.
    """

    def __init__(self, run: RunFn, max_batch_size: int, max_queue_delay: float, instances: int = 1,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        if max_batch_size < 1 or max_queue_delay < 0 or instances < 1:
            raise ValueError("max_batch_size and instances must be >= 1 and max_queue_delay >= 0")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.instances = instances
        self.on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._free: asyncio.Semaphore | None = None
        self._scheduler: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    async def submit(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run ``inputs`` (validated arrays) in some batch; this request's rows of every output.

        Raises:
            Exception: whatever ``run`` raised for this request when it ran alone.
        """
        loop = asyncio.get_running_loop()
        if self._scheduler is None:
            self._arrived, self._free = asyncio.Event(), asyncio.Semaphore(self.instances)
            self._scheduler = loop.create_task(self._schedule())
        key = batch_key(inputs)
        rows = next(iter(inputs.values())).shape[0] if key is not None else 0
        pending = _Pending(inputs, rows, key, loop.time(), loop.create_future())
        self._pending.append(pending)
        self._arrived.set()
        try:
            return await pending.future
        finally:  # a caller that went away (cancelled) leaves the queue if its request has not run yet
            if pending.queued:
                self._pending.remove(pending)
                pending.queued = False

    async def close(self) -> None:
        """Stop forming batches; requests still waiting get a cancellation."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        for pending in self._pending:
            pending.future.cancel()
        self._pending.clear()

    def _ready_rows(self, key: tuple) -> int:
        return sum(p.rows for p in self._pending if p.key == key)

    def _take(self) -> list[_Pending]:
        """The oldest request and the compatible ones after it that fit, removed from the queue."""
        first = self._pending.popleft()
        batch, rows, left = [first], first.rows, deque()
        if first.key is not None:
            for pending in self._pending:
                if pending.key == first.key and rows + pending.rows <= self.max_batch_size:
                    batch.append(pending)
                    rows += pending.rows
                else:
                    left.append(pending)
            self._pending = left
        for pending in batch:
            pending.queued = False
        return batch

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._free.acquire()
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._pending[0]
            deadline = first.arrived + self.max_queue_delay
            while (first.key is not None and self._pending and self._pending[0] is first
                   and self._ready_rows(first.key) < self.max_batch_size and loop.time() < deadline):
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            if not self._pending:  # its requests were cancelled while it waited
                self._free.release()
                continue
            task = loop.create_task(self._execute(self._take()))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                return
            if self.on_batch is not None:
                self.on_batch(len(batch), sum(p.rows for p in batch))
            if len(batch) == 1:
                await self._run_alone(batch[0])
                return
            try:
                merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
                outputs = await asyncio.to_thread(self.run, merged)
                parts = _split(outputs, [p.rows for p in batch])
            except Exception:
                for pending in batch:  # each request gets its own result or its own error
                    await self._run_alone(pending)
                return
            for pending, part in zip(batch, parts):
                if not pending.future.done():
                    pending.future.set_result(part)
        finally:
            self._free.release()

    async def _run_alone(self, pending: _Pending) -> None:
        if pending.future.done():
            return
        try:
            result = await asyncio.to_thread(self.run, pending.inputs)
        except Exception as exc:
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if not pending.future.done():
            pending.future.set_result(result)


def _split(outputs: Mapping[str, np.ndarray], rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Each request's rows of every output.

    Raises:
        ValueError: an output whose first axis is not the batch (the batch cannot be split back).
    """
    total = sum(rows)
    for name, array in outputs.items():
        if np.ndim(array) == 0 or array.shape[0] != total:
            raise ValueError(f"output {name!r} of shape {np.shape(array)} does not have the batch of {total} on axis 0")
    bounds = np.cumsum([0, *rows])
    return [{name: array[start:stop] for name, array in outputs.items()} for start, stop in zip(bounds, bounds[1:])]
