"""Benchmark Kronecker streaming: operator-layout layers run from their two halves vs the dense layer.

python benchmarks/kronecker.py [--presets vgg16-fc6-ttn-operator-2k,...] [--batches 1,8,32] [--calls 20]
                               [--records DIR]

The operator-layout companion of benchmarks/streaming.py (split layout). For each preset (default: VGG-16
fc6 and fc7, TTN, operator layout, tiers 2k and 50k) and batch, every configuration runs in a fresh process
(benchmarks/isolated.py): latency (median of --calls) and extra peak RSS (VmHWM growth over the process
after its imports, so load-time generation counts) of

* ORT dense: the dense layer's ONNX file under ONNX Runtime (the reference);
* ORT stream: ``export --stream``'s file (standard ops, the halves constant-folded at session creation);
* TVM load: ``compile --weights load`` (the dense weight generated once at load);
* TVM stream: ``compile --weights stream`` (the halves generated at load, two matmuls per call), untuned
  and with --records when given.

Outputs are compared with torch (relative max difference). The cost model's streamed/dense FLOP ratio and
the halves' share of the dense weight are reported beside the times, as the physical limit of each form.
Results: benchmarks/results/kronecker.{json,md} (kronecker_tuned.{json,md} for a run with --records).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "benchmarks" / "kronecker"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolated import measure  # noqa: E402  (one fresh process per configuration)
from streaming import gemm_gflops  # noqa: E402

DEFAULT_PRESETS = ("vgg16-fc6-ttn-operator-2k,vgg16-fc6-ttn-operator-50k,"
                   "vgg16-fc7-ttn-operator-2k,vgg16-fc7-ttn-operator-50k")


def build_models(preset_name: str) -> dict:
    """ONNX files (generated, streamed, dense; cached) of one preset's layer, and its sizes."""
    import torch

    import adntn_deploy
    from adntn_deploy.ir.kron import kronecker_split
    from adntn_deploy.nn import ADNTNLinear
    from adntn_deploy.presets import get_preset

    preset = get_preset(preset_name)
    out_dim, in_dim = preset.weight_shape
    folder = CACHE / preset_name
    folder.mkdir(parents=True, exist_ok=True)
    files = {kind: folder / f"{kind}.onnx" for kind in ("generated", "streamed", "dense")}
    options = {k: v for k, v in preset.spec.to_dict().items() if k not in ("family", "bond_dim", "activation")}
    torch.manual_seed(0)
    layer = ADNTNLinear(in_dim, out_dim, family=preset.spec.family, bond_dim=preset.spec.bond_dim,
                        activation=preset.spec.activation, **options).eval()
    kron = kronecker_split(layer.generator)
    if not all(f.exists() for f in files.values()):
        example = (torch.randn(2, in_dim),)  # batch >= 2: torch specialises batch 1
        model = torch.nn.Sequential(layer)
        common = dict(input_names=["x"], output_names=["y"], dynamic_batch=True)
        adntn_deploy.export_onnx(model, example, files["generated"], **common)
        adntn_deploy.export_onnx(model, example, files["streamed"], stream=True, **common)
        adntn_deploy.export_onnx(torch.nn.Sequential(layer.to_dense()), example, files["dense"], **common)
    x = np.random.default_rng(0).standard_normal((32, in_dim)).astype(np.float32)
    with torch.no_grad():
        expected = layer(torch.from_numpy(x)).numpy()
    np.save(folder / "expected.npy", expected)
    return {
        "preset": preset_name, "shape": [out_dim, in_dim], "rank": kron.rank, "params": layer.generator.params,
        "halves": [[kron.out_left, kron.in_left], [kron.out_right, kron.in_right]],
        "factor_fraction": kron.factor_elements / kron.dense_elements,
        "flop_ratio": kron.matmul_flops(1) / (2 * kron.dense_elements), "files": files, "folder": folder,
    }


def baseline_model(folder: Path, in_dim: int) -> Path:
    """A trivial model with the same input (``y = 2 x``): what a runtime's session costs without any weight."""
    import onnx
    from onnx import TensorProto, helper

    path = folder / "baseline.onnx"
    if not path.exists():
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "two"], ["y"])], "baseline",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", in_dim])],
            [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _run(path: Path, backend: str | None, batch: int, in_dim: int, calls: int, expected: np.ndarray) -> dict:
    x = np.random.default_rng(0).standard_normal((32, in_dim)).astype(np.float32)[:batch]
    out = path.parent / f"{path.name}.b{batch}.out.npz"
    result = measure(path, {"x": x}, calls, backend=backend, outputs=out)
    with np.load(out) as stored:
        got = stored[stored.files[0]]
    ref = expected[:batch]
    if got.shape == ref.shape:
        result["max_rel_diff_vs_torch"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--records", type=Path, default=None, help="Tuning records for a 'TVM stream tuned' column.")
    args = parser.parse_args()

    from adntn_deploy.compiler.build import compile_model

    peak = gemm_gflops()
    rows = []
    for name in args.presets.split(","):
        info = build_models(name)
        files, folder = info.pop("files"), info.pop("folder")
        expected = np.load(folder / "expected.npy")
        in_dim = info["shape"][1]
        for batch in (int(b) for b in args.batches.split(",")):
            row = {**info, "batch": batch}
            baseline = baseline_model(folder, in_dim)
            row["ort_baseline"] = _run(baseline, "ort", batch, in_dim, args.calls, expected)
            target = folder / f"tvm_baseline-b{batch}"
            compile_model(baseline, "host", target, input_shapes={"x": (batch, in_dim)})
            row["tvm_baseline"] = _run(target, None, batch, in_dim, args.calls, expected)
            row["ort_dense"] = _run(files["dense"], "ort", batch, in_dim, args.calls, expected)
            row["ort_stream"] = _run(files["streamed"], "ort", batch, in_dim, args.calls, expected)
            modes = [("tvm_load", "load", None), ("tvm_stream", "stream", None)]
            if args.records:
                modes.append(("tvm_stream_tuned", "stream", args.records))
            for key, weights, records in modes:
                target = folder / f"{key}-b{batch}"
                compile_model(files["generated"], "host", target, weights=weights, input_shapes={"x": (batch, in_dim)},
                              tuning_records=records)
                row[key] = _run(target, None, batch, in_dim, args.calls, expected)
            rows.append(row)
            print(_line(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "numpy_sgemm_gflops": round(peak, 1), "calls": args.calls,
            "records": str(args.records) if args.records else None}
    name = "kronecker_tuned" if args.records else "kronecker"  # a tuned run never overwrites the full table
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(report(meta, rows))
    print(report(meta, rows))


COLUMNS = (("ort_dense", "ORT dense"), ("ort_stream", "ORT stream"), ("tvm_load", "TVM load"),
           ("tvm_stream", "TVM stream"), ("tvm_stream_tuned", "TVM stream tuned"))


def _line(row: dict) -> str:
    parts = [f"{label} {row[key]['latency_ms']:.2f} ms" for key, label in COLUMNS if key in row]
    return f"{row['preset']} b{row['batch']}: " + ", ".join(parts)


def report(meta: dict, rows: list[dict]) -> str:
    """The results as markdown: latency ratios and extra peak RSS against ORT dense, measured in one run."""
    present = [(k, label) for k, label in COLUMNS if any(k in r for r in rows)]
    head = ["preset", "halves (O x I)", "rank", "batch", "ORT dense ms"]
    head += [f"{label} / ORT dense" for k, label in present if k != "ort_dense"]
    head += ["dense weight MiB"] + [f"{label} extra RSS" for k, label in present if k != "ort_dense"]
    head += ["ORT dense extra RSS", "FLOPs / dense", "halves / weight", "max rel diff"]

    def extra(r: dict, key: str) -> float:  # peak RSS growth beyond the same runtime's trivial session
        base = r.get("ort_baseline" if key.startswith("ort") else "tvm_baseline", {}).get("peak_mb", 0.0)
        return max(r[key]["peak_mb"] - base, 0.0)

    lines = ["# Kronecker streaming: VGG-16 classifier layers, operator-layout TTN presets", "", json.dumps(meta), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
    for r in rows:
        dense_ms = r["ort_dense"]["latency_ms"]
        weight_mib = 4 * r["shape"][0] * r["shape"][1] / 2**20
        cells = [r["preset"], " + ".join(f"{o}x{i}" for o, i in r["halves"]), str(r["rank"]), str(r["batch"]),
                 f"{dense_ms:.2f}"]
        cells += [f"{r[k]['latency_ms'] / dense_ms:.2f}" if k in r else "-" for k, _ in present if k != "ort_dense"]
        cells += [f"{weight_mib:.0f}"]
        cells += [f"{extra(r, k):.2f} MiB ({100 * extra(r, k) / weight_mib:.2f}%)" if k in r else "-"
                  for k, _ in present if k != "ort_dense"]
        cells += [f"{extra(r, 'ort_dense'):.0f} MiB", f"{r['flop_ratio']:.3f}", f"{100 * r['factor_fraction']:.2f}%"]
        diffs = [r[k]["max_rel_diff_vs_torch"] for k, _ in present if k in r]
        cells += [f"{max(diffs):.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios: latency over ORT dense's in the same run (lower is faster). Extra RSS: peak RSS growth of the fresh",
        "process (after importing onnxruntime and tvm) beyond the growth of the same runtime running a trivial model",
        "with the same input (y = 2x: the session's own threads, arena and buffers), as MiB and as a share of the",
        "dense float32 weight. FLOPs / dense: the two-product form's multiply-adds over the dense GEMM's (the cost model of",
        "--weights auto). halves / weight: the elements the streamed layer keeps (both halves, all bond terms).",
        "Goals (issue #17): stream <= 0.5x ORT dense at batch 1 and <= 1.0x at batch 32; extra RSS <= 1% of the",
        "dense weight; outputs within 1e-5 relative of torch.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
