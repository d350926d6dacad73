"""Benchmark packed dense kernels, untuned and tuned, against MetaSchedule-tuned generic TVM and ONNX Runtime.

python benchmarks/dense.py [--target host] [--models mlp-dense,mlp-ttn,alexnet,vgg16] [--batches 1,32] [--rounds 5]

For each model and batch, in one run: ONNX Runtime; TVM ``compile --prepack`` (the default: dense layers
read weights packed into vector panels at load) twice, with the default register blocks (untuned: the
shipped schedules/ hidden) and with the shipped tuning database for the target (tuned); and TVM
``compile --no-prepack`` with the shipped database (the generic matmuls as MetaSchedule tuned them; see
benchmarks/results/tuning*.md for the trials). Latencies are medians over interleaved rounds, each runtime
timed in a fresh process (benchmarks/isolated.py). Models: the MLP 784-1024-1024-10 dense and with TTN
generators, and the AlexNet / VGG-16 classifier blocks (dense). Results:
benchmarks/results/dense[_<target>].{json,md}.
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
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(name: str):
    import torch
    from torch import nn

    from adntn_deploy.nn import ADNTNLinear

    torch.manual_seed(0)
    if name == "mlp-dense":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    if name == "mlp-ttn":
        return nn.Sequential(ADNTNLinear(784, 1024, family="ttn"), nn.ReLU(), ADNTNLinear(1024, 1024, family="ttn"),
                             nn.ReLU(), nn.Linear(1024, 10)).eval()
    from onnx_runtime import build_block

    return build_block(name, "dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="host")
    parser.add_argument("--models", default="mlp-dense,mlp-ttn,alexnet,vgg16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.onnx_export import export_onnx
    from isolated import interleaved_medians

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                model = build(name)
                width = model[0].in_features
                path = Path(tmp) / f"{name}-b{batch}.onnx"
                export_onnx(model, [torch.randn(batch, width)], path, input_names=["input"])
                del model
                x = {"input": np.random.default_rng(0).standard_normal((batch, width)).astype(np.float32)}
                models, manifests = {"ort": path}, {}
                for variant, prepack in (("packed", True), ("packed_tuned", True), ("generic_tuned", False)):
                    # untuned: hide the shipped schedules/ so the kernels run on the default blocks
                    hidden = {"ADNTN_SCHEDULES_DIR": str(Path(tmp) / "no-schedules")} if variant == "packed" else {}
                    os.environ.update(hidden)
                    artifact = compile_model(path, args.target, Path(tmp) / f"{name}-b{batch}-{variant}", prepack=prepack)
                    for key in hidden:
                        os.environ.pop(key)
                    models[variant] = artifact.path
                    manifests[variant] = artifact.manifest["tuning"]
                calls = 200 if name.startswith("mlp") else 10  # an MLP call is ~0.05 ms: more samples against noise
                med = interleaved_medians(models, x, calls=calls, rounds=args.rounds)
                row = {"model": name, "batch": batch, "ort_ms": med["ort"], "packed_ms": med["packed"],
                       "packed_tuned_ms": med["packed_tuned"], "generic_tuned_ms": med["generic_tuned"],
                       "packed_over_ort": med["packed"] / med["ort"], "packed_tuned_over_ort": med["packed_tuned"] / med["ort"],
                       "generic_tuned_over_ort": med["generic_tuned"] / med["ort"],
                       "packed_layers": manifests["packed"]["packed_dense"],
                       "packed_kernels_tuned": f"{manifests['packed_tuned']['scheduled_kernels']}/{manifests['packed_tuned']['kernels']}",
                       "generic_records": manifests["generic_tuned"]["records"],
                       "generic_kernels_tuned": f"{manifests['generic_tuned']['scheduled_kernels']}/{manifests['generic_tuned']['kernels']}"}
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = ("| model | batch | ORT ms | TVM packed, untuned ms | TVM packed, tuned ms | TVM generic, tuned ms | "
             "untuned/ORT | tuned/ORT | generic tuned/ORT | packed layers | packed kernels tuned | generic kernels tuned |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    table += "\n".join(f"| {r['model']} | {r['batch']} | {r['ort_ms']:.3f} | {r['packed_ms']:.3f} | {r['packed_tuned_ms']:.3f} | "
                       f"{r['generic_tuned_ms']:.3f} | {r['packed_over_ort']:.2f} | {r['packed_tuned_over_ort']:.2f} | "
                       f"{r['generic_tuned_over_ort']:.2f} | {r['packed_layers']} | {r['packed_kernels_tuned']} | "
                       f"{r['generic_kernels_tuned']} |" for r in rows)
    print(table)
    meta = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
            "target": args.target, "rounds": args.rounds}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "dense" if args.target == "host" else f"dense_{args.target}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text(f"# Packed dense kernels (untuned, tuned) vs tuned generic TVM vs ONNX Runtime ({args.target})\n\n"
                                        f"{json.dumps(meta)}\n\n{table}\n")


if __name__ == "__main__":
    main()
