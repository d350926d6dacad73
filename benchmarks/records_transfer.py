"""Benchmark: do shipped tuning records help on a CPU other than the one they were tuned on?

python benchmarks/records_transfer.py [--rounds 3] [--blocks]
The shipped databases were tuned on AMD znver5 machines (schedules/*/adntn_schedule.json, `tuned_on`).
For each target that runs on this machine -- `host` (this CPU, mcpu detected by LLVM) and an AVX2-only
JSON target (mcpu znver2, which takes the x86-64-avx2 records) -- and each model, it compiles twice:
untuned (shipped schedules hidden) and with the records compile picks by instruction set, then times both
against ONNX Runtime in interleaved rounds, each call in a fresh process (benchmarks/isolated.py), and
checks every output against ORT. Models: the MLP 784-1024-1024-10 at batch 1 and 32, with packed dense
kernels (the default) and with TVM's generic matmuls (--no-prepack, where tuning matters most); with
--blocks also the AlexNet classifier block at batch 1. Results: benchmarks/results/records_transfer.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolated import interleaved_medians  # noqa: E402

TARGETS = {"host": "host", "AVX2 JSON target": '{"kind": "llvm", "mcpu": "znver2", "num-cores": 2}'}


def models(blocks: bool):
    import torch
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    out = [("mlp-dense", mlp, 1, (784,)), ("mlp-dense", mlp, 32, (784,))]
    if blocks:
        from onnx_runtime import build_block

        out.append(("alexnet-dense", build_block("alexnet", "dense"), 1, (9216,)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", action="store_true", help="also the AlexNet classifier block at batch 1")
    args = parser.parse_args()
    import torch

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.onnx_export import export_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, batch, shape in models(args.blocks):
            onnx_path = Path(tmp) / f"{name}-b{batch}.onnx"  # the names the records were tuned under
            export_onnx(model, [torch.randn(batch, *shape)], onnx_path, input_names=["input"])
            x = {"input": np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)}
            for label, target in TARGETS.items():
                for prepack in (True, False):
                    if not prepack and name != "mlp-dense":
                        continue
                    stem = Path(tmp) / f"{name}-b{batch}-{len(rows)}"
                    os.environ["ADNTN_SCHEDULES_DIR"] = str(Path(tmp) / "no-schedules")
                    untuned = compile_model(onnx_path, target, f"{stem}-untuned", prepack=prepack)
                    os.environ.pop("ADNTN_SCHEDULES_DIR")
                    tuned = compile_model(onnx_path, target, f"{stem}-tuned", prepack=prepack)
                    med = interleaved_medians({"ort": onnx_path, "untuned": untuned.path, "tuned": tuned.path}, x,
                                              calls={"ort": 50, "untuned": 10 if not prepack else 50, "tuned": 50},
                                              rounds=args.rounds)
                    info = tuned.manifest["tuning"]
                    row = {"model": name, "batch": batch, "target": label, "cpu": json.loads(tuned.manifest["target"]).get("mcpu"),
                           "kernels": "packed" if prepack else "generic", "records": info["records_profile"],
                           "scheduled": f"{info['scheduled_kernels']}/{info['kernels']}", "ort_ms": med["ort"],
                           "untuned_ms": med["untuned"], "tuned_ms": med["tuned"], "speedup": med["untuned"] / med["tuned"]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    table = ("| model | batch | target (mcpu) | kernels | records applied | kernels scheduled | ORT ms | untuned ms | "
             "with records ms | untuned / with records |\n|---|---:|---|---|---|---:|---:|---:|---:|---:|\n")
    table += "\n".join(f"| {r['model']} | {r['batch']} | {r['target']} ({r['cpu']}) | {r['kernels']} | {r['records']} | "
                       f"{r['scheduled']} | {r['ort_ms']:.3f} | {r['untuned_ms']:.3f} | {r['tuned_ms']:.3f} | "
                       f"{r['speedup']:.2f} |" for r in rows)
    print(table)
    meta = {"machine": platform.platform(), "processor": _cpu_name(), "cpus": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "records_transfer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / "records_transfer.md").write_text(
        f"# Shipped records on another CPU than they were tuned on\n\n{json.dumps(meta)}\n\n{table}\n")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
