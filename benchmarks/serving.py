"""Benchmark the Open Inference Protocol server: requests/s and p50/p99 latency, 1/8/32 clients, ORT and TVM.

python benchmarks/serving.py [--requests 300] [--seconds 20]
Serves one ADNTN model (an MLP 784-1024-1024-10 with TTN generators, batch 1) with each backend in a real
server process on loopback; concurrent clients (threads, keep-alive connections) send JSON infer requests
drawn from a pool of inputs; every answer is checked against a direct predictor call. Each run is bounded
by --requests per client count and --seconds. Results: benchmarks/results/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "adntn_deploy.cli.main", "serve", str(path), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)


def load_test(port: int, model: str, pool, expected, clients: int, requests: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    per_client = max(1, requests // clients)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(per_client):
            if time.perf_counter() > stop_at:
                break
            j = (k * 7919 + i) % len(pool)
            body = json.dumps({"inputs": [{"name": "input", "shape": list(pool[j].shape), "datatype": "FP32",
                                           "data": pool[j].ravel().tolist()}]})
            t0 = time.perf_counter()
            conn.request("POST", f"/v2/models/{model}/infer", body, {"content-type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            elapsed = time.perf_counter() - t0
            if response.status != 200:
                errors.append(payload[:200])
                continue
            data = np.array(json.loads(payload)["outputs"][0]["data"], dtype=np.float32)
            if not np.allclose(data, expected[j].ravel(), rtol=1e-5, atol=1e-6):
                errors.append(b"wrong answer")
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = sorted(x * 1e3 for x in latencies)
    return {"clients": clients, "requests": len(ms), "errors": len(errors), "rps": len(ms) / wall,
            "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per client-count run")
    parser.add_argument("--seconds", type=float, default=20.0, help="time cap per run")
    args = parser.parse_args()
    import torch
    from torch import nn

    from adntn_deploy.nn import ADNTNLinear
    from adntn_deploy.onnx_export import export_onnx
    from adntn_deploy.runtime import load

    torch.manual_seed(0)
    model = nn.Sequential(ADNTNLinear(784, 1024, family="ttn"), nn.ReLU(), ADNTNLinear(1024, 1024, family="ttn"),
                          nn.ReLU(), nn.Linear(1024, 10)).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "mlp.onnx"
        export_onnx(model, [torch.randn(1, 784)], onnx_path, input_names=["input"], output_names=["logits"])
        paths = {"ort": onnx_path}
        try:
            from adntn_deploy.compiler.build import compile_model

            paths["tvm"] = compile_model(onnx_path, "host", Path(tmp) / "mlp-tvm").path
        except ImportError:
            print("TVM not installed: benchmarking ONNX Runtime only", file=sys.stderr)
        rng = np.random.default_rng(0)
        pool = [rng.standard_normal((1, 784)).astype(np.float32) for _ in range(64)]
        for backend, path in paths.items():
            predictor = load(path)
            expected = [predictor.run({"input": x})["logits"] for x in pool]
            proc, port = start_server(path)
            name = path.stem if path.is_file() else path.name
            try:
                for clients in (1, 8, 32):
                    result = {"backend": backend, **load_test(port, name, pool, expected, clients, args.requests, args.seconds)}
                    rows.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                stop_server(proc)
    table = "| backend | clients | requests | errors | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|---:|---:|\n"
    table += "\n".join(f"| {r['backend']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.0f} | "
                       f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |" for r in rows)
    print(table)
    meta = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
            "model": "MLP 784-1024-1024-10, TTN generators (bond 4), batch 1, JSON requests", "tvm": "untuned"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / "serving.md").write_text(f"# Serving benchmark\n\n{json.dumps(meta)}\n\n{table}\n")


if __name__ == "__main__":
    main()
