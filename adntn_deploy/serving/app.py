"""The Open Inference Protocol v2 REST server (Starlette ASGI app, served by uvicorn).

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/{v}],
/v2/models/{name}[/versions/{v}]/ready, POST /v2/models/{name}[/versions/{v}]/infer, GET /metrics
(Prometheus). Errors are JSON ``{"error": "..."}``: 400 for bad requests (malformed JSON, unknown or
missing inputs, wrong shapes or datatypes), 404 for unknown models or versions, 408 for a body that does
not arrive within the request timeout, 413 for bodies over the size limit, 422 for NaN/Infinity outputs
asked for as JSON, 503 when a model's queue is full, 500 only for the server's own faults (logged as one
line). Every request is logged as one JSON line.

The event loop only moves bytes: decoding, inference and encoding run elsewhere, at most
``max_concurrency`` requests at a time per model version with ``max_queue`` more admitted to wait. Small
bodies are decoded in a worker thread; big ones in a worker process, because ``json.loads`` holds the GIL
for the whole parse (about a second per 20 MiB here), which in a thread would stall health checks as
surely as on the loop itself. Models are warmed up (one call on zeros) before the server reports ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from adntn_deploy.version import __version__
from adntn_deploy.serving.protocol import (
    HEADER_LENGTH, DEFAULT_MAX_DEPTH, ProtocolError, decode_request, encode_response_parts,
)
from adntn_deploy.serving.engine import (  # noqa: F401  (ServeConfig, load_models: the serving API)
    InferenceEngine, LoadedModel, ModelBusyError, ModelNotFoundError, ServeConfig, first_line, input_rejection_message,
    load_models, rejects_inputs,
)

#: bodies up to this size are decoded in a thread (json.loads of 256 KiB holds the GIL a few ms); larger in a process
INLINE_DECODE_BYTES = 256 * 1024
#: a decoded tensor may take this many times --max-request-bytes: a JSON value needs 2 bytes ("0,") and
#: becomes at most 8 (FP64), so no request that fits the body limit is refused by the shape limit
TENSOR_BYTES_PER_BODY_BYTE = 4
CONFIG_ENV = "ADNTN_SERVE_CONFIG"
log = logging.getLogger("adntn_deploy.serving")


class BodyTooLargeError(ProtocolError):
    """The request body is over ``max_request_bytes`` (HTTP 413, as Triton answers)."""

    status = 413


class BodyTimeoutError(ProtocolError):
    """The request body did not arrive within ``request_timeout`` seconds (HTTP 408)."""

    status = 408


_READ_SLICE = 4 << 20


def spool(parts: list[bytes]) -> str:
    """Write a request body (its chunks) to a new temporary file; its path. Runs in a worker thread."""
    fd, path = tempfile.mkstemp(prefix="adntn-request-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(parts)
    except BaseException:
        os.unlink(path)
        raise
    return path


def decode_spooled(path: str, header_length: str | None, max_tensor_bytes: int, max_depth: int):
    """:func:`decode_request` on the body in file ``path``, in a worker process.

    The input arrays go to ``path + ".arrays"``, one after another; the return value is the request with
    each array replaced by (dtype, shape, nbytes), which :func:`load_spooled` turns back into arrays.
    Why files: pickling a 60 MiB body or result through the pool holds the parent's GIL for 0.1-0.2 s,
    while file reads and writes release it.
    """
    with open(path, "rb") as f:
        body = f.read()
    request = decode_request(body, header_length, max_tensor_bytes, max_depth)
    del body
    specs = {}
    with open(path + ".arrays", "wb") as f:
        for name, array in request.inputs.items():
            array = np.ascontiguousarray(array)
            f.write(array.data if array.size else b"")
            specs[name] = (array.dtype.str, array.shape, array.nbytes)
    request.inputs = specs
    return request


def load_spooled(request, path: str):
    """The request :func:`decode_spooled` returned, with its arrays read back from ``path + ".arrays"``.

    Reads in slices into preallocated arrays (``readinto`` releases the GIL). Runs in a worker thread.
    """
    arrays = {}
    with open(path + ".arrays", "rb", buffering=0) as f:
        for name, (dtype, shape, nbytes) in request.inputs.items():
            array = np.empty(shape, np.dtype(dtype))
            view = memoryview(array.reshape(-1).view(np.uint8))
            done = 0
            while done < nbytes:
                got = f.readinto(view[done : done + _READ_SLICE])
                if not got:
                    raise OSError(f"{path}.arrays ends early")
                done += got
            arrays[name] = array
    request.inputs = arrays
    return request


def unlink_spooled(path: str) -> None:
    """Remove the files of :func:`spool` and :func:`decode_spooled` (those that exist)."""
    for name in (path, path + ".arrays"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


class DecodePool:
    """Worker processes that decode big request bodies, started on first use and restarted if one dies.

    Why processes: ``json.loads`` and the numpy conversion hold the GIL for their whole run, so a thread
    decoding a 60 MiB body would freeze the event loop (and the health routes) for seconds. Bodies and
    arrays travel through temporary files (see :func:`decode_spooled`), only small values through pipes.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    async def run(self, fn, *args):
        """``fn(*args)`` in a worker process; its exceptions are re-raised here.

        Raises:
            BrokenProcessPool: the worker died (killed for memory, most likely); the next call starts new ones.
        """
        import multiprocessing

        executor = self._executor
        if executor is None:
            executor = self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.wrap_future(executor.submit(fn, *args))
        except BrokenProcessPool:
            if self._executor is executor:
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        """Stop the workers (they finish nothing more)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def create_app(config: ServeConfig):
    """The ASGI app serving ``config`` (models are loaded and warmed up now, before the first request).

    Raises:
        ServingError: see :func:`load_models`.
    """
    import anyio
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from adntn_deploy.serving.connection import TimedH11Protocol

    registry = CollectorRegistry()
    batch_requests = Histogram("adntn_batch_requests", "Requests merged into each batched model run", ["model"],
                               registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    batch_rows = Histogram("adntn_batch_rows", "Rows (first-axis entries) in each batched model run", ["model"],
                           registry=registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

    def on_batch(name: str, requests: int, rows: int) -> None:
        batch_requests.labels(name).observe(requests)
        batch_rows.labels(name).observe(rows)

    engine = InferenceEngine(config, on_batch=on_batch)
    models = engine.models
    max_tensor_bytes = TENSOR_BYTES_PER_BODY_BYTE * config.max_request_bytes
    decode_pool = DecodePool(config.max_concurrency)
    TimedH11Protocol.header_timeout = config.request_timeout  # one app per process: the protocol reads it here
    requests_total = Counter("adntn_requests", "Requests (HTTP routes, and route grpc for gRPC calls)",
                             ["route", "model", "status"], registry=registry)
    latency = Histogram("adntn_request_duration_seconds", "Request latency", ["route", "model"], registry=registry,
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    inference = Histogram("adntn_inference_duration_seconds",
                          "Seconds from decoded inputs to outputs (waiting for a batch included)", ["model"],
                          registry=registry,
                          buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
    resident = Gauge("adntn_model_resident_weight_bytes",
                     "Bytes of weights a served model version keeps in memory after load (a streamed layer keeps "
                     "only its factors, a generated one its dense weight)", ["model", "version"], registry=registry)
    for name, versions in models.items():
        for version, loaded in versions.items():
            resident.labels(name, version).set(getattr(loaded.predictor, "resident_weight_bytes", 0))

    def error(status: int, message: str, close: bool = False) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers={"connection": "close"} if close else None)

    def find(request: Request) -> tuple[LoadedModel | None, JSONResponse | None]:
        try:
            return engine.find(request.path_params["name"], request.path_params.get("version")), None
        except ModelNotFoundError as exc:
            return None, error(404, str(exc))

    async def live(request: Request):
        return JSONResponse({"live": True})

    async def ready(request: Request):
        return JSONResponse({"ready": True})

    async def server_metadata(request: Request):
        return JSONResponse({"name": "adntn-deploy", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def model_metadata(request: Request):
        model, problem = find(request)
        if problem:
            return problem
        versions = sorted(models[model.entry.name], key=int)
        return JSONResponse(model.metadata(versions))

    async def model_ready(request: Request):
        model, problem = find(request)
        if problem:
            return problem
        return JSONResponse({"name": model.entry.name, "ready": True})

    async def read_body(request: Request) -> list[bytes]:
        """The body's chunks (never joined here), refused as soon as it passes the limit or is too slow."""
        limit = config.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise BodyTooLargeError(f"request body of {declared[:20]} bytes exceeds the limit of {limit} bytes "
                                    "(serve --max-request-bytes)")
        parts, size = [], 0
        try:
            with anyio.fail_after(config.request_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise BodyTooLargeError(f"request body exceeds the limit of {limit} bytes "
                                                "(serve --max-request-bytes)")
                    parts.append(chunk)
        except TimeoutError:
            raise BodyTimeoutError(f"the request body did not arrive within {config.request_timeout:g} s "
                                   "(serve --request-timeout)") from None
        return parts

    async def decode(parts: list[bytes], header_length: str | None):
        limits = (header_length, max_tensor_bytes, DEFAULT_MAX_DEPTH)
        if sum(map(len, parts)) <= INLINE_DECODE_BYTES:
            return await run_in_threadpool(lambda: decode_request(b"".join(parts), *limits))
        path = await run_in_threadpool(spool, parts)
        try:
            parts.clear()
            spooled = await decode_pool.run(decode_spooled, path, *limits)
            return await run_in_threadpool(load_spooled, spooled, path)
        finally:
            await run_in_threadpool(unlink_spooled, path)

    async def run_and_encode(model: LoadedModel, decoded) -> tuple[list[bytes], dict[str, str]]:
        start = time.perf_counter()
        outputs = await engine.run(model, decoded.inputs, decoded.outputs)
        inference.labels(model.entry.name).observe(time.perf_counter() - start)
        return await run_in_threadpool(encode_response_parts, model.entry.name, model.entry.version, decoded,
                                       outputs, list(outputs))

    class PartsResponse(Response):
        """A body sent part by part (about 1 MiB each), so no single write of a big answer holds the loop."""

        def __init__(self, parts: list[bytes], headers: dict[str, str]) -> None:
            self.parts = parts
            super().__init__(b"", headers={**headers, "content-length": str(sum(map(len, parts)))})

        async def __call__(self, scope, receive, send) -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for k, part in enumerate(self.parts):
                await send({"type": "http.response.body", "body": part, "more_body": k + 1 < len(self.parts)})

    async def infer(request: Request):
        model, problem = find(request)
        if problem:
            return problem
        try:
            with engine.admission(model):  # a busy model refuses unread: uvicorn discards the body in time
                body = await read_body(request)
                async with model.slots:  # bounds the memory of bodies being decoded
                    decoded = await decode(body, request.headers.get(HEADER_LENGTH))
                del body
                parts, headers = await run_and_encode(model, decoded)
            return PartsResponse(parts, headers)
        except ModelBusyError as exc:
            return error(503, str(exc))
        except ClientDisconnect:
            return error(499, "the client disconnected")  # never sent; 499 (nginx's code) marks it in the log
        except ProtocolError as exc:  # bad requests (400, 408, 413) and outputs JSON cannot carry (422)
            return error(exc.status, str(exc), close=exc.status == 408)
        except (BrokenProcessPool, MemoryError):
            log.error(json.dumps({"ts": round(time.time(), 3), "path": request.url.path,
                                  "error": "out of memory decoding a request (or a decoding process died)"}))
            return error(503, "the server ran out of memory decoding this request; retry later or send less")
        except Exception as exc:
            if rejects_inputs(exc):  # the predictor's InputError (names, shapes, dtypes), a LimitError, ORT's verdict
                return error(400, input_rejection_message(model, exc))
            raise

    async def metrics(request: Request):
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
        Route("/v2/models/{name}", model_metadata), Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready), Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/metrics", metrics),
    ]

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        return error(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}")

    async def internal_error(request: Request, exc: Exception):
        return error(500, "internal server error (logged); retry, or report it if it persists")

    def grpc_request(method: str, model: str, status: str, seconds: float) -> None:
        requests_total.labels("grpc", model, status).inc()
        latency.labels("grpc", model).observe(seconds)
        level = logging.INFO if status in ("OK", "NOT_FOUND", "INVALID_ARGUMENT", "UNAVAILABLE") else logging.ERROR
        if log.isEnabledFor(level):  # a hot path: build the line only when it is written
            log.log(level, json.dumps({"ts": round(time.time(), 3), "grpc": method, "status": status,
                                       "ms": round(seconds * 1e3, 3), "model": model}))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        grpc_server = None
        if config.grpc_port is not None:  # in the app's own event loop, so both front ends share the engine
            from adntn_deploy.serving.grpc_service import InferenceService, start_grpc_server

            service = InferenceService(engine, max_tensor_bytes, grpc_request)
            grpc_server = await start_grpc_server(service, config.grpc_host, config.grpc_port,
                                                  config.max_request_bytes, share_port=config.workers > 1)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            await engine.close()
            decode_pool.close()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: not_found, 405: not_found, Exception: internal_error})

    class AccessLog:
        """ASGI middleware: one JSON log line and the Prometheus counters for every request."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            start = time.perf_counter()
            status = {"code": 500}
            failure = None

            async def capture(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, capture)
            except Exception as exc:  # Starlette has answered 500 already; log one line instead of a traceback
                status["code"], failure = 500, f"{type(exc).__name__}: {first_line(exc)}"
            finally:
                path = scope["path"]
                parts = path.split("/")
                # only served names become labels: client-chosen ones would grow the metrics without bound
                model = parts[3] if len(parts) > 3 and parts[2] == "models" and parts[3] in models else ""
                route = "infer" if path.endswith("/infer") else ("metrics" if path == "/metrics" else "other")
                seconds = time.perf_counter() - start
                requests_total.labels(route, model, str(status["code"])).inc()
                latency.labels(route, model).observe(seconds)
                line = {"ts": round(time.time(), 3), "method": scope["method"], "path": path[:200],
                        "status": status["code"], "ms": round(seconds * 1e3, 3), "model": model}
                if failure:
                    log.error(json.dumps({**line, "error": failure}))
                else:
                    log.info(json.dumps(line))

    app.state.models = models
    app.state.engine = engine
    return AccessLog(app)


def create_app_from_env():
    """App factory for multi-worker uvicorn: the config comes from $ADNTN_SERVE_CONFIG (JSON)."""
    data = json.loads(os.environ[CONFIG_ENV])
    return create_app(ServeConfig(**data))
