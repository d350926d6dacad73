"""CLI commands of the ONNX stage: ``export`` and ``run``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME:1,3,32,32`` (TVMC's syntax; ``NAME:[1,3,32,32]`` too) into (name, shape)."""
    name, sep, dims = text.rpartition(":")
    dims = dims.strip().strip("[]")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise click.BadParameter(f"{text!r} is not NAME:D1,D2,... with positive dimensions (e.g. input:1,1,28,28)")
    return name, shape


def _set_max_weight_bytes(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    from adntn_deploy.limits import ENV, LimitError, parse_bytes

    if value is None:
        return
    try:
        parse_bytes(value)
    except LimitError as exc:
        raise click.BadParameter(str(exc)) from None
    os.environ[ENV] = value  # read by every size check in this process (adntn_deploy.limits)


#: ``--max-weight-bytes`` for commands that load models; it sets ADNTN_MAX_WEIGHT_BYTES for the process
max_weight_bytes_option = click.option(
    "--max-weight-bytes", metavar="SIZE", expose_value=False, callback=_set_max_weight_bytes,
    help="Largest generated weights / input tensor a model may declare, e.g. 16GiB "
         "(default: ADNTN_MAX_WEIGHT_BYTES, else an eighth of the available memory).",
)


@click.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
              help="Input name and shape (repeat per input); default: the shapes the checkpoint records.")
@click.option("--dynamic-batch", is_flag=True, help="Make axis 0 of every input symbolic.")
@click.option("--opset", default=18, show_default=True, help="Default-domain ONNX opset (13..23).")
@click.option("--standard-ops", is_flag=True, help="Inline the generators: standard ONNX ops only, no ai.adntn domain.")
@click.option("--stream", type=click.Choice(["off", "on", "auto"]), default="off", show_default=True,
              is_flag=False, flag_value="on",
              help="Generated layers run from their two factors as standard ops: no ONNX runtime ever holds the "
                   "dense weight (--stream alone = on; auto: only where the cost model finds it faster).")
@click.option("--output-name", "output_names", multiple=True, help="Graph output name(s).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@max_weight_bytes_option
def export_command(checkpoint, output, input_shapes, dynamic_batch, opset, standard_ops, stream, output_names, as_json):
    """Export a checkpoint's model to ONNX; generated layers become ai.adntn nodes holding only the cores."""
    from adntn_deploy.onnx_export import export_checkpoint

    start = time.perf_counter()
    result = export_checkpoint(
        checkpoint, output, input_shapes=[parse_input_shape(s) for s in input_shapes], dynamic_batch=dynamic_batch,
        opset=opset, standard_ops=standard_ops, stream=stream, output_names=output_names,
    )
    dense_bytes = sum(4 * g["dense_params"] for g in result.generators.values())
    summary = {
        "path": str(result.path), "bytes": result.bytes, "generators": result.generators,
        "standard_ops": standard_ops, "seconds": time.perf_counter() - start,
        "dense_weight_bytes_replaced": dense_bytes, "stream": stream, "streamed": result.streamed,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        from adntn_deploy.reporting import human_bytes

        for layer in result.streamed:
            click.echo(stream_decision_line(layer))
        click.echo(
            f"wrote {result.path} ({human_bytes(result.bytes)}; {len(result.generators)} generated layer(s) "
            f"standing in for {human_bytes(dense_bytes)} of dense weights) in {summary['seconds']:.1f} s"
        )


def stream_decision_line(layer: dict) -> str:
    """One line saying how a generated layer runs after streaming (a StreamedLayer.as_dict())."""
    from adntn_deploy.reporting import human_bytes

    if layer["mode"] == "stream":
        return (f"  layer {layer['layer']}: streamed ({layer['kernel']}, rank {layer['rank']}): keeps "
                f"{human_bytes(layer['factor_bytes'])} instead of {human_bytes(layer['dense_bytes'])}; {layer['reason']}")
    return f"  layer {layer['layer']}: generator kept ({human_bytes(layer['dense_bytes'])} at load): {layer['reason']}"


@click.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False, path_type=Path),
              help=".npz with one array per input name, or a .npy for a model with one input (default: random normal inputs, batch 1).")
@click.option("--outputs", "outputs_path", type=click.Path(dir_okay=False, path_type=Path), help="Write outputs to this .npz.")
@click.option("--backend", type=click.Choice(["ort", "tvm"]), default=None,
              help="Runtime (default: ort for .onnx files, tvm for compiled artifact folders).")
@click.option("--repeat", default=1, show_default=True, help="Timed calls; > 1 prints latency statistics.")
@click.option("--warmup", default=1, show_default=True, help="Untimed calls before timing.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads; for TVM, the size of its thread pool (default and most: usable CPUs).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print outputs' shapes and latency as JSON.")
@max_weight_bytes_option
def run_command(model, inputs_path, outputs_path, backend, repeat, warmup, threads, seed, as_json):
    """Run MODEL (an .onnx file or a compiled artifact) on inputs from an .npz; report outputs and latency."""
    from adntn_deploy.runtime.session import run_model

    result = run_model(model, inputs_path, outputs_path, backend=backend, repeat=max(1, repeat),
                       warmup=max(0, warmup), threads=threads, seed=seed)  # as ever: 0 means the least
    report = result.summary()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{model} on {result.backend}, {result.threads} thread(s) (loaded in {result.load_seconds:.2f} s)")
    for name, out in result.outputs.items():
        click.echo(f"  output {name}: shape {tuple(out.shape)} {out.dtype}")
    lat = report["latency_ms"]
    if result.timing.calls > 1:
        click.echo(f"  latency over {result.timing.calls} calls: mean {lat['mean']:.3f} ms, p50 {lat['p50']:.3f}, "
                   f"p90 {lat['p90']:.3f}, p99 {lat['p99']:.3f}, min {lat['min']:.3f}")
    else:
        click.echo(f"  latency: {lat['mean']:.3f} ms")
    if result.written:
        click.echo(f"  wrote {result.written}")
