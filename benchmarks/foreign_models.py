"""Models we did not write, on the TVM path against ONNX Runtime: onnx's "light" model zoo copies.

python benchmarks/foreign_models.py [--target host] [--models resnet50,shufflenet,...] [--rounds 3]

A user brings an ONNX file, not a zoo model of ours. The onnx package ships small copies of nine
classic ImageNet models (``onnx/backend/test/data/light/light_*.onnx``: AlexNet, DenseNet-121,
Inception v1 and v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512; full-size graphs whose weights
are ``ConstantOfShape`` fills, so nothing is downloaded). For each, in one run: ONNX Runtime on the file,
and ``compile --target T`` (no tuning records match these models: every convolution runs on its untuned
default schedule, the rest on the generic one). Each runtime is timed in a fresh process
(benchmarks/isolated.py) at batch 1; latencies are medians over interleaved rounds, and every output is
checked against ONNX Runtime's (constant weights make these outputs near-uniform, so the check catches
a broken graph, not a rounding error: tests/test_conv.py and tests/test_generic_schedule.py check the
kernels on random weights). Goal (issue 18, as for the zoo): TVM / ORT <= 1.25. Results:
benchmarks/results/foreign_models.{json,md}.
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

MODELS = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
          "vgg19", "zfnet512")
GOAL = 1.25


def light_model(name: str) -> Path:
    """The path of onnx's ``light_<name>.onnx``.

    Raises:
        FileNotFoundError: the installed onnx package does not ship it (names: :data:`MODELS`).
    """
    import onnx

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: this onnx package does not ship it (pip install 'onnx>=1.15')")
    return path


def random_feeds(path: Path) -> dict[str, np.ndarray]:
    """Standard-normal inputs for the graph inputs of ``path`` (not its initializers), as ``adntn-deploy run``
    makes them (:func:`adntn_deploy.runtime.load_feeds`)."""
    from adntn_deploy.runtime import load, load_feeds

    return load_feeds(load(path))


def measure_one(name: str, target: str, folder: Path, rounds: int) -> dict:
    """One row: ORT and TVM (untuned) latency of ``name`` at batch 1 on ``target``, and the compile's counts."""
    from adntn_deploy.compiler.build import compile_model
    from isolated import interleaved_medians

    path = light_model(name)
    started = time.perf_counter()
    artifact = compile_model(path, target, folder / f"{name}-{target}")
    compile_s = time.perf_counter() - started
    tuning = artifact.manifest["tuning"]
    med = interleaved_medians({"ort": path, "tvm": artifact.path}, random_feeds(path), calls=20, rounds=rounds)
    return {"target": target, "model": name, "ort_ms": med["ort"], "tvm_ms": med["tvm"],
            "tvm_over_ort": med["tvm"] / med["ort"], "compile_s": compile_s,
            "packed_conv2d": tuning["packed_conv2d"], "packed_dense": tuning["packed_dense"],
            "generic_kernels": tuning["default_schedules"].get("generic_cpu", 0), "kernels": tuning["kernels"]}


def write(rows: list[dict], meta: dict, stem: str) -> str:
    """Write benchmarks/results/STEM.{json,md}; returns the markdown."""
    head = ("| target | model | ORT ms | TVM ms | TVM/ORT | compile s | packed conv | packed dense | generic kernels |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "\n".join(
        f"| {r['target']} | {r['model']} | {r['ort_ms']:.2f} | {r['tvm_ms']:.2f} | {r['tvm_over_ort']:.2f} | "
        f"{r['compile_s']:.0f} | {r['packed_conv2d']} | {r['packed_dense']} | {r['generic_kernels']} |" for r in rows)
    worst = max(rows, key=lambda r: r["tvm_over_ort"])
    within = sum(r["tvm_over_ort"] <= GOAL for r in rows)
    verdict = (f"{within} of {len(rows)} models within {GOAL}x ONNX Runtime's latency; worst {worst['model']} "
               f"{worst['tvm_over_ort']:.2f}x.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    markdown = (f"# Foreign models (onnx's light model zoo, batch 1): TVM untuned vs ONNX Runtime\n\n"
                f"{json.dumps(meta)}\n\n{head}{body}\n\n{verdict}\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="host")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="foreign_models", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    from tqdm import tqdm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(args.models.split(","), desc="models", unit="model"):
            row = measure_one(name, args.target, Path(tmp), args.rounds)
            rows.append(row)
            tqdm.write(json.dumps(row))
    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target

    meta = {"machine": platform.platform(), "cpus": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
            "rounds": args.rounds, "target": str(tvm_target(resolve_target(args.target)).attrs.get("mcpu", ""))}
    print(write(rows, meta, args.output))


if __name__ == "__main__":
    main()
