"""Describe generators for people and scripts: one row per generated layer (used by ``inspect``/``presets``).

:func:`preset_rows` and :func:`inspect_targets` are the two commands' library calls; :func:`describe` makes
one row and :func:`table_rows` formats rows for :func:`adntn_deploy.reporting.render_table`.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Callable, Iterable

from adntn_deploy.errors import GeneratorError
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


def preset_rows(model: str | None = None) -> list[dict[str, Any]]:
    """One :func:`describe` row per paper-scale preset (exact parameter counts and ratios), or only ``model``'s
    ("alexnet", "vgg16"; None: all). Builds structures only: no weights are generated.

    Raises:
        GeneratorError: a preset whose structure cannot be built (a bug in the preset table).
    """
    from adntn_deploy.generators import build_structure
    from adntn_deploy.presets import PRESETS

    rows = []
    for name, preset in PRESETS.items():
        if model and preset.model != model:
            continue
        ir, _ = build_structure(preset.spec, preset.weight_shape)
        rows.append(describe(name, ir))
    return rows


def inspect_targets(targets: Iterable[str], notes: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per generated layer of each target: an existing file (a checkpoint, or an ``.onnx`` file, whose
    rows carry ``source`` and ``op``) or a preset name / glob pattern such as ``"vgg16-*"``.

    A file without generated layers adds no row; ``notes`` gets one line saying so.

    Raises:
        GeneratorError: a target that is neither a file nor matches a preset.
        CheckpointError / OnnxModelError (an ExportError): an unreadable or corrupt file.
        LimitError: an ONNX file declaring sizes above the memory limit (:mod:`adntn_deploy.limits`).
    """
    from adntn_deploy.generators import build_structure
    from adntn_deploy.presets import PRESETS

    say = notes or (lambda line: None)
    rows: list[dict[str, Any]] = []
    for target in targets:
        path = Path(target)
        if path.exists():
            found = _inspect_onnx(path) if path.suffix.lower() == ".onnx" else _inspect_checkpoint(path)
            if not found:
                say(f"{path}: no generated layers")
            rows.extend(found)
            continue
        names = [n for n in PRESETS if fnmatch.fnmatchcase(n, target)]
        if not names:
            raise GeneratorError(
                f"{target!r} is neither a file nor a preset: give a checkpoint path or a name from 'adntn-deploy presets'"
            )
        for name in names:
            ir, _ = build_structure(PRESETS[name].spec, PRESETS[name].weight_shape)
            rows.append(describe(name, ir))
    return rows


def _inspect_checkpoint(path: Path) -> list[dict[str, Any]]:
    from adntn_deploy.checkpoint import read_checkpoint

    info = read_checkpoint(path)
    return [dict(describe(name, ir), source=str(path)) for name, ir in info.generators.items()]


def _inspect_onnx(path: Path) -> list[dict[str, Any]]:
    from adntn_deploy.onnx_export.reader import find_generators, generator_summary, load_onnx

    model = load_onnx(path)
    generators = find_generators(model)
    if generators:
        return [dict(describe(g.layer, g.ir), source=str(path), op=f"ai.adntn::{g.op_type}") for g in generators]
    summary = generator_summary(model)  # the standard-ops form keeps only the summary
    return [
        {"name": s.get("layer"), "family": s.get("family"), "layout": "-", "weight_shape": [], "out_modes": [],
         "in_modes": [], "bond_dim": None, "params": s.get("params"), "dense_params": s.get("dense_params"),
         "ratio": s.get("ratio"), "flops": 0, "peak_bytes": 0, "source": str(path), "op": "inlined (standard ops)"}
        for s in summary.values()
    ]
