"""Benchmark: AlexNet and VGG-16 classifier blocks, dense vs ADNTN presets, under ONNX Runtime.

For each block (fc6 -> ReLU -> fc7 -> ReLU -> fc8) and variant (dense; TTN, aTTN, MERA at the 2k tier and
at their most compressed tier), measured side by side in one run:
  * ONNX file size and the ratio dense / ADNTN (whole files: both hold the dense biases), and the ratio of
    the dense weights' bytes to the bytes the generators take in the file (cores, nodes, functions);
  * ORT session creation time (includes folding the generators into dense weights);
  * peak RSS of a fresh process that creates the session and runs one batch-32 call;
  * per-call latency at batch 1 and 32, as the ratio ADNTN / dense (all sessions in one process,
    measured in interleaved rounds; the median of each variant's calls).
Results: benchmarks/results/onnx_runtime.json and .md. Usage: python benchmarks/onnx_runtime.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TIERS = {"2k": ("2k",), "max": ("50k", "35k", "10k")}


def build_block(net: str, variant: str, layout: str = "split"):
    """The classifier block: dense layers (variant "dense") or one family's presets ("ttn-2k", "mera-max")
    in ``layout`` (split or operator)."""
    import torch
    from torch import nn

    from adntn_deploy.nn import ADNTNLinear
    from adntn_deploy.presets import LAYERS, PRESETS

    torch.manual_seed(0)
    layers = []
    for k, (layer, (out_f, in_f)) in enumerate(LAYERS[net].items()):
        if variant == "dense":
            layers.append(nn.Linear(in_f, out_f))
        else:
            family, tier = variant.split("-")
            infix = "operator-" if layout == "operator" else ""
            name = next(f"{net}-{layer}-{family}-{infix}{t}" for t in TIERS[tier]
                        if f"{net}-{layer}-{family}-{infix}{t}" in PRESETS)
            spec = PRESETS[name].spec
            options = {k2: v for k2, v in spec.to_dict().items() if k2 not in ("family", "bond_dim", "activation")}
            layers.append(ADNTNLinear(in_f, out_f, family=spec.family, bond_dim=spec.bond_dim,
                                      activation=spec.activation, **options))
        if k < 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def weight_bytes(net: str) -> int:
    """float32 bytes of the block's dense weights (biases excluded)."""
    from adntn_deploy.presets import LAYERS

    return sum(4 * o * i for o, i in LAYERS[net].values())


def generator_bytes(path: Path) -> int:
    """Bytes the generators take in the file: core initializers, ai.adntn nodes and their functions."""
    import onnx

    model = onnx.load(str(path))
    cores = sum(len(i.SerializeToString()) for i in model.graph.initializer if ".adntn." in i.name)
    nodes = sum(len(n.SerializeToString()) for n in model.graph.node if n.domain == "ai.adntn")
    return cores + nodes + sum(len(f.SerializeToString()) for f in model.functions)


def measure_session(path: str) -> dict:
    """Run in a fresh process: session creation time and peak RSS (MiB) after a batch-32 call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    start = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - start
    name = session.get_inputs()[0].name
    width = session.get_inputs()[0].shape[1]
    session.run(None, {name: np.zeros((32, width), np.float32)})
    return {"session_seconds": created, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def latency(paths: dict[str, Path], batch: int, rounds: int, calls: int) -> dict[str, float]:
    """Median per-call latency (ms) of each model, measured in interleaved rounds in this process."""
    import onnxruntime as ort

    sessions = {}
    for variant, path in paths.items():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sessions[variant] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    samples: dict[str, list[float]] = {v: [] for v in sessions}
    x = None
    order = list(sessions.items())
    for r in range(rounds):
        for variant, session in (order if r % 2 == 0 else order[::-1]):  # alternate to cancel drift
            name = session.get_inputs()[0].name
            if x is None or x.shape != (batch, session.get_inputs()[0].shape[1]):
                x = np.random.default_rng(0).standard_normal((batch, session.get_inputs()[0].shape[1])).astype(np.float32)
            session.run(None, {name: x})  # warm
            for _ in range(calls):
                t0 = time.perf_counter()
                session.run(None, {name: x})
                samples[variant].append((time.perf_counter() - t0) * 1e3)
    return {v: statistics.median(s) for v, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="AlexNet only, fewer calls (a smoke run)")
    parser.add_argument("--measure-session", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_session:
        print(json.dumps(measure_session(args.measure_session)))
        return
    import torch

    from adntn_deploy.onnx_export import export_onnx

    nets = ["alexnet"] if args.quick else ["alexnet", "vgg16"]
    variants = ["dense"] + [f"{f}-{t}" for f in ("ttn", "attn", "mera") for t in TIERS]
    rounds, calls = (2, 5) if args.quick else (6, 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in nets:
            paths, info = {}, {}
            for variant in variants:
                model = build_block(net, variant)
                width = model[0].in_features
                params = sum(p.numel() for p in model.parameters())
                path = Path(tmp) / f"{net}-{variant}.onnx"
                start = time.perf_counter()
                export_onnx(model, [torch.randn(2, width)], path, input_names=["input"], dynamic_batch=True)
                export_s = time.perf_counter() - start
                del model
                gen_bytes = generator_bytes(path)
                proc = subprocess.run([sys.executable, __file__, "--measure-session", str(path)],
                                      capture_output=True, text=True, check=True)
                info[variant] = {"params": params, "bytes": path.stat().st_size, "export_seconds": export_s,
                                 "generator_bytes": gen_bytes,
                                 **json.loads(proc.stdout)}
                paths[variant] = path
                print(f"{net} {variant}: {info[variant]['bytes'] / 2**20:.2f} MiB, session "
                      f"{info[variant]['session_seconds']:.2f} s, peak RSS {info[variant]['peak_rss_mib']:.0f} MiB",
                      flush=True)
            lat = {b: latency(paths, b, rounds, calls) for b in (1, 32)}
            dense = info["dense"]
            for variant in variants:
                v = info[variant]
                rows.append({
                    "net": net, "variant": variant, "params": v["params"], "onnx_bytes": v["bytes"],
                    "size_ratio_dense_over": dense["bytes"] / v["bytes"],
                    "weight_bytes_ratio": (weight_bytes(net) / v["generator_bytes"]) if v["generator_bytes"] else 1.0,
                    "session_seconds": v["session_seconds"], "peak_rss_mib": v["peak_rss_mib"],
                    "latency_ms_b1": lat[1][variant], "latency_ms_b32": lat[32][variant],
                    "latency_ratio_b1": lat[1][variant] / lat[1]["dense"],
                    "latency_ratio_b32": lat[32][variant] / lat[32]["dense"],
                })
    header = ("| block | variant | params | ONNX size | dense/ADNTN file | dense weights/generator bytes | "
              "session s | peak RSS MiB | ms b1 | ratio b1 | ms b32 | ratio b32 |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['net']} | {r['variant']} | {r['params']:,} | {r['onnx_bytes'] / 2**20:.3f} MiB | "
        f"{r['size_ratio_dense_over']:,.0f}x | {r['weight_bytes_ratio']:,.0f}x | {r['session_seconds']:.2f} | {r['peak_rss_mib']:.0f} | "
        f"{r['latency_ms_b1']:.2f} | {r['latency_ratio_b1']:.3f} | {r['latency_ms_b32']:.2f} | {r['latency_ratio_b32']:.3f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": len(__import__("os").sched_getaffinity(0)),
            "rounds": rounds, "calls_per_round": calls, "date": time.strftime("%Y-%m-%d")}
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"onnx_runtime{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"onnx_runtime{suffix}.md").write_text(
        f"# ONNX Runtime: dense vs ADNTN classifier blocks\n\n{json.dumps(meta)}\n\n{table}\n")


if __name__ == "__main__":
    main()
