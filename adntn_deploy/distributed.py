"""Data-parallel training across processes: the torch.distributed plumbing of ``train``, ``compress`` and ``finetune``.

Launch any of those commands with ``torchrun`` (``torchrun --nproc_per_node N -m adntn_deploy.cli.main train ...``)
and each process becomes one rank of a process group: the command calls :func:`session`, which reads
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins
the group -- gloo on CPU, nccl when CUDA is available. Without those variables (or with ``WORLD_SIZE=1``)
nothing is initialised and every helper here is a no-op, so a plain run behaves exactly as before.

The library (:mod:`adntn_deploy.training`, :mod:`adntn_deploy.workflows`) only asks :func:`active`: a process
group initialised by the caller works the same way. Every rank draws the same shuffled order of the
training set; each global batch of ``batch_size`` examples is split into contiguous per-rank shards
(:func:`shard`) and DistributedDataParallel averages the gradients, so N ranks make the same updates as one
process with the same global batch, up to float reduction order.

Every collective is bounded by the process group's timeout (:data:`TIMEOUT_ENV`, default
:data:`DEFAULT_TIMEOUT_S` s), so no rank waits forever on a dead peer; under torchrun a worker that dies
makes torchrun stop the others and exit non-zero at once.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from adntn_deploy.errors import AdntnError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Context",
    "DistributedError",
    "active",
    "all_reduce_sum",
    "barrier",
    "broadcast_json",
    "broadcast_module",
    "cleanup",
    "device",
    "init_from_env",
    "is_main_process",
    "rank",
    "run_on_main",
    "session",
    "shard",
    "world_size",
    "wrap",
]

#: environment variable: seconds any collective may wait before the process group gives up
TIMEOUT_ENV = "ADNTN_DIST_TIMEOUT"
#: default process-group timeout (s): longer than rank 0's compression fit, which the other ranks wait for
DEFAULT_TIMEOUT_S = 1800.0
#: environment variable overriding the backend ("gloo" or "nccl")
BACKEND_ENV = "ADNTN_DIST_BACKEND"

T = TypeVar("T")


class DistributedError(AdntnError):
    """The distributed environment is malformed, or rank 0 failed a step that the other ranks waited for."""


@dataclass(frozen=True)
class Context:
    """This process's place in the group: ``rank`` (0..world_size-1), ``local_rank`` (on its node), the backend."""

    rank: int
    world_size: int
    local_rank: int
    backend: str


def _env_int(name: str, default: int | None = None) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} must be an integer (torchrun sets it)") from None


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise DistributedError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds")
    return value


def active() -> bool:
    """Whether a torch.distributed process group with more than one rank is initialised in this process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks in the group (1 when not distributed)."""
    return torch.distributed.get_world_size() if active() else 1


def is_main_process() -> bool:
    """True on rank 0 and in a plain single-process run: the process that writes files, prints and shows progress."""
    return rank() == 0


def device() -> torch.device:
    """Where this rank trains: ``cuda:LOCAL_RANK`` under the nccl backend, else the CPU."""
    if active() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(timeout_s: float | None = None) -> Context | None:
    """Join the process group that torchrun describes in the environment; None when not launched that way.

    Reads ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` (and torchrun's ``MASTER_ADDR`` / ``MASTER_PORT``,
    through ``init_method="env://"``). Nothing happens when ``WORLD_SIZE`` is unset or 1, or when a group is
    already initialised (then its context is returned). Backend: nccl when CUDA is available (each rank
    takes GPU ``LOCAL_RANK``), else gloo; :data:`BACKEND_ENV` overrides it. ``timeout_s`` (seconds; default
    :data:`TIMEOUT_ENV` or :data:`DEFAULT_TIMEOUT_S`) bounds every collective.

    Raises:
        DistributedError: a malformed variable (not an integer, RANK outside 0..WORLD_SIZE-1, a LOCAL_RANK
            without a GPU under nccl), an unknown backend, a bad timeout, or torch built without distributed.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return _context()
    world = _env_int("WORLD_SIZE", 1)
    if world is None or world <= 1:
        return None
    if not torch.distributed.is_available():
        raise DistributedError("this torch build has no torch.distributed: run without torchrun")
    global_rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if global_rank is None or not 0 <= global_rank < world or local_rank < 0:
        raise DistributedError(f"RANK={global_rank} and LOCAL_RANK={local_rank} must lie in 0..WORLD_SIZE-1 ({world - 1}); "
                               "launch with torchrun, which sets them")
    backend = os.environ.get(BACKEND_ENV, "").strip() or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise DistributedError(f"{BACKEND_ENV}={backend!r}: use gloo (CPU) or nccl (GPUs)")
    if backend == "nccl":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise DistributedError(f"nccl needs a GPU per local rank (LOCAL_RANK={local_rank}, "
                                   f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s)): "
                                   f"use --nproc_per_node <= the GPU count, or {BACKEND_ENV}=gloo")
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else _timeout_s())
    torch.distributed.init_process_group(backend, init_method="env://", rank=global_rank, world_size=world, timeout=timeout)
    return _context()


def _context() -> Context:
    return Context(torch.distributed.get_rank(), torch.distributed.get_world_size(), _env_int("LOCAL_RANK", 0) or 0,
                   str(torch.distributed.get_backend()))


def cleanup() -> None:
    """Leave the process group (destroy it) if this process is in one; safe to call when it is not.

    The group is also collected here, while Python still runs: after a failed collective, reference cycles
    kept gloo's group alive until interpreter shutdown, where its worker thread, releasing the failed
    work's tensors, tried to take the GIL, was ended by Python and aborted the process (exit -6 instead of
    1 in 4 of 10 runs of a rank that waited out the timeout; 0 of 18 with this collection).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        gc.collect()


@contextlib.contextmanager
def session() -> Iterator[Context | None]:
    """``with session() as ctx:`` -- :func:`init_from_env` on entry, :func:`cleanup` on exit (also on errors).

    Only a group that this call initialised is destroyed. ``ctx`` is None in a plain run.

    Raises:
        DistributedError: as :func:`init_from_env`.
    """
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = init_from_env()
    try:
        yield ctx
    finally:
        if owned and ctx is not None:
            cleanup()


@contextlib.contextmanager
def _waiting_on(src: int, what: str) -> Iterator[None]:
    """Turn a collective's failure (a peer died: closed connection; or the timeout) into a DistributedError."""
    try:
        yield
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DistributedError(f"rank {rank()} lost rank {src} while waiting for {what}: it failed (see its log) or took "
                               f"longer than the process-group timeout ({TIMEOUT_ENV}); {first}") from exc


def barrier() -> None:
    """Wait until every rank gets here (bounded by the group's timeout); no-op when not distributed.

    Raises:
        DistributedError: a rank died or the timeout passed.
    """
    if active():
        with _waiting_on(0, "the other ranks"):
            torch.distributed.barrier()


def shard(indices: torch.Tensor, rank_: int | None = None, world_size_: int | None = None) -> torch.Tensor:
    """This rank's contiguous share of one global batch's example ``indices``.

    The batch is split with ``torch.tensor_split`` into ``world_size`` parts whose sizes differ by at most
    one (a rank may get none in a batch smaller than the group); concatenated in rank order they are the
    batch again. ``rank_`` / ``world_size_`` default to this process's (0 and 1: the whole batch).
    """
    r, w = (rank() if rank_ is None else rank_), (world_size() if world_size_ is None else world_size_)
    if w <= 1:
        return indices
    if not 0 <= r < w:
        raise DistributedError(f"rank {r} outside 0..{w - 1}")
    return torch.tensor_split(indices, w)[r]


def wrap(module: nn.Module) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel (moved to :func:`device` first); ``module`` itself when
    not distributed or when it has no trainable parameter.

    DDP broadcasts rank 0's parameters and buffers at construction and averages gradients in ``backward``.
    Batch-norm layers keep per-rank batch statistics (DDP's default; rank 0's running statistics are
    broadcast at each forward).
    """
    if not active() or not any(p.requires_grad for p in module.parameters()):
        return module
    dev = device()
    module.to(dev)
    return nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64); ``values`` unchanged when not distributed."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def broadcast_module(module: nn.Module, src: int = 0) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank, in place (same structure needed).

    Returns ``module``; no-op when not distributed.

    Raises:
        DistributedError: rank ``src`` died or the timeout passed.
    """
    if not active():
        return module
    dev = device()
    with torch.no_grad(), _waiting_on(src, "its tensors"):
        for tensor in module.state_dict().values():
            buf = tensor.detach().to(dev).contiguous()
            torch.distributed.broadcast(buf, src)
            if rank() != src:
                tensor.copy_(buf)
    return module


def broadcast_json(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (anything ``json.dumps`` takes) on every rank: JSON bytes, never pickle.

    Returns ``obj`` itself on ``src`` and when not distributed.

    Raises:
        DistributedError: rank ``src`` died or the timeout passed before it sent.
    """
    if not active():
        return obj
    dev = device()
    me = rank()
    payload = json.dumps(obj).encode() if me == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    with _waiting_on(src, "its result"):
        torch.distributed.broadcast(size, src)
        buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev) if me == src and payload
               else torch.zeros(int(size.item()), dtype=torch.uint8, device=dev))
        torch.distributed.broadcast(buf, src)
    return obj if me == src else json.loads(bytes(buf.cpu().numpy()).decode())


def run_on_main(work: Callable[[], T], share: Callable[[T], Any], receive: Callable[[Any], T]) -> T:
    """Run ``work()`` on rank 0 only and hand its result to every rank.

    Rank 0 returns ``work()`` and broadcasts ``share(result)`` (JSON-ready); the other ranks return
    ``receive(that JSON)``. When ``work`` raises on rank 0, the others get a :class:`DistributedError`
    naming it instead of waiting. Not distributed: just ``work()``.

    Raises:
        DistributedError: on ranks other than 0, when rank 0's ``work`` failed.
    """
    if not active():
        return work()
    if is_main_process():
        try:
            result = work()
        except BaseException as exc:
            broadcast_json({"error": f"{type(exc).__name__}: {exc}"})
            raise
        broadcast_json({"ok": share(result)})
        return result
    message = broadcast_json()
    if "error" in message:
        raise DistributedError(f"rank 0 failed: {message['error']}")
    return receive(message["ok"])
