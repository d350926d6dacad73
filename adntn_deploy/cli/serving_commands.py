"""CLI commands of the serving stage: ``serve`` and ``package``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from adntn_deploy.cli.onnx_commands import max_weight_bytes_option


@click.command("serve")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["ort", "tvm"]), default=None,
              help="Runtime (default: ort for .onnx files, tvm for compiled artifacts).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 to expose).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Server processes.")
@click.option("--max-request-bytes", default=64 * 1024 * 1024, show_default=True, type=click.IntRange(1),
              help="Largest request body; larger ones get 413.")
@click.option("--max-concurrency", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Requests one model version decodes, runs and encodes at once.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests per model version waiting beyond --max-concurrency; more get 503.")
@click.option("--request-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a client has to send a request's headers, and again its body (then 408 / closed).")
@click.option("--keep-alive-timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="Run each model once on zeros at start and refuse to serve one that fails.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@max_weight_bytes_option
def serve_command(model, backend, host, port, workers, max_request_bytes, max_concurrency, max_queue,
                  request_timeout, keep_alive_timeout, warmup, log_level):
    """Serve MODEL (an .onnx file, a compiled artifact or a model repository) over the Open Inference Protocol v2."""
    import uvicorn

    from adntn_deploy.serving.app import CONFIG_ENV, ServeConfig, create_app
    from adntn_deploy.serving.connection import TimedH11Protocol

    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(message)s", stream=sys.stderr)
    config = ServeConfig(str(model.resolve()), backend, max_request_bytes, max_concurrency=max_concurrency,
                         max_queue=max_queue, request_timeout=request_timeout, warmup=warmup)
    # h11 with a header deadline (uvicorn's own protocols have none); the app bounds the body
    server_options = dict(host=host, port=port, log_level="warning", access_log=False, http=TimedH11Protocol,
                          timeout_keep_alive=keep_alive_timeout)
    if workers == 1:
        app = create_app(config)  # load now: a bad model fails here, with one line, before binding
        click.echo(f"serving {sorted(app.inner.state.models)} on http://{host}:{port}/v2", err=True)
        uvicorn.run(app, **server_options)
        return
    from adntn_deploy.serving.app import load_models

    load_models(config)  # validate before forking workers
    os.environ[CONFIG_ENV] = json.dumps(config.__dict__)
    uvicorn.run("adntn_deploy.serving.app:create_app_from_env", factory=True, workers=workers, **server_options)


@click.command("package")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["triton"]), default="triton", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Repository folder.")
@click.option("--name", default=None, help="Model name in the repository (default: the file's stem).")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--version", "model_version", default=1, show_default=True, type=click.IntRange(1))
def package_command(model, fmt, output, name, max_batch_size, model_version):
    """Write a Triton model repository (onnxruntime backend) for an ONNX file; adntn-deploy serve reads it too."""
    from adntn_deploy.serving.triton import package_triton

    folder = package_triton(model, output, name=name, max_batch_size=max_batch_size, version=model_version)
    click.echo(f"wrote {folder}/config.pbtxt and {folder}/{model_version}/model.onnx")
