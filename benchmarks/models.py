"""Whole models on the TVM path against ONNX Runtime: untuned (no records at all) and with the shipped records.

python benchmarks/models.py [--targets host,x86-64-avx2] [--models vgg,alexnet,mlp,cnn32] [--batches 1,32] [--rounds 3]

For each target, model and batch, in one run: ONNX Runtime on the ONNX file; TVM ``compile --target T``
with the shipped schedules/ hidden (untuned: every kernel of ours on its default schedule, the rest
generic); and TVM with the records that ``compile`` applies by default (schedules/ for the target's
instruction set). Each runtime is timed in a fresh process (benchmarks/isolated.py); latencies are medians
over interleaved rounds, and every output is checked against ONNX Runtime's. Models: the zoo's vgg,
alexnet and mlp (28x28 grey inputs, random weights: speed does not depend on them) and ``cnn32``, a plain
CNN for 32x32 RGB inputs (three 5x5 convolutions, 16-32-64 channels, each followed by ReLU and 2x2
max-pooling, then a 1024 -> 10 classifier). Goals (docs/tvm.md#convolutions): untuned / ORT <= 1.25 and
records / ORT <= 0.9 on the host. Results: benchmarks/results/models.{json,md}.

Each row also gives its records/ORT ratio round by round (min-max of each round's own ratio, both runtimes
measured under the same machine conditions): on a shared 2-core VM one run's ratio moves by several
percent, and the median alone hides by how much. Each row also gives the model's weight-read floor (benchmarks/read_floor.py: the time this machine takes to
read the model's initializers once on all its cores, a bound no schedule can beat at batch 1) and
"above floor": (TVM records - floor) / (ORT - floor), the ratio of the two runtimes' time over that bound,
which is the part a schedule controls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

UNTUNED_GOAL, TUNED_GOAL = 1.25, 0.9


def build(name: str):
    """(torch model in eval mode, input shape without the batch)."""
    import torch
    from torch import nn

    from adntn_deploy.models.zoo import INPUT_SHAPE, build_model

    if name == "cnn32":
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for cin, cout in ((3, 16), (16, 32), (32, 64)):
            layers += [nn.Conv2d(cin, cout, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)]
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, 10)).eval(), (3, 32, 32)
    return build_model(name).eval(), INPUT_SHAPE


def weight_bytes(path: Path) -> int:
    """Bytes of the ONNX model's initializers: what every call reads at least once (from their shapes and
    types; the data is not decoded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(init.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
               for init in model.graph.initializer)


def measure_one(name: str, batch: int, target: str, folder: Path, rounds: int, floors: dict[int, float]) -> dict:
    """One row: ORT, TVM untuned and TVM with records for ``name`` at ``batch`` on ``target``."""
    import torch

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.onnx_export import export_onnx
    from isolated import interleaved_samples

    model, shape = build(name)
    path = folder / f"{name}-b{batch}.onnx"
    if not path.exists():
        export_onnx(model, [torch.randn(batch, *shape)], path, input_names=["input"])
    feeds = {"input": np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)}
    models, tuning = {"ort": path}, {}
    for variant in ("untuned", "records"):
        hidden = {"ADNTN_SCHEDULES_DIR": str(folder / "no-schedules")} if variant == "untuned" else {}
        os.environ.update(hidden)
        try:
            artifact = compile_model(path, target, folder / f"{name}-b{batch}-{target}-{variant}")
        finally:
            for key in hidden:
                os.environ.pop(key)
        models[variant] = artifact.path
        tuning[variant] = artifact.manifest["tuning"]
    calls = 100 if name == "mlp" or batch == 1 else 20
    samples = interleaved_samples(models, feeds, calls=calls, rounds=rounds)
    med = {variant: statistics.median(values) for variant, values in samples.items()}
    # each round's own ratio: the spread says how far one run's ratio can be from the median's
    by_round = {variant: [t / o for t, o in zip(samples[variant], samples["ort"])] for variant in ("untuned", "records")}
    records = tuning["records"]
    nbytes = weight_bytes(path)
    if nbytes not in floors:  # cached per size: the floor depends on nothing else
        import read_floor

        floors[nbytes] = read_floor.measure(nbytes)["floor_ms"]
    floor = floors[nbytes]
    return {"target": target, "model": name, "batch": batch, "ort_ms": med["ort"], "untuned_ms": med["untuned"],
            "records_ms": med["records"], "untuned_over_ort": med["untuned"] / med["ort"],
            "records_over_ort": med["records"] / med["ort"], "untuned_over_ort_by_round": by_round["untuned"],
            "records_over_ort_by_round": by_round["records"], "weights_mib": nbytes / 2**20, "floor_ms": floor,
            "above_floor": (med["records"] - floor) / (med["ort"] - floor) if med["ort"] > floor else None,
            "packed": f"{records['packed_dense']} dense + {records['packed_conv2d']} conv",
            "kernels_from_records": f"{records['scheduled_kernels']}/{records['kernels']}",
            "records_profile": records["records_profile"]}


def spread(ratios: list[float] | None) -> str:
    """``min-max`` of one row's per-round ratios (``-`` for a row measured before they were kept)."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"


def table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    head = ("| target | model | batch | ORT ms | TVM untuned ms | TVM records ms | untuned/ORT | records/ORT | "
            "records/ORT by round | weights MiB | read floor ms | above floor | packed layers | kernels from records |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n")
    return head + "\n".join(
        f"| {r['target']} | {r['model']} | {r['batch']} | {r['ort_ms']:.3f} | {r['untuned_ms']:.3f} | {r['records_ms']:.3f} | "
        f"{r['untuned_over_ort']:.2f} | {r['records_over_ort']:.2f} | {spread(r.get('records_over_ort_by_round'))} | "
        f"{r['weights_mib']:.1f} | {r['floor_ms']:.3f} | "
        f"{'-' if r['above_floor'] is None else format(r['above_floor'], '.2f')} | {r['packed']} | "
        f"{r['kernels_from_records']} |"
        for r in rows)


def verdicts(rows: list[dict]) -> list[str]:
    """One line per target: the worst ratios against the goals."""
    lines = []
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        untuned = max(r["untuned_over_ort"] for r in mine)
        records = max(r["records_over_ort"] for r in mine)
        lines.append(f"{target}: worst untuned/ORT {untuned:.2f} (goal <= {UNTUNED_GOAL}), "
                     f"worst records/ORT {records:.2f} (goal <= {TUNED_GOAL})")
        for r in mine:
            if r["floor_ms"] >= r["ort_ms"]:
                lines.append(f"  {r['model']} b{r['batch']}: the read floor measured above ORT's time: noise, rerun")
            elif r["records_over_ort"] > TUNED_GOAL and r["floor_ms"] >= 0.5 * r["ort_ms"]:  # bound by the weights
                lines.append(f"  {r['model']} b{r['batch']}: reading its {r['weights_mib']:.1f} MiB of weights takes "
                             f"{r['floor_ms'] / r['ort_ms']:.0%} of ORT's time; {TUNED_GOAL} x ORT leaves "
                             f"{TUNED_GOAL * r['ort_ms'] - r['floor_ms']:.3f} ms for the rest, where ORT spends "
                             f"{r['ort_ms'] - r['floor_ms']:.3f} and TVM {r['records_ms'] - r['floor_ms']:.3f}")
    return lines


AVX2_NOTE = ("Rows of x86-64-avx2 run AVX2 code (8 float32 lanes) on this AVX-512 machine, where ONNX Runtime's "
             "MLAS dispatches to its AVX-512 kernels (16 lanes): they show the AVX2 kernels' correctness and "
             "relative cost, not a like-for-like ratio; on an AVX2-only CPU both sides run AVX2.")
AVX2_HOST_NOTE = ("This CPU has AVX2 and no AVX-512: `host` and `x86-64-avx2` both run AVX2 code with the same "
                  "records (only -mcpu differs), so the two targets' rows differ by this machine's noise.")


def _host_lanes() -> int:
    """float32 lanes of this machine's vector registers (16 with AVX-512)."""
    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target, vector_shape

    return vector_shape(tvm_target(resolve_target("host")))[0]


def write(rows: list[dict], meta: dict, stem: str) -> str:
    """Write benchmarks/results/STEM.{json,md}; returns the markdown."""
    text = table(rows)
    notes = "\n".join(verdicts(rows))
    if any(r["target"] == "x86-64-avx2" for r in rows):
        notes += "\n\n" + (AVX2_NOTE if _host_lanes() == 16 else AVX2_HOST_NOTE)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    markdown = ("# Whole models: TVM untuned and with shipped records vs ONNX Runtime\n\n"
                f"{json.dumps(meta)}\n\n{text}\n\n{notes}\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="host,x86-64-avx2")
    parser.add_argument("--models", default="vgg,alexnet,mlp,cnn32")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="models", help="results file stem under benchmarks/results/")
    args = parser.parse_args()
    from tqdm import tqdm

    configs = [(t, m, int(b)) for t in args.targets.split(",") for m in args.models.split(",") for b in args.batches.split(",")]
    rows: list[dict] = []
    floors: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target, name, batch in tqdm(configs, desc="models", unit="config"):
            row = measure_one(name, batch, target, Path(tmp), args.rounds, floors)
            rows.append(row)
            tqdm.write(json.dumps(row))
    meta = {"machine": platform.platform(), "processor": platform.processor(), "cpus": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds}
    print(write(rows, meta, args.output))


if __name__ == "__main__":
    main()
