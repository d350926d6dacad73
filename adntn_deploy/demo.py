"""The main job on built-in defaults (``adntn-deploy demo``): a model from data to a served endpoint.

1. Data: Fashion-MNIST from the Debian package, or the built-in digits when it is absent.
2. Train a small dense model (the zoo's AlexNet-style net by default) for a short budget; save its checkpoint.
3. Compress its hidden classifier layers with a generator at >= 2,000x per layer: fit the cores to the
   trained weights, fine-tune briefly; save the compressed checkpoint.
4. Export to ONNX (ai.adntn nodes holding only the cores); run it with ONNX Runtime.
5. Compile for this machine with TVM (weights generated once at load) and cross-compile for a Raspberry
   Pi 4 (aarch64); run the host artifact.
6. Check torch, ONNX Runtime and TVM agree; measure accuracy and batch-1 latency of each.
7. Serve the ONNX model over HTTP (Open Inference Protocol v2) on a loopback port and time 20 requests.
8. Print one table. Stages whose optional parts are missing (TVM, a cross toolchain) are reported as
   skipped with the command that installs them, never silently left out.
"""

from __future__ import annotations

import importlib.util

import json
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from adntn_deploy.errors import ServingError


@dataclass
class DemoOptions:
    """Knobs of the main job; the defaults finish in a few minutes on 2 cores."""

    data: str = "auto"
    model: str = "alexnet"
    epochs: int = 2
    family: str = "ttn"
    layout: str = "operator"
    ratio: float = 2000.0
    fit_steps: int = 50
    finetune_epochs: int = 2
    cross_target: str = "rpi4"
    workdir: Path | None = None
    serve: bool = True
    seed: int = 0


def _dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _latency_ms(call: Callable[[], Any], repeat: int = 200) -> float:
    """Median wall-clock latency of ``call()`` in milliseconds: one warm-up call, then ``repeat`` timed ones."""
    from adntn_deploy.runtime import benchmark

    return benchmark(lambda feeds: call(), {}, repeat=repeat, warmup=1).median_ms


def _accuracy(run_batch: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, batch: int) -> float:
    logits = np.concatenate([run_batch(x[i:i + batch]) for i in range(0, len(x), batch)])
    return float((logits.argmax(1) == y).mean())


def _max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def pick_dataset(name: str, say: Callable[[str], None]):
    """Load ``name``; "auto" is Fashion-MNIST when installed, else the built-in digits (with a note)."""
    from adntn_deploy.data import DataError, load_dataset

    if name != "auto":
        return load_dataset(name)
    try:
        return load_dataset("fashion-mnist")
    except DataError as exc:
        say(f"note: {exc}; using the built-in digits dataset instead")
        return load_dataset("digits")


#: requests the demo's server stage sends before timing (connection, first-call allocations), and times
SERVER_WARMUP_REQUESTS, SERVER_TIMED_REQUESTS = 3, 20


def _serve_requests(onnx_path: Path, image: np.ndarray) -> tuple[np.ndarray, float]:
    """Start the OIP v2 server on a free loopback port, send JSON inference requests over one keep-alive
    connection, stop it; returns (the last reply's output, median seconds per timed request).

    The first requests are not timed (:data:`SERVER_WARMUP_REQUESTS`): the very first one also paid for the
    connection and the first call's allocations (28.7 ms against a steady 1-2 ms on the 2-core host).

    Raises:
        ServingError: the server did not start, or a request did not answer 200.
    """
    import http.client

    import uvicorn

    from adntn_deploy.serving.app import ServeConfig, create_app

    app = create_app(ServeConfig(str(onnx_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    connection = None
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise ServingError(f"the demo server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        body = json.dumps({"inputs": [{"name": "input", "shape": list(image.shape), "datatype": "FP32",
                                       "data": image.ravel().tolist()}]}).encode()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        times = []
        for k in range(SERVER_WARMUP_REQUESTS + SERVER_TIMED_REQUESTS):
            start = time.perf_counter()
            connection.request("POST", f"/v2/models/{onnx_path.stem}/infer", body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            payload = response.read()
            if k >= SERVER_WARMUP_REQUESTS:
                times.append(time.perf_counter() - start)
            if response.status != 200:
                raise ServingError(f"the demo server answered {response.status}: {payload[:200]!r}")
        reply = json.loads(payload)
    finally:
        if connection is not None:
            connection.close()
        server.should_exit = True
        thread.join(timeout=10)
    out = reply["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]), float(np.median(times))


def run_demo(options: DemoOptions | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the whole pipeline, print its progress and the summary table unless ``quiet``; return the results.

    Raises:
        AdntnError (a stage's subclass): a stage failed; the message names it. Missing optional parts
            (TVM, cross toolchains) do not raise: their rows say "skipped" and why.
    """
    import click
    import torch

    import adntn_deploy
    from adntn_deploy.training import predict_logits
    from adntn_deploy.workflows import compress_checkpoint, train_checkpoint

    opts = options or DemoOptions()
    say = (lambda *a: None) if quiet else (lambda msg: click.echo(msg, err=True))
    work = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="adntn-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
                               "workdir": str(work), "rows": []}
    rows = results["rows"]

    data = pick_dataset(opts.data, say)
    results["data"] = data.describe()
    x_test, y_test = data.test_x.numpy(), data.test_y.numpy()
    say(f"[1/6] train a dense {opts.model} on {data.name} ({opts.epochs} epoch(s))")
    trained = train_checkpoint(opts.model, work / "dense.ckpt", data, epochs=opts.epochs, seed=opts.seed, progress=not quiet)
    dense, dense_acc, dense_path = trained.model, trained.test_accuracy, trained.checkpoint
    one = data.test_x[:1]
    with torch.no_grad():
        dense_ms = _latency_ms(lambda: dense(one))
    rows.append({"stage": "dense model", "backend": "torch", "file": dense_path.name, "bytes": _dir_bytes(dense_path),
                 "ratio": 1.0, "accuracy": dense_acc, "latency_ms": dense_ms, "max_rel_diff": None, "note": f"{opts.epochs} epoch(s)"})

    say(f"[2/6] compress the classifier: {opts.family} ({opts.layout} layout) at >= {opts.ratio:,.0f}x per layer, then "
        f"fine-tune {opts.finetune_epochs} epoch(s) distilling from the dense model")
    compressed = compress_checkpoint(dense, work / "compressed.ckpt", data, family=opts.family, ratio=opts.ratio,
                                     layout=opts.layout, fit_steps=opts.fit_steps, calibrate=2000,
                                     epochs=opts.finetune_epochs, scope="head", distill=True, seed=opts.seed,
                                     dense_accuracy=dense_acc, progress=not quiet)
    model, report, acc, small_path = compressed.model, compressed.report, compressed.accuracy, compressed.checkpoint
    with torch.no_grad():
        reference = model(data.test_x[:64]).numpy()
        torch_ms = _latency_ms(lambda: model(one))
    layer_ratios = ", ".join(f"{r.ratio:,.0f}x" for r in report.layers)
    results["compression"] = report.as_dict()
    rows.append({"stage": "compressed", "backend": "torch", "file": small_path.name, "bytes": _dir_bytes(small_path),
                 "ratio": report.model_ratio, "accuracy": acc, "latency_ms": torch_ms, "max_rel_diff": 0.0,
                 "note": f"layers {layer_ratios}"})

    say("[3/6] export to ONNX and run it with ONNX Runtime")
    onnx_path = work / "model.onnx"
    adntn_deploy.export_onnx(model, [data.test_x[:2]], onnx_path, input_names=["input"], output_names=["logits"], dynamic_batch=True)
    ort = adntn_deploy.load(onnx_path)
    ort_run = lambda batch: ort.run({"input": np.ascontiguousarray(batch)})["logits"]  # noqa: E731
    rows.append({"stage": "ONNX", "backend": "onnxruntime", "file": onnx_path.name, "bytes": _dir_bytes(onnx_path),
                 "ratio": None, "accuracy": _accuracy(ort_run, x_test, y_test, 1000), "latency_ms": _latency_ms(lambda: ort_run(x_test[:1])),
                 "max_rel_diff": _max_rel_diff(ort_run(x_test[:64]), reference), "note": "ai.adntn nodes, cores only"})

    say("[4/6] compile with TVM for this machine (weights generated at load) and cross-compile for a Raspberry Pi 4")
    with torch.no_grad():
        torch_logits = predict_logits(model, data.test_x[:200]).numpy()
    rows.extend(_tvm_rows(onnx_path, work, opts.cross_target, x_test, y_test, reference, torch_logits, say))

    if opts.serve:
        say(f"[5/6] serve the ONNX model over HTTP (OIP v2) on a loopback port for {SERVER_TIMED_REQUESTS} timed requests")
        reply, seconds = _serve_requests(onnx_path, x_test[:1])
        rows.append({"stage": "server", "backend": "HTTP OIP v2 (onnxruntime)", "file": "-", "bytes": None, "ratio": None,
                     "accuracy": None, "latency_ms": 1e3 * seconds, "max_rel_diff": _max_rel_diff(reply, reference[:1]),
                     "note": f"median of {SERVER_TIMED_REQUESTS} requests after {SERVER_WARMUP_REQUESTS}, JSON, keep-alive"})
    dense_file = rows[0]["bytes"]
    for row in rows:
        if row["bytes"] and row["ratio"] is None:
            row["ratio"] = dense_file / row["bytes"]
    results["seconds"] = time.perf_counter() - started
    say(f"[6/6] done in {results['seconds']:.0f} s; files in {work}")
    if not quiet:
        click.echo(summary_table(rows, data.name))
    return results


def _tvm_rows(onnx_path: Path, work: Path, cross_target: str, x_test, y_test, reference, torch_logits, say) -> list[dict[str, Any]]:
    if importlib.util.find_spec("tvm") is None:
        skipped = "skipped: TVM is not installed (pip install 'adntn-deploy[tvm]')"
        return [{"stage": "TVM host", "backend": "tvm", "file": "-", "bytes": None, "ratio": None, "accuracy": None,
                 "latency_ms": None, "max_rel_diff": None, "note": skipped}]
    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.compiler.profiles import ProfileError
    from adntn_deploy.runtime import load

    host_dir = work / "model-host"
    artifact = compile_model(onnx_path, "host", host_dir, weights="load", input_shapes={"input": (1, *x_test.shape[1:])},
                             notes=lambda line: say(line) if line.startswith("note:") else None)
    predictor = load(host_dir)
    tvm_run = lambda batch: predictor.run({"input": np.ascontiguousarray(batch)})["logits"]  # noqa: E731
    diff = max(_max_rel_diff(tvm_run(x_test[i:i + 1]), reference[i:i + 1]) for i in range(8))
    tvm_acc = _accuracy(tvm_run, x_test, y_test, 1)  # the whole test set, one image per call as on a device
    rows = [{"stage": "TVM host", "backend": f"tvm ({artifact.manifest.get('profile', 'host')}, {artifact.manifest.get('arch', 'x86_64')})",
             "file": host_dir.name + "/", "bytes": _dir_bytes(host_dir), "ratio": None,
             "accuracy": tvm_acc, "latency_ms": _latency_ms(lambda: tvm_run(x_test[:1]), 20), "max_rel_diff": diff,
             "note": "weights generated at load; packed kernels (shipped records where they match)"}]
    cross_dir = work / f"model-{cross_target}"
    try:
        compile_model(onnx_path, cross_target, cross_dir, weights="load", input_shapes={"input": (1, *x_test.shape[1:])},
                      notes=lambda line: say(line) if line.startswith("note:") else None)
        note, size = "cross-compiled; copy with 'adntn-deploy bundle' and run on the board", _dir_bytes(cross_dir)
    except ProfileError as exc:
        note, size = f"skipped: {exc}", None
        say(f"note: {exc}")
    rows.append({"stage": f"TVM {cross_target}", "backend": "tvm (aarch64)", "file": cross_dir.name + "/" if size else "-",
                 "bytes": size, "ratio": None, "accuracy": None, "latency_ms": None, "max_rel_diff": None, "note": note})
    return rows


def summary_table(rows: list[dict[str, Any]], data_name: str) -> str:
    """The demo's one table: size, ratio to the dense checkpoint, accuracy, batch-1 latency, agreement."""
    from adntn_deploy.reporting import human_bytes, render_table

    def fmt(value, kind):
        if value is None:
            return "-"
        return {"bytes": human_bytes, "ratio": lambda v: f"{v:,.1f}x", "accuracy": lambda v: f"{100 * v:.2f}%",
                "ms": lambda v: f"{v:.3f}", "diff": lambda v: f"{v:.1e}"}[kind](value)

    body = [[r["stage"], r["backend"], r["file"], fmt(r["bytes"], "bytes"), fmt(r["ratio"], "ratio"), fmt(r["accuracy"], "accuracy"),
             fmt(r["latency_ms"], "ms"), fmt(r["max_rel_diff"], "diff"), r["note"]] for r in rows]
    headers = ["stage", "backend", "file", "size", "vs dense", f"{data_name} test acc", "latency b1 (ms)", "max rel diff vs torch", "note"]
    return render_table(headers, body)
