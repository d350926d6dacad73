"""Describe generators for people and scripts: one row per generated layer (used by ``inspect``/``presets``)."""

from __future__ import annotations

from typing import Any

from adntn_deploy.ir.program import GeneratorIR


def describe(name: str, ir: GeneratorIR) -> dict[str, Any]:
    """A JSON-ready summary of one generator: family, tensorisation, bonds, params, ratio and costs.

    ``flops`` and ``peak_bytes`` are the cost of generating the weight once (float32).
    """
    report = ir.report()
    spec = dict(ir.metadata.get("spec", {}))
    top = next((c for c in ir.cores if c.role == "top"), None)
    return {
        "name": name,
        "family": ir.family,
        "layout": spec.get("layout", "split"),
        "weight_shape": list(ir.weight_shape),
        "out_modes": list(ir.metadata.get("out_modes", [])),
        "in_modes": list(ir.metadata.get("in_modes", [])),
        "bond_dim": spec.get("bond_dim"),
        "join_bonds": list(top.shape) if top else None,
        "cores": len(ir.cores),
        "params": report.params,
        "dense_params": report.dense_params,
        "ratio": report.compression_ratio,
        "flops": report.generation_flops,
        "peak_bytes": report.peak_intermediate_bytes,
        "dense_bytes": report.dense_weight_bytes,
        "steps": report.steps,
    }


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Headers and formatted rows for :func:`adntn_deploy.reporting.render_table`."""
    from adntn_deploy.reporting import human_bytes, human_count

    headers = ["layer", "family", "layout", "shape", "modes (out | in)", "bond", "params", "dense", "ratio", "gen FLOPs", "peak"]
    out = []
    for r in rows:
        out.append([
            r["name"],
            r["family"],
            r["layout"],
            "x".join(map(str, r["weight_shape"])),
            f"{'.'.join(map(str, r['out_modes']))} | {'.'.join(map(str, r['in_modes']))}",
            r["bond_dim"],
            f"{r['params']:,}",
            human_count(r["dense_params"]),
            f"{r['ratio']:,.0f}x",
            human_count(r["flops"]),
            human_bytes(r["peak_bytes"]),
        ])
    return headers, out
