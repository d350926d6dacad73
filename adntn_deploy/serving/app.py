"""The Open Inference Protocol v2 REST server (Starlette ASGI app, served by uvicorn).

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/{v}],
/v2/models/{name}[/versions/{v}]/ready, POST /v2/models/{name}[/versions/{v}]/infer, GET /metrics
(Prometheus). Errors are JSON ``{"error": "..."}``: 400 for bad requests (malformed JSON, unknown or
missing inputs, wrong shapes or datatypes, too-large bodies), 404 for unknown models or versions.
Every request is logged as one JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from adntn_deploy import __version__
from adntn_deploy.errors import GeneratorError
from adntn_deploy.serving.protocol import HEADER_LENGTH, ProtocolError, datatype_of, decode_request, encode_response
from adntn_deploy.serving.repository import ModelEntry, discover

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
CONFIG_ENV = "ADNTN_SERVE_CONFIG"
log = logging.getLogger("adntn_deploy.serving")


@dataclass
class ServeConfig:
    """What to serve and how: path (file, artifact or repository), backend override, body size limit."""

    path: str
    backend: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadedModel:
    entry: ModelEntry
    predictor: Any

    def metadata(self, versions: list[str]) -> dict[str, Any]:
        def tensors(infos):
            return [{"name": t.name, "datatype": datatype_of(t.dtype),
                     "shape": [d if isinstance(d, int) else -1 for d in t.shape]} for t in infos]

        platform = "onnxruntime_onnx" if self.entry.backend == "ort" else "tvm"
        return {"name": self.entry.name, "versions": versions, "platform": platform,
                "inputs": tensors(self.predictor.inputs), "outputs": tensors(self.predictor.outputs)}


def load_models(config: ServeConfig) -> dict[str, dict[str, LoadedModel]]:
    """Load every model version under ``config.path``; {name: {version: LoadedModel}}.

    Raises:
        GeneratorError: nothing servable, or a model that fails to load (the message names it).
    """
    from adntn_deploy.runtime import load

    models: dict[str, dict[str, LoadedModel]] = {}
    for entry in discover(config.path, config.backend):
        try:
            predictor = load(entry.path, backend=entry.backend)
        except GeneratorError as exc:
            raise GeneratorError(f"model {entry.name} version {entry.version}: {exc}") from None
        models.setdefault(entry.name, {})[entry.version] = LoadedModel(entry, predictor)
    return models


def create_app(config: ServeConfig):
    """The ASGI app serving ``config`` (models are loaded now, before the first request)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    models = load_models(config)
    registry = CollectorRegistry()
    requests_total = Counter("adntn_requests", "HTTP requests", ["route", "model", "status"], registry=registry)
    latency = Histogram("adntn_request_duration_seconds", "Request latency", ["route", "model"], registry=registry,
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    inference = Histogram("adntn_inference_duration_seconds", "Model run time", ["model"], registry=registry,
                          buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def find(request: Request) -> tuple[LoadedModel | None, JSONResponse | None]:
        name = request.path_params["name"]
        versions = models.get(name)
        if versions is None:
            return None, error(404, f"unknown model {name!r}; served models: {sorted(models)}")
        version = request.path_params.get("version")
        if version is None:
            version = max(versions, key=int)
        if version not in versions:
            return None, error(404, f"model {name!r} has no version {version!r}; versions: {sorted(versions, key=int)}")
        return versions[version], None

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

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_request_bytes:
            raise ProtocolError(f"request body of {declared} bytes exceeds the limit of {config.max_request_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_request_bytes:
                raise ProtocolError(f"request body exceeds the limit of {config.max_request_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(request: Request):
        model, problem = find(request)
        if problem:
            return problem
        try:
            body = await read_body(request)
            decoded = decode_request(body, request.headers.get(HEADER_LENGTH))
            start = time.perf_counter()
            outputs = await run_in_threadpool(model.predictor.run, decoded.inputs, decoded.outputs)
            inference.labels(model.entry.name).observe(time.perf_counter() - start)
        except GeneratorError as exc:  # ProtocolError and the predictor's InputError
            return error(400, str(exc))
        body, headers = encode_response(model.entry.name, model.entry.version, decoded, outputs, list(outputs))
        return Response(body, headers=headers)

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

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})

    class AccessLog:
        """ASGI middleware: one JSON log line and the Prometheus counters for every request."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            start = time.perf_counter()
            status = {"code": 500}

            async def capture(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, capture)
            finally:
                path = scope["path"]
                parts = path.split("/")
                model = parts[3] if len(parts) > 3 and parts[2] == "models" else ""
                route = "infer" if path.endswith("/infer") else ("metrics" if path == "/metrics" else "other")
                seconds = time.perf_counter() - start
                requests_total.labels(route, model, str(status["code"])).inc()
                latency.labels(route, model).observe(seconds)
                log.info(json.dumps({"ts": round(time.time(), 3), "method": scope["method"], "path": path,
                                     "status": status["code"], "ms": round(seconds * 1e3, 3), "model": model}))

    app.state.models = models
    return AccessLog(app)


def create_app_from_env():
    """App factory for multi-worker uvicorn: the config comes from $ADNTN_SERVE_CONFIG (JSON)."""
    data = json.loads(os.environ[CONFIG_ENV])
    return create_app(ServeConfig(**data))
