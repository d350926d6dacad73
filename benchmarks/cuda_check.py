"""Run a CUDA artifact on this machine's GPU and compare it with the CPU build (needs an NVIDIA GPU).

python benchmarks/cuda_check.py [--family ttn] [--batch 8]
Exports a small ADNTN model (conv + linear layers), compiles it for the host CPU and for the GPU's CUDA
arch (sm_XY read from the device), runs both with the TVM runtime, prints the max relative difference
and both latencies, and writes benchmarks/results/cuda_check.json. Exits 1 when the outputs differ by
more than 1e-5 relative, 2 when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="ttn", choices=["ttn", "attn", "mera"])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    import torch
    import tvm
    from torch import nn

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear
    from adntn_deploy.onnx_export import export_onnx
    from adntn_deploy.runtime import load

    gpu = tvm.cuda(0)
    if not gpu.exist:
        print("no CUDA device visible to TVM: run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    arch = "sm_" + str(gpu.compute_version).replace(".", "")
    torch.manual_seed(0)
    model = nn.Sequential(
        ADNTNConv2d(3, 16, 3, padding=1, family=args.family), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        ADNTNLinear(16 * 16 * 16, 256, family=args.family), nn.ReLU(), ADNTNLinear(256, 10, family=args.family),
    ).eval()
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "m.onnx"
        export_onnx(model, [torch.from_numpy(x)], onnx_path, input_names=["input"])
        cuda_target = json.dumps({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
        results = {}
        for name, target in (("cpu", "host"), ("cuda", cuda_target)):
            artifact = compile_model(onnx_path, target, Path(tmp) / name)
            predictor = load(artifact.path)
            out = predictor.run({"input": x})
            start = time.perf_counter()
            for _ in range(20):
                predictor.run({"input": x})
            results[name] = (next(iter(out.values())), (time.perf_counter() - start) / 20 * 1e3)
    diff = float(np.abs(results["cuda"][0] - results["cpu"][0]).max() / np.abs(results["cpu"][0]).max())
    report = {"gpu_arch": arch, "family": args.family, "batch": args.batch, "max_relative_difference": diff,
              "cpu_ms": results["cpu"][1], "cuda_ms": results["cuda"][1], "untuned": True}
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cuda_check.json").write_text(json.dumps(report, indent=2))
    return 0 if diff < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
