"""Benchmark: Fashion-MNIST accuracy against per-layer compression ratio (TTN, aTTN, MERA).

For the zoo's VGG-style and AlexNet-style nets: train a dense baseline (cached under .cache/benchmarks/),
then for every family and target per-layer ratio compress the two hidden classifier layers (``--layers
classifier``; the 2048x10 output layer stays dense), fit the cores to the trained weights, fine-tune, and
measure test accuracy. A ratio that a family cannot reach on a layer is reported as such, not skipped.

Results: benchmarks/results/accuracy.json (rows written as they finish), accuracy.md (the table) and
accuracy.png (accuracy against ratio, one line per family). Usage:
    python benchmarks/accuracy.py                       # the full table (about an hour on 2 cores)
    python benchmarks/accuracy.py --quick               # digits, MLP, one ratio (a minute)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "benchmarks"


def dense_baseline(model_name: str, data, epochs: int, seed: int):
    from adntn_deploy.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from adntn_deploy.models.zoo import build_model
    from adntn_deploy.training import evaluate, train

    path = CACHE / f"dense-{model_name}-{data.name}-e{epochs}-s{seed}.ckpt"
    if path.is_file():
        info = read_checkpoint(path)
        return load_checkpoint(path), info.extra["train_seconds"]
    model = build_model(model_name, data.num_classes, seed)
    result = train(model, data, epochs=epochs, seed=seed)
    save_checkpoint(path, model, {"train_seconds": result.seconds, "test_accuracy": evaluate(model, data.test_x, data.test_y)})
    return model, result.seconds


def run(args) -> list[dict]:
    from adntn_deploy.data import load_dataset
    from adntn_deploy.errors import GeneratorError
    from adntn_deploy.training import evaluate
    from adntn_deploy.workflows import compress_checkpoint

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    rows: list[dict] = []
    out = RESULTS / f"{args.name}.json"

    def save() -> None:
        RESULTS.mkdir(exist_ok=True)
        meta = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "data": data.describe(),
                "dense_epochs": args.dense_epochs, "finetune_epochs": args.epochs, "fit_steps": args.fit_steps,
                "scope": args.scope, "activation": args.activation,
                "distill_weight": args.distill_weight, "distill_temperature": args.distill_temperature, "calibration_images": args.calibrate, "layers": "classifier (the two hidden Linear layers)"}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    for model_name in args.models:
        dense, dense_seconds = dense_baseline(model_name, data, args.dense_epochs, args.seed)
        dense_acc = evaluate(dense, data.test_x, data.test_y)
        rows.append({"model": model_name, "family": "dense", "target_ratio": 1, "accuracy": dense_acc,
                     "seconds": dense_seconds, "layer_ratios": [], "model_ratio": 1.0})
        print(f"{model_name}: dense test accuracy {dense_acc:.4f} ({dense_seconds:.0f} s to train)", flush=True)
        for layout, family, ratio in [(lo, f, r) for lo in args.layouts for f in args.families for r in args.ratios]:
                row = {"model": model_name, "family": family, "layout": layout, "target_ratio": ratio, "dense_accuracy": dense_acc}
                start = time.perf_counter()
                if args.from_scratch:
                    rows.append(scratch_row(row, model_name, data, family, layout, ratio, args))
                    save()
                    print(f"  scratch {layout} {family} {ratio}x: accuracy {rows[-1]['accuracy']:.4f}", flush=True)
                    continue
                try:  # the compress command's workflow, without a checkpoint file
                    outcome = compress_checkpoint(
                        dense, None, data, family=family, ratio=ratio, layout=layout, activation=args.activation,
                        fit_steps=args.fit_steps, calibrate=args.calibrate, epochs=args.epochs, scope=args.scope,
                        distill=args.distill_weight > 0, distill_temperature=args.distill_temperature,
                        distill_weight=args.distill_weight, dense_accuracy=dense_acc, measure_fit=True, seed=args.seed,
                        progress=True)
                except GeneratorError as exc:  # a ratio this family cannot reach on these layers
                    row.update(accuracy=None, unreachable=str(exc))
                    rows.append(row)
                    save()
                    print(f"  {layout} {family} {ratio}x: {exc}", flush=True)
                    continue
                report, acc = outcome.report, outcome.accuracy
                row.update(
                    accuracy=acc, accuracy_after_fit=outcome.fitted_accuracy, delta_points=100 * (acc - dense_acc),
                    layer_ratios=[round(r.ratio, 1) for r in report.layers], layer_params=[r.params for r in report.layers],
                    configs=[{k: r.spec[k] for k in ("bond_dim", "max_mode", "share")} for r in report.layers],
                    fit_errors=[round(r.fit_error, 4) for r in report.layers], model_ratio=report.model_ratio,
                    seconds=time.perf_counter() - start,
                    finetune_seconds=outcome.finetune.seconds if outcome.finetune else 0.0,
                )
                rows.append(row)
                save()
                print(f"  {layout} {family} {ratio}x: accuracy {acc:.4f} ({row['delta_points']:+.2f} points), layer ratios "
                      f"{row['layer_ratios']}, model {report.model_ratio:.1f}x, {row['seconds']:.0f} s", flush=True)
    save()
    return rows


def scratch_row(row: dict, model_name: str, data, family: str, layout: str, ratio: float, args) -> dict:
    """Train the zoo net with generated classifier layers from random cores (no dense net), as long as the dense one."""
    from adntn_deploy.compression import generated_from_scratch
    from adntn_deploy.models.zoo import build_model
    from adntn_deploy.training import evaluate, train

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model, report = generated_from_scratch(build_model(model_name, data.num_classes, args.seed), "classifier", family,
                                           ratio=ratio, layout=layout, activation=args.activation, seed=args.seed)
    train(model, data, epochs=args.dense_epochs, seed=args.seed)
    acc = evaluate(model, data.test_x, data.test_y)
    row.update(layout=f"{layout} (from scratch, {args.dense_epochs} epochs)", accuracy=acc,
               delta_points=100 * (acc - row["dense_accuracy"]), layer_ratios=[round(r.ratio, 1) for r in report.layers],
               layer_params=[r.params for r in report.layers], model_ratio=report.model_ratio,
               seconds=time.perf_counter() - start)
    return row


def describe(meta: dict) -> str:
    """The results page's first paragraph, from the run's meta."""
    distill = (f"knowledge distillation from the dense net (weight {meta['distill_weight']}, T {meta['distill_temperature']})"
               if meta.get("distill_weight") else "labels only")
    return (f"Test accuracy on {meta['data']['name'] if isinstance(meta.get('data'), dict) else meta.get('data')}; dense "
            f"{meta['dense_epochs']} epochs; compressed: fit {meta['fit_steps']} Adam steps (calibrated on "
            f"{meta.get('calibration_images', 0)} training images, bias-corrected), then {meta['finetune_epochs']} fine-tuning "
            f"epoch(s) (scope {meta['scope']}, {distill}), activation {meta['activation']}.\n\n")


def table(rows: list[dict]) -> str:
    lines = ["| model | layout | family | target ratio | per-layer ratios | whole model | test accuracy | vs dense (points) | time (s) |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        layout = r.get("layout", "split")  # rows written before the operator layout existed
        if r["family"] == "dense":
            lines.append(f"| {r['model']} | - | dense | 1 | - | 1.0x | {100 * r['accuracy']:.2f}% | - | {r['seconds']:.0f} (train) |")
        elif r.get("accuracy") is None:
            lines.append(f"| {r['model']} | {layout} | {r['family']} | {r['target_ratio']:,} | unreachable | - | - | - | - |")
        else:
            ratios = ", ".join(f"{x:,.0f}x" for x in r["layer_ratios"])
            lines.append(f"| {r['model']} | {layout} | {r['family']} | {r['target_ratio']:,} | {ratios} | {r['model_ratio']:.1f}x | "
                         f"{100 * r['accuracy']:.2f}% | {r['delta_points']:+.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        dense = next(r for r in mine if r["family"] == "dense")
        ax.axhline(100 * dense["accuracy"], color="black", linestyle="--", label="dense")
        lines = dict.fromkeys((r.get("layout", "split"), r["family"]) for r in mine if r["family"] != "dense")
        for layout, family in lines:
            pts = sorted((min(r["layer_ratios"]), 100 * r["accuracy"]) for r in mine
                         if r["family"] == family and r.get("layout", "split") == layout and r.get("accuracy") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if layout == "operator" else ":",
                        label=f"{family} ({layout})")
        ax.set_xscale("log")
        ax.set_xlabel("per-layer compression ratio (smallest of the compressed layers)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}, Fashion-MNIST" if dense.get("model") else model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vgg", "alexnet"])
    parser.add_argument("--families", nargs="+", default=["ttn", "attn", "mera"])
    parser.add_argument("--layouts", nargs="+", default=["operator", "split"], choices=["operator", "split", "auto"])
    parser.add_argument("--ratios", nargs="+", type=int, default=[2000, 10000, 20000])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--dense-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs after compression")
    parser.add_argument("--fit-steps", type=int, default=50)
    parser.add_argument("--calibrate", type=int, default=2000, help="training images for calibration (0: plain weight fit)")
    parser.add_argument("--scope", default="head", choices=["head", "all"])
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--distill-weight", type=float, default=0.7, help="knowledge distillation weight (0: labels only)")
    parser.add_argument("--distill-temperature", type=float, default=4.0)
    parser.add_argument("--from-scratch", action="store_true",
                        help="train the nets with generated layers from random cores for --dense-epochs instead of compressing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="accuracy", help="results file stem under benchmarks/results/")
    parser.add_argument("--quick", action="store_true", help="digits, MLP, TTN at 2,000x, 1 epoch (smoke run)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the .md table and the .png plot from the existing results .json (e.g. of an interrupted run)")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        m = saved["meta"]
        text = table(saved["rows"])
        print(text)
        header = describe(m)
        (RESULTS / f"{args.name}.md").write_text(header + text + "\n")
        plot(saved["rows"], RESULTS / f"{args.name}.png")
        return
    if args.quick:
        args.models, args.families, args.ratios, args.data = ["mlp"], ["ttn"], [2000], "digits"
        args.dense_epochs, args.epochs, args.fit_steps, args.name = 2, 1, 20, "accuracy_quick"
    rows = run(args)
    text = table(rows)
    print(text)
    header = describe(json.loads((RESULTS / f"{args.name}.json").read_text())["meta"])
    (RESULTS / f"{args.name}.md").write_text(header + text + "\n")
    plot(rows, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / (args.name + '.json')}, .md and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
