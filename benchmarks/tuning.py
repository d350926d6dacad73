"""Benchmark auto-tuning on the host: untuned TVM vs tuned TVM vs ONNX Runtime, same models, one run.

python benchmarks/tuning.py [--trials 256] [--target host|x86-64-avx2] [--records schedules/<target>]
Models: an MLP 784-1024-1024-10, dense and with TTN generators, at batch 1 and 32 (static shapes). Each is
tuned with MetaSchedule into --records (default: the shipped database compile applies for this target,
for host the best instruction-set profile of this CPU, e.g. schedules/x86-64-avx512/), then compiled with and without the records; latencies are medians
over interleaved rounds, each runtime timed in a fresh process (benchmarks/isolated.py). Results:
benchmarks/results/tuning.{json,md} (tuning_<target>.{json,md} for other profiles, which must run on this
machine: x86-64-avx2 does on any AVX2 CPU).
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
from isolated import interleaved_medians  # noqa: E402  (each runtime timed in its own process)
REPO = Path(__file__).resolve().parents[1]


def default_records_folder(target: str) -> Path:
    """Where tuning results go by default: the shipped folder compile applies for ``target`` (for host:
    the best instruction-set profile this CPU supports, e.g. schedules/x86-64-avx512)."""
    from adntn_deploy.compiler.target import tvm_target
    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.database import default_records

    profile = resolve_target(target)
    choice = default_records(profile, tvm_target(profile))
    return choice.folder or REPO / "schedules" / (choice.profile or profile.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--target", default="host",
                        help="profile to tune and compile for (it must run on this machine, e.g. host or x86-64-avx2)")
    parser.add_argument("--records", type=Path, default=None, help="database folder (default: schedules/<target>)")
    parser.add_argument("--blocks", action="store_true",
                        help="tune the AlexNet / VGG-16 classifier blocks instead (dense; their inference kernels are "
                             "the same for every ADNTN variant, which is checked with the ttn-2k block)")
    parser.add_argument("--no-prepack", dest="prepack", action="store_false",
                        help="tune and compile TVM's generic matmuls instead of the packed dense kernels (how the "
                             "README's auto-tuning tables were measured)")
    args = parser.parse_args()
    args.records = args.records or default_records_folder(args.target)
    if args.blocks:
        return tune_blocks(args)
    import torch
    from torch import nn

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.compiler.tuning import tune_model
    from adntn_deploy.nn import ADNTNLinear
    from adntn_deploy.onnx_export import export_onnx

    torch.manual_seed(0)
    models = {
        "mlp-dense": nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)),
        "mlp-ttn": nn.Sequential(ADNTNLinear(784, 1024, family="ttn"), nn.ReLU(), ADNTNLinear(1024, 1024, family="ttn"),
                                 nn.ReLU(), nn.Linear(1024, 10)),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            for batch in (1, 32):
                onnx_path = Path(tmp) / f"{name}-b{batch}.onnx"
                export_onnx(model.eval(), [torch.randn(batch, 784)], onnx_path, input_names=["input"])
                x = {"input": np.random.default_rng(0).standard_normal((batch, 784)).astype(np.float32)}
                # compile untuned: hide the shipped schedules/ so nothing is applied by default
                os.environ["ADNTN_SCHEDULES_DIR"] = str(Path(tmp) / "no-schedules")
                untuned = compile_model(onnx_path, args.target, Path(tmp) / f"{name}-b{batch}-untuned", prepack=args.prepack)
                os.environ.pop("ADNTN_SCHEDULES_DIR")
                start = time.perf_counter()
                report = tune_model(onnx_path, args.target, args.records, trials=args.trials, trials_per_task=64,
                                    prepack=args.prepack)
                tune_s = time.perf_counter() - start
                tuned = compile_model(onnx_path, args.target, Path(tmp) / f"{name}-b{batch}-tuned", tuning_records=args.records,
                                      prepack=args.prepack)
                med = interleaved_medians({"ort": onnx_path, "untuned": untuned.path, "tuned": tuned.path}, x,
                                          calls={"ort": 50, "untuned": 10, "tuned": 50})
                row = {"model": name, "batch": batch, "ort_ms": med["ort"], "tvm_untuned_ms": med["untuned"],
                       "tvm_tuned_ms": med["tuned"], "tuned_over_ort": med["tuned"] / med["ort"],
                       "tasks": report.tasks, "trials": report.trials, "tuning_seconds": tune_s,
                       "scheduled_kernels": tuned.manifest["tuning"]["scheduled_kernels"],
                       "kernels": tuned.manifest["tuning"]["kernels"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = ("| model | batch | ORT ms | TVM untuned ms | TVM tuned ms | tuned/ORT | tuned kernels | trials | tuning s |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    table += "\n".join(f"| {r['model']} | {r['batch']} | {r['ort_ms']:.3f} | {r['tvm_untuned_ms']:.3f} | {r['tvm_tuned_ms']:.3f} | "
                       f"{r['tuned_over_ort']:.2f} | {r['scheduled_kernels']}/{r['kernels']} | {r['trials']} | {r['tuning_seconds']:.0f} |"
                       for r in rows)
    print(table)
    meta = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
            "trials_per_model": args.trials, "records": str(args.records), "target": args.target}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "tuning" if args.target == "host" else f"tuning_{args.target}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text(f"# Auto-tuning for the {args.target} profile on this machine\n\n{json.dumps(meta)}\n\n{table}\n")


def tune_blocks(args) -> None:
    """Tune the dense classifier blocks at batch 1 and 32; compare ORT, tuned TVM dense and tuned TVM ttn-2k."""
    import torch
    from onnx_runtime import build_block

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.compiler.tuning import tune_model
    from adntn_deploy.onnx_export import export_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in ("alexnet", "vgg16"):
            for batch in (1, 32):
                paths = {}
                for variant in ("dense", "ttn-2k"):
                    model = build_block(net, variant)
                    width = model[0].in_features
                    paths[variant] = Path(tmp) / f"{net}-{variant}-b{batch}.onnx"
                    export_onnx(model, [torch.randn(batch, width)], paths[variant], input_names=["input"])
                    del model
                start = time.perf_counter()
                report = tune_model(paths["dense"], args.target, args.records, trials=args.trials, prepack=args.prepack)
                tune_s = time.perf_counter() - start
                x = {"input": np.random.default_rng(0).standard_normal((batch, width)).astype(np.float32)}
                tuned = {}
                for variant, path in paths.items():
                    artifact = compile_model(path, args.target, Path(tmp) / f"{net}-{variant}-b{batch}", tuning_records=args.records,
                                             prepack=args.prepack)
                    tuned[variant] = artifact
                # the ttn-2k block has other weights than the dense one: its outputs are not compared
                med = interleaved_medians({"ort": paths["dense"], "dense": tuned["dense"].path}, x, calls=20)
                med.update(interleaved_medians({"ttn-2k": tuned["ttn-2k"].path}, x, calls=20, reference="ttn-2k"))
                row = {"model": f"{net} block", "batch": batch, "ort_ms": med["ort"], "tvm_tuned_dense_ms": med["dense"],
                       "tvm_tuned_ttn2k_ms": med["ttn-2k"], "tuned_over_ort": med["dense"] / med["ort"],
                       "ttn2k_main_kernels_tuned": tuned["ttn-2k"].manifest["tuning"]["scheduled_kernels"],
                       "ttn2k_kernels": tuned["ttn-2k"].manifest["tuning"]["kernels"], "tasks": report.tasks, "trials": report.trials,
                       "tuning_seconds": tune_s}
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = ("| block | batch | ORT ms | TVM tuned dense ms | TVM tuned ttn-2k ms | tuned/ORT | ttn-2k kernels tuned | trials | tuning s |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    table += "\n".join(f"| {r['model']} | {r['batch']} | {r['ort_ms']:.2f} | {r['tvm_tuned_dense_ms']:.2f} | "
                       f"{r['tvm_tuned_ttn2k_ms']:.2f} | {r['tuned_over_ort']:.2f} | {r['ttn2k_main_kernels_tuned']}/"
                       f"{r['ttn2k_kernels']} | {r['trials']} | {r['tuning_seconds']:.0f} |" for r in rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
            "trials_per_block": args.trials, "records": str(args.records)}
    stem = "tuning_blocks" if args.target == "host" else f"tuning_blocks_{args.target}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text(f"# Auto-tuning the classifier blocks ({args.target} profile)\n\n{json.dumps(meta)}\n\n{table}\n")


if __name__ == "__main__":
    main()
