"""CLI commands of the TVM stage: ``targets`` and ``compile``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from adntn_deploy.cli.onnx_commands import parse_input_shape


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets_command(as_json: bool) -> None:
    """List the device profiles (--target accepts these names, TVM tags, or a JSON target dict)."""
    from adntn_deploy.cli.tables import render_table
    from adntn_deploy.compiler.profiles import list_profiles

    profiles = list_profiles()
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in profiles], indent=2))
        return
    rows = [[p.name, p.arch, p.device, p.cross_compiler or "-", p.tag or "-", p.description] for p in profiles]
    click.echo(render_table(["profile", "arch", "device", "cross compiler", "TVM tag", "description"], rows))


@click.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", required=True, help="Device profile (adntn-deploy targets), TVM tag, or JSON target dict.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Artifact folder to write.")
@click.option("--weights", type=click.Choice(["load", "fold"]), default="load", show_default=True,
              help="load: generate weights on the device at load (artifact holds the cores); fold: bake dense weights in.")
@click.option("--cross-compiler", default=None, help="g++ that links the library (default: the profile's).")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 3))
@click.option("--dump-ir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write the Relax IR here.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
              help="Fix an input's shape (symbolic axes default to 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def compile_command(model, target, output, weights, cross_compiler, opt_level, dump_ir, input_shapes, as_json):
    """Compile an ONNX model (ai.adntn or standard ops) with TVM into a deployable artifact folder."""
    from tqdm import tqdm

    from adntn_deploy.cli.tables import human_bytes
    from adntn_deploy.compiler.build import compile_model

    stages = ["validate ONNX", "import into Relax", "build", "export"]
    bar = tqdm(total=len(stages), desc="compile", disable=None if not as_json else True, leave=False)

    def progress(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    try:
        artifact = compile_model(
            model, target, output, weights=weights, cross_compiler=cross_compiler, opt_level=opt_level,
            dump_ir=dump_ir, input_shapes=dict(parse_input_shape(s) for s in input_shapes), progress=progress,
        )
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(artifact.manifest, indent=2))
        return
    m = artifact.manifest
    files = ", ".join(f"{name} {human_bytes(info['bytes'])}" for name, info in m["files"].items())
    click.echo(f"wrote {artifact.path} for {m['profile']} ({m['arch']}, {m['device']}), weights={m['weights']}: "
               f"{human_bytes(artifact.bytes)} ({files}); built in {m['build_seconds']:.1f} s")


@click.command("bundle")
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--cross-compiler", default=None, help="g++ that builds the runner (default: the artifact's arch's).")
def bundle_command(artifact, output, cross_compiler):
    """Make an edge bundle: the artifact, the native adntn-runner and the TVM runtime libs, plus run.sh."""
    from adntn_deploy.compiler.bundle import make_bundle

    out = make_bundle(artifact, output, cross_compiler=cross_compiler)
    click.echo(f"wrote {out}: copy it to the board and run ./run.sh inputs.safetensors outputs.safetensors")
