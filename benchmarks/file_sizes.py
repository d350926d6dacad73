"""Benchmark the ONNX file sizes of ADNTN classifier blocks against the dense block's file.

python benchmarks/file_sizes.py [--nets vgg16,alexnet]

For each block (fc6 -> ReLU -> fc7 -> ReLU -> fc8, as benchmarks/onnx_runtime.py builds it) and each family
at the 2k tier, in both layouts, the exported file (``export``) and the streamed one (``export --stream``,
operator layout only where every layer streams): its bytes, dense file / ADNTN file, the ceiling that ratio
has when the file held nothing but the float32 parameters (cores and the dense biases), and what the rest of
the file takes (programs, function bodies, graph) as a share of the parameter bytes.
Results: benchmarks/results/file_sizes.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_runtime import build_block  # noqa: E402  (the same blocks the ONNX Runtime benchmark measures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="vgg16,alexnet")
    args = parser.parse_args()
    import torch

    from adntn_deploy.onnx_export import export_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            dense_model = build_block(net, "dense")
            width = dense_model[0].in_features
            dense_path = Path(tmp) / f"{net}-dense.onnx"
            export_onnx(dense_model, [torch.randn(2, width)], dense_path, input_names=["x"], dynamic_batch=True)
            dense_bytes = dense_path.stat().st_size
            dense_path.unlink()
            del dense_model
            for layout in ("split", "operator"):
                for family in ("ttn", "attn", "mera"):
                    model = build_block(net, f"{family}-2k", layout)
                    params = sum(p.numel() for p in model.parameters())
                    for stream in ((False, True) if layout == "operator" else (False,)):
                        path = Path(tmp) / f"{net}-{family}-{layout}-{stream}.onnx"
                        export_onnx(model, [torch.randn(2, width)], path, input_names=["x"], dynamic_batch=True,
                                    stream=stream)
                        size = path.stat().st_size
                        row = {"net": net, "family": family, "layout": layout, "stream": stream, "params": params,
                               "bytes": size, "ratio": dense_bytes / size, "ceiling": dense_bytes / (4 * params),
                               "overhead": size / (4 * params) - 1, "dense_bytes": dense_bytes}
                        rows.append(row)
                        print(f"{net} {family}-{layout}{' stream' if stream else ''}: {size:,} bytes, "
                              f"{row['ratio']:,.0f}x (ceiling {row['ceiling']:,.0f}x)", flush=True)
    meta = {"machine": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "file_sizes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "file_sizes.md").write_text(report(meta, rows))
    print(report(meta, rows))


def report(meta: dict, rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = ["# ONNX file sizes: classifier blocks at the 2k tier", "", json.dumps(meta), "",
             "| block | family | layout | form | params | file bytes | dense file / file | ceiling (params only) | "
             "rest of the file / params |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['net']} | {r['family']} | {r['layout']} | {'stream' if r['stream'] else 'generators'} | "
                     f"{r['params']:,} | {r['bytes']:,} | {r['ratio']:,.0f}x | {r['ceiling']:,.0f}x | "
                     f"{100 * r['overhead']:.0f}% |")
    lines += ["", "params: cores plus the dense biases (float32). ceiling: dense file / (4 x params), what the",
              "ratio would be if the file held nothing but those parameters. stream: export --stream (the halves'",
              "generator subprograms as standard ops instead of ai.adntn nodes and function bodies)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
