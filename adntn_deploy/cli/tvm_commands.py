"""CLI commands of the TVM stage: ``targets`` and ``compile``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from adntn_deploy.cli.onnx_commands import max_weight_bytes_option, parse_input_shape
from adntn_deploy.cli.sockets import check_port_free, check_tracker_reachable


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def targets_command(as_json: bool) -> None:
    """List the device profiles (--target accepts these names, TVM tags, or a JSON target dict)."""
    from adntn_deploy.reporting import render_table
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
@click.option("--weights", type=click.Choice(["load", "fold", "stream", "auto"]), default="load", show_default=True,
              help="load: generate weights on the device at load (artifact holds the cores); fold: bake dense weights in; "
                   "stream: generated layers run from their two factors, never holding the dense weight; "
                   "auto: stream the layers the cost model (FLOPs and weight bytes) finds faster, load the rest.")
@click.option("--cross-compiler", default=None, help="g++ that links the library (default: the profile's).")
@click.option("--opt-level", default=3, show_default=True, type=click.IntRange(0, 3))
@click.option("--dump-ir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write the Relax IR here.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
              help="Fix an input's shape (symbolic axes default to 1).")
@click.option("--tuning-records", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="MetaSchedule database to apply (default: schedules/<profile>/ when it matches the target).")
@click.option("--prepack/--no-prepack", default=True, show_default=True,
              help="CPU targets: run dense layers from weights packed into vector panels at load (fast without tuning); "
                   "--no-prepack keeps TVM's generic matmul for MetaSchedule to tune.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show TVM's own messages as they come (default: into the artifact's build.log, one summary line) "
                   "and name every operator left to a generic schedule.")
@max_weight_bytes_option
def compile_command(model, target, output, weights, cross_compiler, opt_level, dump_ir, input_shapes, tuning_records,
                    prepack, as_json, verbose):
    """Compile an ONNX model (ai.adntn or standard ops) with TVM into a deployable artifact folder."""
    from tqdm import tqdm

    from adntn_deploy.reporting import human_bytes
    from adntn_deploy.compiler.build import compile_model

    stages = ["validate and import", "apply tuning records", "build", "export"]
    bar = tqdm(total=len(stages), desc="compile", disable=None if not as_json else True, leave=False)

    def progress(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    def note(line: str) -> None:  # one line each on stderr; operators on generic schedules only with -v
        if verbose or line.startswith("note:"):
            click.echo(line if line.startswith("note:") else f"note: {line}", err=True)

    try:
        artifact = compile_model(
            model, target, output, weights=weights, cross_compiler=cross_compiler, opt_level=opt_level,
            dump_ir=dump_ir, input_shapes=dict(parse_input_shape(s) for s in input_shapes),
            tuning_records=tuning_records, prepack=prepack, progress=progress, verbose=verbose, notes=note,
        )
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(artifact.manifest, indent=2))
        return
    m = artifact.manifest
    files = ", ".join(f"{name} {human_bytes(info['bytes'])}" for name, info in m["files"].items())
    tuned = m["tuning"]
    note = tuned.get("records_note") or "no records for this target: adntn-deploy tune"
    tuning = (f"{tuned['scheduled_kernels']}/{tuned['kernels']} kernels tuned ({note})"
              if tuned["records"] else f"untuned ({note})")
    packed = [f"{tuned[key]} {what}" for key, what in (("packed_dense", "dense layers"), ("packed_conv2d", "convolutions"))
              if tuned.get(key)]
    if packed:
        tuning += f"; {' and '.join(packed)} on packed weights"
    streamed = ""
    chosen = [layer for layer in m.get("streamed", []) if layer.get("mode", "stream") == "stream"]
    if m["weights"] == "auto":
        from adntn_deploy.cli.onnx_commands import stream_decision_line

        for layer in m.get("streamed", []):
            click.echo(stream_decision_line(layer))
    if chosen:
        kinds = sorted({layer["kernel"] for layer in chosen})
        factors = sum(layer["factor_bytes"] for layer in chosen)
        dense = sum(layer["dense_bytes"] for layer in chosen)
        streamed = (f"; {len(chosen)} layers streamed ({', '.join(kinds)}): factors {human_bytes(factors)} "
                    f"instead of {human_bytes(dense)} of dense weights")
    click.echo(f"wrote {artifact.path} for {m['profile']} ({m['arch']}, {m['device']}), weights={m['weights']}: "
               f"{human_bytes(artifact.bytes)} ({files}); {tuning}{streamed}; built in {m['build_seconds']:.1f} s")


@click.command("bundle")
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--cross-compiler", default=None, help="g++ that builds the runner (default: the artifact's arch's).")
def bundle_command(artifact, output, cross_compiler):
    """Make an edge bundle: the artifact, the native adntn-runner and the TVM runtime libs, plus run.sh."""
    from adntn_deploy.compiler.bundle import make_bundle

    out = make_bundle(artifact, output, cross_compiler=cross_compiler)
    click.echo(f"wrote {out}: copy it to the board and run ./run.sh inputs.safetensors outputs.safetensors")


@click.command("tune")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", required=True, help="Device profile, TVM tag or JSON target dict.")
@click.option("--tuning-records", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Database folder to create or continue (compile --tuning-records reads it).")
@click.option("--trials", default=64, show_default=True, type=click.IntRange(1), help="Measured candidates in all.")
@click.option("--trials-per-task", default=None, type=click.IntRange(1), help="Cap per kernel.")
@click.option("--rpc-tracker", default=None, metavar="HOST:PORT", help="Measure on boards registered with this tracker.")
@click.option("--rpc-key", default=None, help="Device key the board's RPC server registered with.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds a candidate may take to build or run.")
@click.option("--cross-compiler", default=None, help="g++ that links candidates for the board.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...")
@click.option("--weights", type=click.Choice(["load", "stream"]), default="load", show_default=True,
              help="Tune the kernels of this compile mode (stream: the streamed kernels and their tile sizes).")
@click.option("--only", multiple=True, metavar="TEXT",
              help="Tune only kernels whose task name contains TEXT (repeatable), e.g. adntn_streamed.")
@click.option("--prepack/--no-prepack", default=True, show_default=True,
              help="Tune the kernels of compile --prepack (the default): CPU dense layers run from weights packed into vector panels at load (fast without tuning); "
                   "use the value compile will get.")
@click.option("--include-load-kernels", is_flag=True,
              help="Also tune the kernels that run once at load (generators, weight packing); by default the "
                   "trial budget goes to the kernels every call runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@max_weight_bytes_option
def tune_command(model, target, tuning_records, trials, trials_per_task, rpc_tracker, rpc_key, timeout,
                 cross_compiler, input_shapes, weights, only, prepack, include_load_kernels, as_json):
    """Tune the kernels every call runs with MetaSchedule (load-time ones on request); resumable and crash-safe."""
    import time as _time

    from tqdm import tqdm

    from adntn_deploy.compiler.tuning import tune_model

    bar = tqdm(total=trials, desc="tune", unit="trial", disable=True if as_json else None)
    clock = {"start": _time.perf_counter()}

    def on_batch(done: int, total: int, task: str, best: float | None) -> None:
        if done == 0:  # measuring starts now: import and task extraction are not part of the rate
            clock["start"] = _time.perf_counter()
            bar.set_postfix_str("measuring")
            return
        bar.update(done - bar.n)
        left = (_time.perf_counter() - clock["start"]) / done * max(total - done, 0)
        bar.set_postfix_str(f"{task[:28]} best {best * 1e6:.1f} us, ~{left:.0f} s left" if best else f"{task[:28]}, ~{left:.0f} s left")

    try:
        report = tune_model(model, target, tuning_records, trials=trials, trials_per_task=trials_per_task,
                            rpc_tracker=rpc_tracker, rpc_key=rpc_key, timeout=timeout, cross_compiler=cross_compiler,
                            input_shapes=dict(parse_input_shape(s) for s in input_shapes), weights=weights,
                            only=list(only), prepack=prepack, include_load_kernels=include_load_kernels,
                            on_batch=on_batch)
    finally:
        bar.close()
    for line in report.notes:
        click.echo(line, err=True)
    summary = {"records": str(report.records), "tasks": report.tasks, "trials": report.trials,
               "seconds": report.seconds, "best_us": {k: v * 1e6 for k, v in report.best.items()}}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"tuned {report.tasks} tasks with {report.trials} trials in {report.seconds:.0f} s; "
                   f"records in {report.records} (apply: adntn-deploy compile --tuning-records {report.records})")


@click.command("schedules")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedules_command(as_json):
    """List the tuning databases shipped in schedules/, per device profile."""
    from adntn_deploy.reporting import render_table
    from adntn_deploy.compiler.database import list_schedules

    rows = list_schedules()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tuning databases shipped (schedules/ is empty)")
        return
    click.echo(render_table(["profile", "workloads", "records", "trials", "models", "target"],
                            [[r["profile"], r["workloads"], r["records"], r["trials"], ", ".join(r["models"]), r["target"]]
                             for r in rows]))


@click.command("refresh-records")
@click.argument("records", type=click.Path(file_okay=False, path_type=Path))
@click.option("--prune", is_flag=True,
              help="Then keep only each kernel's fastest record (what compile applies): for databases you ship.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def refresh_records_command(records, prune, as_json):
    """Bring a tuning database's records up to today's schedule rules, keeping each record's tuned choices.

    Records tuned with an older adntn-deploy replay the schedule of that version (e.g. packed convolutions
    without unrolled filter taps), which can be slower than today's untuned default. This replays each
    record's decisions through today's rule and rewrites the file atomically; other records are untouched.
    """
    from adntn_deploy.compiler.refresh import prune_records, refresh_records

    report = refresh_records(records)
    summary = {"records": str(records), "refreshed": report.refreshed, "unchanged": report.unchanged,
               "other_rules": report.other}
    if prune:
        summary["pruned"] = prune_records(records)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"{records}: {report.refreshed} record(s) refreshed, {report.unchanged} already current, "
                   f"{report.other} of other rules left as they were"
                   + (f"; {summary['pruned']} slower record(s) of the same kernels removed" if prune else ""))


@click.group("rpc")
def rpc_group():
    """TVM RPC tracker and board server (for tuning on remote boards)."""


_HOST_HELP = ("Address to bind: loopback by default; reach boards through ssh tunnels (docs/tuning.md). Any other "
              "address exposes an unauthenticated service that runs whatever it is sent.")


def _warn_if_exposed(host: str, what: str) -> None:
    """One line on stderr when ``host`` is not a loopback address: TVM RPC has no authentication."""
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        click.echo(f"warning: the {what} listens on {host}; TVM RPC is unauthenticated and runs the code it is sent: "
                   "expose it only on a trusted network (or bind 127.0.0.1 and use an ssh tunnel)", err=True)


@rpc_group.command("tracker")
@click.option("--host", default="127.0.0.1", show_default=True, help=_HOST_HELP)
@click.option("--port", default=9190, show_default=True, type=click.IntRange(1, 65535))
def rpc_tracker_command(host, port):
    """Run a TVM RPC tracker (boards register with it; tune --rpc-tracker finds them through it)."""
    import os
    import sys

    _warn_if_exposed(host, "RPC tracker")
    check_port_free(host, port, "--port")  # TVM's own message for a taken port is a traceback

    # TVM searches [port, port-end) and its default end (9199) is below most chosen ports: give the end
    os.execv(sys.executable, [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                              "--port-end", str(port + 1)])


@rpc_group.command("server")
@click.option("--tracker", required=True, metavar="HOST:PORT", help="The tracker to register with.")
@click.option("--key", required=True, help="Device key, e.g. rpi4 (tune --rpc-key uses it).")
@click.option("--host", default="127.0.0.1", show_default=True, help=_HOST_HELP)
@click.option("--port", default=9090, show_default=True, type=click.IntRange(1, 65535))
def rpc_server_command(tracker, key, host, port):
    """Run a TVM RPC server on this board that registers with the tracker (needs the TVM runtime)."""
    import os
    import sys

    from adntn_deploy.compiler.target import configure_threads

    _warn_if_exposed(host, "RPC server")
    check_port_free(host, port, "--port")
    check_tracker_reachable(tracker)

    configure_threads()  # candidates are timed in this process: with the board's cores, as inference runs

    os.execv(sys.executable, [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", tracker, "--key", key,
                              "--host", host, "--port", str(port), "--port-end", str(port + 1)])
