"""The main job on built-in defaults (``adntn-deploy demo``).

1. Compression table of the VGG-16 classifier presets (exact parameter counts, generation costs).
2. Generate the largest preset weight (VGG-16 fc6, 4096x25088) once with torch and time it.
3. Fit a TTN generator to a dense 1024x1024 matrix (a different TTN's weight plus 5% noise, so a good
   fit exists): hierarchical-SVD start, then Adam; report the relative error of both.
4. Save the fitted layer in a checkpoint, reload it, and check the weight is bit-identical.
5. Export it to ONNX (an ai.adntn node holding only the cores), run it with ONNX Runtime and compare
   with torch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np


def run_demo(fit_steps: int = 300, seed: int = 0, checkpoint: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the demo, print its tables unless ``quiet``, and return the results as a JSON-ready dict."""
    import torch
    from tqdm import tqdm

    from adntn_deploy.checkpoint import load_checkpoint, save_checkpoint
    from adntn_deploy.cli.tables import human_bytes, render_table
    from adntn_deploy.fit import fit
    from adntn_deploy.generators import GeneratorSpec, build_generator, build_structure
    from adntn_deploy.inspection import describe, table_rows
    from adntn_deploy.ir.executors import generate_torch
    from adntn_deploy.models import build_sequential
    from adntn_deploy.nn.generated import GeneratedWeight
    from adntn_deploy.presets import PRESETS

    say = (lambda *a: None) if quiet else click.echo
    results: dict[str, Any] = {}

    rows = []
    for name, preset in PRESETS.items():
        if preset.model == "vgg16":
            ir, _ = build_structure(preset.spec, preset.weight_shape)
            rows.append(describe(name, ir))
    results["presets"] = rows
    say("== VGG-16 classifier presets (one generator per layer) ==")
    say(render_table(*table_rows(rows)))

    preset = PRESETS["vgg16-fc6-ttn-50k"]
    gen = build_generator(preset.spec, preset.weight_shape)
    cores = {k: torch.from_numpy(v.astype(np.float32)) for k, v in gen.cores.items()}
    start = time.perf_counter()
    with torch.no_grad():
        weight = generate_torch(gen.ir, cores)
    seconds = time.perf_counter() - start
    results["generate_vgg16_fc6"] = {
        "preset": preset.name, "seconds": seconds, "params": gen.ir.params,
        "weight_bytes": weight.numel() * 4, "weight_std": float(weight.std()),
    }
    say(f"\n== Generate {preset.name}: {gen.ir.params:,} parameters -> a {tuple(weight.shape)} weight "
        f"({human_bytes(weight.numel() * 4)}) in {seconds:.2f} s ==")
    del weight

    spec = GeneratorSpec(family="ttn", bond_dim=6, max_mode=4, seed=seed)
    teacher = build_generator(spec.with_options(seed=seed + 1), (1024, 1024))
    with torch.no_grad():
        clean = generate_torch(teacher.ir, {k: torch.from_numpy(v) for k, v in teacher.cores.items()}).numpy()
    rng = np.random.default_rng(seed)
    target = (clean + 0.05 * clean.std() * rng.standard_normal(clean.shape)).astype(np.float32)
    student = build_generator(spec, (1024, 1024), target=target)  # hierarchical-SVD start, then Adam
    bar = tqdm(total=fit_steps, desc="fit ttn 1024x1024", disable=True if quiet else None, leave=False)

    def progress(step: int, err: float) -> None:
        bar.update(1)
        bar.set_postfix(rel_err=f"{err:.4f}")

    start = time.perf_counter()
    fitted = fit(student.ir, student.cores, target, steps=fit_steps, seed=seed, callback=progress)
    bar.close()
    results["fit"] = {
        "weight_shape": [1024, 1024], "params": student.ir.params, "ratio": student.ir.report().compression_ratio,
        "initial_relative_error": fitted.initial_relative_error, "relative_error": fitted.relative_error,
        "steps": fit_steps, "seconds": time.perf_counter() - start,
    }
    say(f"\n== Fit a TTN ({student.ir.params:,} parameters, {student.ir.report().compression_ratio:,.0f}x) "
        "to a dense 1024x1024 weight ==")
    say(render_table(
        ["steps", "relative error at SVD start", "relative error after Adam", "seconds"],
        [[fit_steps, f"{fitted.initial_relative_error:.4f}", f"{fitted.relative_error:.4f}",
          f"{results['fit']['seconds']:.1f}"]],
    ))

    layer_cfg = {"type": "adntn_linear", "in_features": 1024, "out_features": 1024, "bias": False,
                 "generator": spec.to_dict()}
    model = build_sequential({"type": "sequential", "layers": [layer_cfg]}, {"0": student.ir})
    model[0].weight_generator.load_state_dict(
        GeneratedWeight(student.ir, fitted.cores).state_dict()
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint or Path(tmp) / "fitted.safetensors"
        inputs = [{"name": "input", "shape": [1, 1024]}]
        save_checkpoint(path, model, extra={"fit_relative_error": fitted.relative_error, "inputs": inputs})
        reloaded = load_checkpoint(path)
        identical = bool(torch.equal(reloaded[0].weight, model.eval()[0].weight))
        size = Path(path).stat().st_size
        results["onnx"] = _onnx_step(reloaded, Path(tmp) / "fitted.onnx", seed)
    results["checkpoint"] = {"bytes": size, "dense_bytes": 1024 * 1024 * 4, "round_trip_identical": identical}
    say(f"\n== Checkpoint: {human_bytes(size)} (dense weight {human_bytes(1024 * 1024 * 4)}); "
        f"reloaded weight bit-identical: {identical} ==")
    if checkpoint:
        say(f"saved {checkpoint}")
    onnx_result = results["onnx"]
    say(f"\n== ONNX: {human_bytes(onnx_result['bytes'])} file with one ai.adntn::TTN node; ONNX Runtime vs torch "
        f"max relative difference {onnx_result['max_relative_difference']:.1e} at batch 8; "
        f"{onnx_result['ort_ms']:.3f} ms per call ==")
    return results


def _onnx_step(model, path: Path, seed: int) -> dict[str, Any]:
    """Export ``model`` to ONNX, run it with ONNX Runtime, compare with torch (batch 8)."""
    import torch

    from adntn_deploy.onnx_export import export_onnx
    from adntn_deploy.runtime import load

    export = export_onnx(model, [torch.randn(2, 1024)], path, input_names=["input"], dynamic_batch=True)
    predictor = load(path)
    x = np.random.default_rng(seed).standard_normal((8, 1024)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = predictor.run({"input": x})[predictor.outputs[0].name]
    start = time.perf_counter()
    for _ in range(20):
        predictor.run({"input": x})
    return {
        "bytes": export.bytes,
        "max_relative_difference": float(np.abs(got - expected).max() / np.abs(expected).max()),
        "ort_ms": (time.perf_counter() - start) / 20 * 1e3,
    }
