"""The model registry both front ends (HTTP and gRPC) serve from: loading, admission, runs, batching, metrics.

Per model version the engine admits at most ``max_concurrency + max_queue`` requests (more are refused as
busy) and runs at most ``max_concurrency`` at once. With ``max_batch_size > 1``, a model whose inputs and
outputs all have a dynamic first axis is served through a :class:`DynamicBatcher`; others are served one
request per run, with a note in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from adntn_deploy.errors import AdntnError, ServingError
from adntn_deploy.runtime.base import requested_outputs, validate_feeds
from adntn_deploy.serving.batching import DynamicBatcher
from adntn_deploy.serving.protocol import datatype_of
from adntn_deploy.serving.repository import ModelEntry, discover

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 2  # Triton's default instance count on CPU
DEFAULT_MAX_QUEUE = 64
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_MAX_QUEUE_DELAY_US = 0  # as Triton: batch what is queued when a run slot frees
log = logging.getLogger("adntn_deploy.serving")


class ModelNotFoundError(ServingError):
    """A request names a model or version the server does not serve (HTTP 404, gRPC NOT_FOUND)."""


class ModelBusyError(ServingError):
    """A model version has as many requests running and waiting as it admits (HTTP 503, gRPC UNAVAILABLE)."""


@dataclass
class ServeConfig:
    """What to serve and how: path (file, artifact or repository), backend override, body size limit (bytes),
    requests run at once and queued per model version, body and keep-alive timeouts (seconds), warm-up,
    dynamic batching (most rows per run, microseconds a batch waits for more), the gRPC address (port None:
    no gRPC) and the number of server processes."""

    path: str
    backend: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    extra: dict[str, Any] = field(default_factory=dict)
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    max_queue: int = DEFAULT_MAX_QUEUE
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    warmup: bool = True
    max_batch_size: int = 1
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    grpc_host: str = "127.0.0.1"
    grpc_port: int | None = None
    workers: int = 1


@dataclass
class LoadedModel:
    """One served model version: its entry, predictor, admission state and batcher (None: unbatched)."""

    entry: ModelEntry
    predictor: Any
    admitted: int = 0
    slots: asyncio.Semaphore | None = None
    batcher: DynamicBatcher | None = None

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        """The protocol's model metadata: name, versions, platform, inputs and outputs (-1: dynamic axis)."""
        def tensors(infos):
            return [{"name": t.name, "datatype": datatype_of(t.dtype),
                     "shape": [d if isinstance(d, int) else -1 for d in t.shape]} for t in infos]

        platform = "onnxruntime_onnx" if self.entry.backend == "ort" else "tvm"
        return {"name": self.entry.name, "versions": versions, "platform": platform,
                "inputs": tensors(self.predictor.inputs), "outputs": tensors(self.predictor.outputs)}


def has_dynamic_batch(predictor: Any) -> bool:
    """Whether every input and output of ``predictor`` has a dynamic (symbolic) first axis."""
    tensors = (*predictor.inputs, *predictor.outputs)
    return bool(tensors) and all(len(t.shape) > 0 and not isinstance(t.shape[0], int) for t in tensors)


def load_models(config: ServeConfig) -> dict[str, dict[str, LoadedModel]]:
    """Load every model version under ``config.path``; {name: {version: LoadedModel}}.

    Raises:
        ServingError: nothing servable, or a model that fails to load (the message names it).
    """
    from adntn_deploy.runtime import load

    models: dict[str, dict[str, LoadedModel]] = {}
    for entry in discover(config.path, config.backend):
        try:
            predictor = load(entry.path, backend=entry.backend)
        except AdntnError as exc:
            raise ServingError(f"model {entry.name} version {entry.version}: {exc}") from None
        except Exception as exc:  # a runtime's own error (allocation, native loader): one line, not a traceback
            raise ServingError(f"model {entry.name} version {entry.version}: cannot load {entry.path}: "
                               f"{first_line(exc)}") from None
        if config.warmup:
            warm_up(entry, predictor)
        models.setdefault(entry.name, {})[entry.version] = LoadedModel(entry, predictor)
    return models


def first_line(exc: BaseException, limit: int = 400) -> str:
    """The first line of ``exc``'s message (its type name when empty), cut to ``limit`` characters."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def warm_up(entry: ModelEntry, predictor: Any) -> None:
    """Run ``predictor`` once on zeros of its declared input shapes (symbolic axes: 1).

    Why: a model can load and still fail on every call (a generator declaring a 4 TiB weight loads, then
    every run fails to allocate it); serving it would report ready and answer 500 for ever.

    Raises:
        ServingError: the call failed; the message names the model and the ``--no-warmup`` escape.
    """
    feeds = {i.name: np.zeros(tuple(d if isinstance(d, int) and d >= 0 else 1 for d in i.shape), dtype=i.dtype)
             for i in predictor.inputs}
    try:
        predictor.run(feeds)
    except Exception as exc:
        raise ServingError(
            f"model {entry.name} version {entry.version} ({entry.path}) loads but cannot run: a warm-up call on "
            f"zeros of its input shapes failed: {first_line(exc)}; fix the model (or pass --no-warmup to serve it anyway)"
        ) from None


def rejects_inputs(exc: BaseException) -> bool:
    """Whether ``exc`` is a verdict on the request's inputs (HTTP 400, gRPC INVALID_ARGUMENT), not a server fault."""
    # onnxruntime's InvalidArgument (e.g. inputs whose batch axes disagree) has no importable base class here
    return isinstance(exc, AdntnError) or type(exc).__name__ == "InvalidArgument"


def input_rejection_message(model: LoadedModel, exc: BaseException) -> str:
    """One line for an error :func:`rejects_inputs` accepts: our own messages as they are, runtimes' prefixed."""
    if isinstance(exc, AdntnError):
        return str(exc)
    return f"model {model.entry.name!r} rejects these inputs: {first_line(exc)}"


class InferenceEngine:
    """The served models and the one way to run them, shared by the HTTP app and the gRPC service.

    Args:
        config: what to serve; models are loaded (and warmed up) now.
        on_batch: called with (model name, requests, rows) for every batched run (metrics).

    Raises:
        ServingError: see :func:`load_models`.
    """

    def __init__(self, config: ServeConfig, on_batch=None) -> None:
        self.config = config
        self.models = load_models(config)
        self.capacity = config.max_concurrency + config.max_queue
        self.notes: list[str] = []
        for name, versions in self.models.items():
            for loaded in versions.values():
                loaded.slots = asyncio.Semaphore(config.max_concurrency)
                if config.max_batch_size <= 1:
                    continue
                if not has_dynamic_batch(loaded.predictor):
                    self.notes.append(f"note: model {name} version {loaded.entry.version} has no dynamic first axis "
                                      "on every input and output: served unbatched")
                    continue
                report = None if on_batch is None else (lambda n, rows, _name=name: on_batch(_name, n, rows))
                loaded.batcher = DynamicBatcher(loaded.predictor.run, config.max_batch_size,
                                                config.max_queue_delay_us * 1e-6, config.max_concurrency, report)
        for note in self.notes:
            log.warning(note)

    def find(self, name: str, version: str | None = None) -> LoadedModel:
        """The served version ``version`` of model ``name`` (None or "": the highest).

        Raises:
            ModelNotFoundError: no such model or version; the message lists what is served.
        """
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFoundError(f"unknown model {name!r}; served models: {sorted(self.models)}")
        if not version:
            version = max(versions, key=int)
        if version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {sorted(versions, key=int)}")
        return versions[version]

    def versions(self, name: str) -> list[str]:
        """The served versions of model ``name``, in ascending order (empty when unknown)."""
        return sorted(self.models.get(name, {}), key=int)

    @contextlib.contextmanager
    def admission(self, model: LoadedModel) -> Iterator[None]:
        """Hold one of ``model``'s admission places for the duration of a request.

        Raises:
            ModelBusyError: all ``max_concurrency + max_queue`` places are taken.
        """
        if model.admitted >= self.capacity:
            raise ModelBusyError(f"model {model.entry.name!r} is busy: {self.capacity} requests are running or "
                                 "waiting; retry later (serve --max-concurrency / --max-queue raise the limits)")
        model.admitted += 1
        try:
            yield
        finally:
            model.admitted -= 1

    async def run(self, model: LoadedModel, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
                  ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs``; {output name: array} for ``outputs`` (None: all), batched when enabled.

        Raises:
            InputError: names, shapes or dtypes that do not fit the model, or unknown output names (checked
                before the request joins a batch, so a bad request never fails its neighbours).
            Exception: the runtime's own error for this request.
        """
        predictor = model.predictor
        if model.batcher is None:
            async with model.slots:
                return await asyncio.to_thread(predictor.run, inputs, outputs)
        arrays = validate_feeds(predictor.inputs, inputs)
        names = requested_outputs(predictor.outputs, outputs)
        results = await model.batcher.submit(arrays)
        return {name: results[name] for name in names}

    async def close(self) -> None:
        """Stop the batchers (requests still waiting in them are cancelled)."""
        for versions in self.models.values():
            for loaded in versions.values():
                if loaded.batcher is not None:
                    await loaded.batcher.close()
