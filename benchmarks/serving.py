"""Benchmark the server: requests/s and p50/p99 latency at 1, 8, 32 and 64 clients, with and without dynamic batching.

python benchmarks/serving.py [--model mlp] [--seconds 6] [--clients 1,8,32,64] [--max-batch-size 64] [--max-queue-delay-us 0]

Serves the zoo's mlp (784-1024-1024-10, dynamic batch) in a real ``adntn-deploy serve`` process on loopback,
once per setting: ONNX Runtime unbatched, ONNX Runtime with ``--max-batch-size``, and the TVM artifact
(compiled for the host at batch 1: a fixed batch, which the server serves unbatched, with a note).
Concurrent clients (threads, one gRPC channel each, requests built with tritonclient's messages and
serialized once) send one-row requests for --seconds after a warm-up; every answer is checked against a local ONNX Runtime run. Goal (issue #21):
at 32 clients, batching gives >= 2x the unbatched requests/s with p99 <= 2x the unbatched p99.
Results: benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
THROUGHPUT_GOAL, P99_GOAL = 2.0, 2.0


def start_server(path: Path, *options: str) -> tuple[subprocess.Popen, int, int]:
    """``adntn-deploy serve PATH --grpc-port P OPTIONS`` in its own session; (process, gRPC port, HTTP port)."""
    import tritonclient.grpc as grpcclient

    from processes import free_port

    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "adntn_deploy.cli.main", "serve", str(path), "--port", str(port),
                             "--grpc-port", str(grpc_port), "--log-level", "warning", *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if client.is_server_ready():
                return proc, grpc_port, port
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("server did not start in 120 s")


def batch_counts(http_port: int) -> tuple[float, float]:
    """(batched runs, requests in them) so far, from the server's /metrics (0, 0 when it does not batch)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    values = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line and not line.startswith("#")}
    return (values.get('adntn_batch_requests_count{model="model"}', 0.0), values.get('adntn_batch_requests_sum{model="model"}', 0.0))


def infer_requests(pool) -> list[bytes]:
    """One serialized ModelInferRequest per input (built with tritonclient's own messages, raw contents)."""
    from tritonclient.grpc import service_pb2

    requests = []
    for x in pool:
        request = service_pb2.ModelInferRequest(model_name="model")
        request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.astype("<f4").tobytes())
        requests.append(request.SerializeToString())
    return requests


def load_test(grpc_port: int, requests: list[bytes], expected, clients: int, seconds: float) -> dict:
    """``clients`` threads, each with its own gRPC channel, sending one-row requests for ``seconds``;
    throughput, latency percentiles, errors. Requests are serialized once up front and answers parsed with
    tritonclient's messages, so the load generator spends little CPU beside the server on a 2-core box."""
    import grpc
    from tritonclient.grpc import service_pb2

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)
    window = {}

    def client(k: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        mine, i = [], 0
        start_line.wait()
        while time.perf_counter() < window["end"]:
            j = (k * 7919 + i) % len(requests)
            i += 1
            t0 = time.perf_counter()
            try:
                response = service_pb2.ModelInferResponse.FromString(call(requests[j], timeout=60))
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{exc.code()}: {exc.details()}"[:200])
                continue
            elapsed = time.perf_counter() - t0
            got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(response.outputs[0].shape))
            if not np.allclose(got, expected[j], rtol=1e-4, atol=1e-5):
                with lock:
                    errors.append("wrong answer")
            elif t0 >= window["start"]:  # the first second warms the server's pools and batcher up
                mine.append(elapsed)
        channel.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    window.update(start=now + 1.0, end=now + 1.0 + seconds)
    start_line.wait()
    for t in threads:
        t.join()
    ms = sorted(x * 1e3 for x in latencies)
    return {"clients": clients, "requests": len(ms), "errors": len(errors), "rps": len(ms) / seconds,
            "p50_ms": statistics.median(ms) if ms else float("nan"),
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan"),
            "first_error": errors[0] if errors else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run (after 1 s of warm-up)")
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=0)
    parser.add_argument("--no-tvm", action="store_true", help="skip the TVM server")
    parser.add_argument("--model", default="mlp", help="zoo model to serve (mlp, alexnet, vgg)")
    parser.add_argument("--results", default="serving", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    import torch

    from adntn_deploy.models.zoo import INPUT_SHAPE, build_model
    from adntn_deploy.onnx_export import export_onnx
    from adntn_deploy.runtime import load

    torch.manual_seed(0)
    model = build_model(args.model).eval()
    batching = ("--max-batch-size", str(args.max_batch_size), "--max-queue-delay-us", str(args.max_queue_delay_us))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, [torch.randn(2, *INPUT_SHAPE)], onnx_path, input_names=["input"], output_names=["output"],
                    dynamic_batch=True)
        settings = [("ort", "off", onnx_path, ()), ("ort", "on", onnx_path, batching)]
        if not args.no_tvm:
            from adntn_deploy.compiler.build import compile_model

            artifact = compile_model(onnx_path, "host", Path(tmp) / "model")  # batch 1: served unbatched
            settings.append(("tvm", "off (fixed batch)", artifact.path, batching))
        rng = np.random.default_rng(0)
        pool = [rng.standard_normal((1, *INPUT_SHAPE)).astype(np.float32) for _ in range(64)]
        reference = load(onnx_path)
        expected = [reference.run({"input": x})["output"] for x in pool]
        requests = infer_requests(pool)
        for backend, batched, path, options in settings:
            proc, grpc_port, http_port = start_server(path, *options)
            try:
                for clients in map(int, args.clients.split(",")):
                    runs_before, merged_before = batch_counts(http_port)
                    result = {"backend": backend, "batching": batched,
                              **load_test(grpc_port, requests, expected, clients, args.seconds)}
                    runs, merged = batch_counts(http_port)
                    result["requests_per_run"] = (merged - merged_before) / (runs - runs_before) if runs > runs_before else 1.0
                    rows.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                proc.terminate()
                proc.wait(10)
    table = ("| backend | batching | clients | requests | errors | req/s | p50 ms | p99 ms | requests per run |\n"
             "|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    table += "\n".join(f"| {r['backend']} | {r['batching']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                       f"{r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['requests_per_run']:.1f} |"
                       for r in rows)
    summary = []
    for clients in map(int, args.clients.split(",")):
        off = next((r for r in rows if (r["backend"], r["batching"], r["clients"]) == ("ort", "off", clients)), None)
        on = next((r for r in rows if (r["backend"], r["batching"], r["clients"]) == ("ort", "on", clients)), None)
        if off and on and off["requests"] and on["requests"]:
            summary.append({"clients": clients, "throughput_ratio": on["rps"] / off["rps"],
                            "p99_ratio": on["p99_ms"] / off["p99_ms"]})
    summary_table = ("| clients | batched / unbatched req/s | batched / unbatched p99 |\n|---:|---:|---:|\n"
                     + "\n".join(f"| {s['clients']} | {s['throughput_ratio']:.2f} | {s['p99_ratio']:.2f} |"
                                 for s in summary))
    print(table + "\n\nORT, batched against unbatched:\n" + summary_table)
    meta = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
            "model": f"zoo {args.model}, one-row FP32 requests over gRPC (raw contents)",
            "batching": f"--max-batch-size {args.max_batch_size} --max-queue-delay-us {args.max_queue_delay_us}",
            "seconds": args.seconds, "goal": f"32 clients: >= {THROUGHPUT_GOAL}x req/s, p99 <= {P99_GOAL}x"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results}.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2))
    (RESULTS / f"{args.results}.md").write_text(f"# Serving benchmark\n\n{json.dumps(meta)}\n\n{table}\n\n"
                                        f"ORT, batched against unbatched:\n\n{summary_table}\n")


if __name__ == "__main__":
    main()
