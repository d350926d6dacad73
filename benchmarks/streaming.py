"""Benchmark streamed weights: peak RSS and latency of stream vs load vs the dense layer under ONNX Runtime.

python benchmarks/streaming.py [--layers fc6,fc7] [--batches 1,8] [--calls 20] [--records schedules/x86-64-avx512]

Layers: the VGG-16 classifier shapes 4096x25088 (fc6) and 4096x4096 (fc7) with their TTN >= 2,000x presets
(``vgg16-fc6-ttn-2k``, ``vgg16-fc7-ttn-2k``), once with the preset's identity top activation (streams as
two thin matmuls, ``x R`` then ``(.) L^T``) and once with ``top_activation=tanh`` (streams through the
fused tile kernel, which regenerates every weight element on every call). Every configuration runs in a
fresh process: peak RSS growth over the process after its imports (VmHWM, so load-time generation
counts) and the median latency of --calls calls. TVM artifacts are compiled for the host profile at each
batch (static shapes) with the tuning records that apply. "Arithmetic limit" is this machine's float32
GEMM rate measured with numpy (2048^3) in the same run. Results: benchmarks/results/streaming.{json,md}.
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
CACHE = REPO / ".cache" / "benchmarks" / "streaming"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolated import measure  # noqa: E402  (one fresh process per configuration)


def _output_file(path: Path, batch: int) -> Path:
    """Where the worker for ``path`` (an .onnx file or an artifact folder) saves its outputs."""
    return path.parent / f"{path.name}.b{batch}.out.npz"


def _measure(kind: str, path: Path, batch: int, in_dim: int, calls: int) -> dict:
    """Latency and peak memory of one configuration, in a fresh process (benchmarks/isolated.py)."""
    x = np.random.default_rng(0).standard_normal((batch, in_dim)).astype(np.float32)
    return measure(path, {"x": x}, calls, backend="ort" if kind == "ort" else None, outputs=_output_file(path, batch))


def _first_output(path: Path) -> np.ndarray:
    with np.load(path) as stored:
        return stored[stored.files[0]]


def gemm_gflops() -> float:
    """The machine's float32 GEMM rate with numpy (best of 3, 2048^3), in GFLOP/s."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t0) / 1e9)
    return best


def build_models(layer: str, top: str) -> tuple[Path, Path, dict]:
    """ONNX files of the generated layer and of its dense twin (cached), and the split's sizes."""
    import torch

    import adntn_deploy
    from adntn_deploy.ir.split import split_generator
    from adntn_deploy.nn import ADNTNLinear
    from adntn_deploy.presets import get_preset

    preset = get_preset(f"vgg16-{layer}-ttn-2k")
    out_dim, in_dim = preset.weight_shape
    folder = CACHE / f"{layer}-{top}"
    folder.mkdir(parents=True, exist_ok=True)
    generated, dense = folder / "generated.onnx", folder / "dense.onnx"
    options = {k: v for k, v in preset.spec.to_dict().items() if k not in ("family", "bond_dim", "activation")}
    options["top_activation"] = top
    torch.manual_seed(0)
    layer_module = ADNTNLinear(in_dim, out_dim, family=preset.spec.family, bond_dim=preset.spec.bond_dim,
                               activation=preset.spec.activation, **options)
    split = split_generator(layer_module.generator)
    info = {"preset": preset.name, "shape": [out_dim, in_dim], "rank": split.rank, "params": layer_module.generator.params,
            "factor_elements": split.factor_elements}
    if not generated.exists() or not dense.exists():
        example = (torch.randn(2, in_dim),)  # batch >= 2: torch specialises batch 1
        model = torch.nn.Sequential(layer_module)
        adntn_deploy.export_onnx(model, example, generated, input_names=["x"], output_names=["y"], dynamic_batch=True)
        adntn_deploy.export_onnx(torch.nn.Sequential(layer_module.to_dense()), example, dense, input_names=["x"], output_names=["y"],
                                 dynamic_batch=True)
    return generated, dense, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="fc6,fc7")
    parser.add_argument("--tops", default="identity,tanh")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--records", type=Path, default=None, help="Tuning records (default: schedules/<profile>).")
    args = parser.parse_args()

    from adntn_deploy.compiler.build import compile_model

    peak = gemm_gflops()
    rows = []
    for layer in args.layers.split(","):
        for top in args.tops.split(","):
            generated, dense, info = build_models(layer, top)
            out_dim, in_dim = info["shape"]
            for batch in (int(b) for b in args.batches.split(",")):
                row = {"layer": layer, "top": top, "batch": batch, **info}
                ort = _measure("ort", dense, batch, in_dim, args.calls)
                row["ort_dense"] = ort
                modes = ("stream", "load") if top == "identity" else ("stream",)
                for mode in modes:
                    folder = CACHE / f"{layer}-{top}" / f"{mode}-b{batch}"
                    artifact = compile_model(generated, "host", folder, weights=mode, input_shapes={"x": (batch, in_dim)},
                                             tuning_records=args.records)
                    row[mode] = _measure("tvm", folder, batch, in_dim, args.calls)
                    row[mode]["tuning"] = artifact.manifest["tuning"]
                    if mode == "stream":
                        row["kernel"] = artifact.manifest["streamed"][0]["kernel"]
                    ref = _first_output(_output_file(dense, batch))
                    got = _first_output(_output_file(folder, batch))
                    row[mode]["max_rel_diff_vs_ort"] = float(np.abs(got - ref).max() / np.abs(ref).max())
                rank = info["rank"]
                if row["kernel"] == "fused":
                    gen_flops = out_dim * in_dim * 2 * rank
                    product_flops = 2 * batch * out_dim * in_dim
                else:
                    gen_flops, product_flops = 0, 2 * batch * rank * (in_dim + out_dim)
                seconds = row["stream"]["latency_ms"] / 1e3
                row["flops"] = {"generation": gen_flops, "product": product_flops,
                                "gflops_per_s": (gen_flops + product_flops) / seconds / 1e9,
                                "fraction_of_gemm_peak": (gen_flops + product_flops) / seconds / 1e9 / peak}
                rows.append(row)
                print(_line(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "numpy_sgemm_gflops": peak, "calls": args.calls}
    (RESULTS / "streaming.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "streaming.md").write_text(report(meta, rows))
    print(report(meta, rows))


def _line(row: dict) -> str:
    return (f"{row['layer']} top={row['top']} b{row['batch']}: ORT dense {row['ort_dense']['latency_ms']:.2f} ms "
            f"{row['ort_dense']['peak_mb']:.0f} MB; stream ({row['kernel']}) {row['stream']['latency_ms']:.2f} ms "
            f"{row['stream']['peak_mb']:.1f} MB")


def report(meta: dict, rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = [
        "# Streamed weights: VGG-16 classifier layers, TTN 2,000x presets",
        "",
        json.dumps(meta),
        "",
        "| layer | top | kernel | batch | ORT dense ms | load ms | stream ms | stream / dense | ORT dense MB | load MB | "
        "stream MB | stream / ORT RSS | stream / weight | factors / weight | gen. GFLOP | product GFLOP | stream GFLOP/s | of GEMM peak | max rel diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        load = r.get("load")
        dense_ms, dense_mb = r["ort_dense"]["latency_ms"], r["ort_dense"]["peak_mb"]
        lines.append(
            f"| {r['layer']} {r['shape'][0]}x{r['shape'][1]} | {r['top']} | {r['kernel']} | {r['batch']} | {dense_ms:.2f} | "
            f"{load['latency_ms']:.2f} | " if load else
            f"| {r['layer']} {r['shape'][0]}x{r['shape'][1]} | {r['top']} | {r['kernel']} | {r['batch']} | {dense_ms:.2f} | - | "
        )
        lines[-1] += (
            f"{r['stream']['latency_ms']:.2f} | {r['stream']['latency_ms'] / dense_ms:.2f} | {dense_mb:.0f} | "
            f"{load['peak_mb']:.0f} | " if load else f"{r['stream']['latency_ms']:.2f} | {r['stream']['latency_ms'] / dense_ms:.2f} | {dense_mb:.0f} | - | "
        )
        lines[-1] += (
            f"{r['stream']['peak_mb']:.1f} | {100 * r['stream']['peak_mb'] / dense_mb:.1f}% | "
            f"{100 * r['stream']['peak_mb'] * 2**20 / (4 * r['shape'][0] * r['shape'][1]):.1f}% | "
            f"{100 * r['factor_elements'] / (r['shape'][0] * r['shape'][1]):.2f}% | {r['flops']['generation'] / 1e9:.2f} | "
            f"{r['flops']['product'] / 1e9:.3f} | {r['flops']['gflops_per_s']:.1f} | {100 * r['flops']['fraction_of_gemm_peak']:.0f}% | "
            f"{r['stream']['max_rel_diff_vs_ort']:.1e} |"
        )
    lines += [
        "",
        "MB: peak RSS growth of a fresh process over its state after importing onnxruntime and tvm (load-time",
        "generation included). stream / weight compares the streamed process's growth with the dense float32",
        "weight alone (64 MiB for fc7, 392 MiB for fc6): the stricter measure, since ORT's own peak holds the",
        "weight more than once while it loads the file. factors / weight: what the streamed layer itself keeps",
        "(L and R); the rest of the stream process's growth is the library and the VM. load is untuned here",
        "(no records for these shapes). GFLOP counts one call; the fused kernel regenerates",
        "every weight element per call (2 x rank FLOPs each, plus the activation, not counted).",
        "Targets (issue #8): stream RSS <= 5% of dense, stream latency <= 2x ORT dense at batch 1.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
