"""CLI commands of the serving stage: ``serve`` and ``package``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from adntn_deploy.cli.onnx_commands import max_weight_bytes_option
from adntn_deploy.cli.sockets import check_port_free


def max_queue_delay_option(help_text: str):
    """``--max-queue-delay-us``: how long a dynamic batch waits for more requests (serve's batcher, Triton's)."""
    return click.option("--max-queue-delay-us", default=0, show_default=True, type=click.IntRange(0, 10_000_000),
                        help=help_text)


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
@click.option("--grpc-port", default=None, type=click.IntRange(1, 65535),
              help="Also serve the KServe v2 gRPC protocol on this port (Triton uses 8001), from the same models.")
@click.option("--max-batch-size", default=1, show_default=True, type=click.IntRange(1, 65536),
              help="Merge concurrent requests into runs of up to this many rows (1: no dynamic batching).")
@max_queue_delay_option("Microseconds a batch waits for more requests after its oldest one arrived.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@max_weight_bytes_option
def serve_command(model, backend, host, port, workers, max_request_bytes, max_concurrency, max_queue,
                  request_timeout, keep_alive_timeout, warmup, grpc_port, max_batch_size, max_queue_delay_us, log_level):
    """Serve MODEL (an .onnx file, a compiled artifact or a model repository) over the Open Inference Protocol v2
    (HTTP, and gRPC with --grpc-port), batching concurrent requests with --max-batch-size."""
    import uvicorn

    from adntn_deploy.serving.app import CONFIG_ENV, ServeConfig, create_app
    from adntn_deploy.serving.connection import TimedH11Protocol

    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(message)s", stream=sys.stderr)
    if grpc_port is not None and grpc_port == port:
        raise click.UsageError(f"--grpc-port {grpc_port} is the HTTP --port too; give them different ports")
    check_port_free(host, port, "--port")  # before loading models, and before announcing the address
    if grpc_port is not None and workers == 1:
        check_port_free(host, grpc_port, "--grpc-port")
    config = ServeConfig(str(model.resolve()), backend, max_request_bytes, max_concurrency=max_concurrency,
                         max_queue=max_queue, request_timeout=request_timeout, warmup=warmup,
                         max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us, grpc_host=host,
                         grpc_port=grpc_port, workers=workers)
    # h11 with a header deadline (uvicorn's own protocols have none); the app bounds the body
    server_options = dict(host=host, port=port, log_level="warning", access_log=False, http=TimedH11Protocol,
                          timeout_keep_alive=keep_alive_timeout)
    if workers == 1:
        app = create_app(config)  # load now: a bad model fails here, with one line, before binding
        where = f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address in a URL
        grpc = f" and grpc://{where}:{grpc_port}" if grpc_port is not None else ""
        click.echo(f"serving {sorted(app.inner.state.models)} on http://{where}:{port}/v2{grpc}", err=True)
        uvicorn.run(app, **server_options)
        return
    from adntn_deploy.serving.app import load_models

    load_models(config)  # validate before forking workers
    os.environ[CONFIG_ENV] = json.dumps(config.__dict__)
    uvicorn.run("adntn_deploy.serving.app:create_app_from_env", factory=True, workers=workers, **server_options)


@click.command("package")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["triton", "kserve"]), default="triton", show_default=True,
              help="triton: a model repository; kserve: that repository under OUTPUT/repository/ and an "
                   "InferenceService manifest OUTPUT/<name>.yaml.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Repository folder (triton); folder for the manifest and repository/ (kserve).")
@click.option("--name", default=None, help="Model name in the repository (default: the file's stem).")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1),
              help="Triton's max_batch_size for a model with a dynamic first axis (its dynamic batcher merges up to this).")
@max_queue_delay_option("Microseconds Triton's dynamic batcher waits for more requests (as serve --max-queue-delay-us).")
@click.option("--version", "model_version", default=1, show_default=True, type=click.IntRange(1))
@click.option("--runtime", type=click.Choice(["adntn", "triton"]), default="adntn", show_default=True,
              help="kserve: the predictor: our image running adntn-deploy serve, or KServe's Triton runtime.")
@click.option("--storage-uri", default=None,
              help="kserve: where the repository will be uploaded (s3://, gs://, pvc://, https://, ...; "
                   "default pvc://adntn-models/<name>).")
@click.option("--image", default="adntn-deploy:latest", show_default=True,
              help="kserve, --runtime adntn: the image built from the Dockerfile, pushed where the cluster pulls.")
@click.option("--cpu", default="1", show_default=True, help="kserve: CPU request and limit (cores, or 500m).")
@click.option("--memory-headroom", default=1.5, show_default=True, type=click.FloatRange(min=1),
              help="kserve: memory request and limit = measured peak memory x this factor.")
def package_command(model, fmt, output, name, max_batch_size, max_queue_delay_us, model_version, runtime, storage_uri,
                    image, cpu, memory_headroom):
    """Write a Triton model repository (onnxruntime backend) for an ONNX file; adntn-deploy serve reads it too.

    With --format kserve, also measure the model's peak memory (a fresh process loads and runs it once) and
    write a KServe InferenceService that serves the repository with probes and resource requests.
    """
    if fmt == "kserve":
        from adntn_deploy.serving.kserve import package_kserve

        done = package_kserve(model, output, name=name, runtime=runtime, storage_uri=storage_uri, image=image,
                              cpu=cpu, memory_headroom=memory_headroom, max_batch_size=max_batch_size,
                              max_queue_delay_us=max_queue_delay_us, version=model_version)
        click.echo(f"wrote {done.manifest} (memory {done.memory}: {memory_headroom:g} x the measured peak of "
                   f"{done.peak_bytes / 2**20:.0f} MiB) and the repository {done.repository}/")
        where = " (the default: a PersistentVolumeClaim; pass --storage-uri s3://BUCKET/PATH for S3)" if done.storage_default else ""
        click.echo(f"next: upload the contents of {done.repository}/ to {done.storage_uri}{where}, "
                   f"then kubectl apply -f {done.manifest}")
        return
    from adntn_deploy.serving.triton import package_triton

    folder = package_triton(model, output, name=name, max_batch_size=max_batch_size, version=model_version,
                            max_queue_delay_us=max_queue_delay_us)
    click.echo(f"wrote {folder}/config.pbtxt and {folder}/{model_version}/model.onnx")
