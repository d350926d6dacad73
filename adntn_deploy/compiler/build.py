"""Compile an ONNX model (with ai.adntn generators) into a deployable TVM artifact for a device profile.

End point of the compiler stage (:mod:`adntn_deploy.compiler.tuning` is the other): resolve the target
(:mod:`.target`) -> import (:mod:`.frontend`: validate, inline, Relax, prepack our kernels, lift or fold)
-> legalise and fuse, apply tuning records (:mod:`.database`: the shipped ones by default) and give every
kernel of ours that the records did not cover its default schedule (:mod:`.schedules`) -> ``tvm.compile``
with the target's default Relax pipeline -> export (cross-linked for other architectures) -> artifact
folder (:mod:`.artifact`), replaced atomically. What TVM prints while building goes to the artifact's
``build.log`` (:mod:`.native_log`), with one summary line, unless ``verbose``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from adntn_deploy.version import __version__
from adntn_deploy.compiler.artifact import (
    ARTIFACT_FORMAT, ARTIFACT_VERSION, LIFTED_MODES, WEIGHT_MODES, Artifact, is_artifact_dir, write_manifest,
)
from adntn_deploy.compiler.errors import CompileError
from adntn_deploy.compiler.native_log import NativeLog
from adntn_deploy.compiler.profiles import host_arch, require_cross_compiler, resolve_target
from adntn_deploy.compiler.target import import_tvm, tvm_target


def compile_model(
    onnx_path: str | os.PathLike,
    target: str,
    output: str | os.PathLike,
    *,
    weights: str = "load",
    cross_compiler: str | None = None,
    opt_level: int = 3,
    dump_ir: str | os.PathLike | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    tuning_records: str | os.PathLike | None = None,
    prepack: bool = True,
    progress: Callable[[str], None] | None = None,
    verbose: bool = False,
    notes: Callable[[str], None] | None = None,
) -> Artifact:
    """Compile ``onnx_path`` for ``target`` (profile name, TVM tag or JSON dict) into the folder ``output``.

    Args:
        weights: "load" (generate weights once on the device at load; the artifact holds the cores),
            "fold" (dense weights baked in at compile time; bigger artifact, no load-time work) or
            "stream" (generated layers run from two thin factors made at load; the dense weight never
            exists on the device: docs/tvm.md#streamed-weights).
        cross_compiler: g++ used to link the library (default: the profile's, for other architectures).
        opt_level: TVM PassContext opt level (0-3).
        dump_ir: folder to write the Relax IR before and after lifting (for debugging).
        input_shapes: fixed shapes for inputs with symbolic axes (default: symbolic axes become 1).
        tuning_records: a MetaSchedule database folder to apply; default: the one shipped in schedules/
            for this profile and target, if any (records apply only to kernels whose workload hash matches).
        prepack: on CPU targets, run dense layers and convolutions from weights packed into vector panels
            at load (:mod:`adntn_deploy.compiler.schedules`); False keeps TVM's generic kernels (tuned by
            MetaSchedule).
        progress: called with a short message at each stage.
        verbose: let TVM's native messages through to stderr as they come, instead of into ``build.log``.
        notes: called with each one-line note: operators left to generic schedules (and why), and the
            summary of what TVM printed. Default: none are reported (the manifest keeps them).

    Raises:
        ProfileError: unknown target, invalid target, missing cross compiler (names the Debian package).
        OnnxModelError: the ONNX file is invalid. CompileError: TVM cannot import or build the model.
        StreamError / StreamCompileError: ``weights="stream"`` for a layer or target that cannot stream.
        OutputError: ``output`` is or holds the model, the tuning records or the current folder, or it
            exists and is not an artifact this tool wrote (an artifact is replaced atomically, nothing else).
    """
    say = progress or (lambda message: None)
    if weights not in WEIGHT_MODES:
        raise CompileError(f"weights= must be one of {', '.join(WEIGHT_MODES)}, not {weights!r}")
    if not 0 <= opt_level <= 3:
        raise CompileError(f"opt_level= must be 0..3, not {opt_level}")
    from adntn_deploy.outputs import check_replaceable, refuse_overwriting_inputs, replace_output_dir, staging_dir

    out = Path(output)
    # before minutes of work: the output must not be an input, and an existing folder must be our artifact
    refuse_overwriting_inputs(out, onnx_path, tuning_records)
    check_replaceable(out, is_artifact_dir, what="an artifact")
    profile = resolve_target(target)
    compiler = require_cross_compiler(profile, cross_compiler)
    tvm = import_tvm()  # first: without loading torch into a process that compiles an ONNX file
    from tvm import relax

    from adntn_deploy.compiler.database import apply_records, default_records
    from adntn_deploy.compiler.frontend import import_model
    from adntn_deploy.compiler.schedules import fuse_kernels, schedule_untuned

    tell = notes or (lambda message: None)
    native = NativeLog(verbose)
    tvm_tgt = tvm_target(profile)
    say("validate and import")
    with native.capture():
        imported = import_model(onnx_path, weights, input_shapes, opt_level, dump_ir,
                                prepack_target=tvm_tgt if prepack else None)
    for line in imported.notes:
        tell(line)
    mod, params, shapes, outputs = imported.mod, imported.params, imported.shapes, imported.outputs
    if tuning_records:
        records, records_profile, records_note = Path(tuning_records), None, f"records from {tuning_records}"
    else:
        choice = default_records(profile, tvm_tgt)
        records, records_profile, records_note = choice.folder, choice.profile, choice.note
    refuse_overwriting_inputs(out, records)
    tuned = {"records": str(records) if records else None, "records_profile": records_profile,
             "records_note": records_note, "scheduled_kernels": 0, "kernels": 0,
             "packed_dense": imported.prepacked.get("adntn_packed_dense", 0),
             "packed_conv2d": imported.prepacked.get("adntn_packed_conv2d", 0), "generic_notes": imported.notes,
             "graph_rewrites": imported.rewritten}
    # progress is reported between capture windows: inside one, the progress bar's own writes to stderr
    # would land in build.log
    with tvm.transform.PassContext(opt_level=opt_level):
        if records is not None or any(imported.prepacked.values()):
            with native.capture():
                mod = fuse_kernels(mod, tvm_tgt)
        if records is not None:
            say("apply tuning records")
            with native.capture():
                # shipped records are kept current (tests/test_refresh.py): only a user's need replaying
                refresh = None if records_profile else (lambda private: _refresh_private_records(private, records, tell))
                mod, tuned["scheduled_kernels"], tuned["kernels"] = apply_records(mod, tvm_tgt, records, prepare=refresh)
        with native.capture():
            mod, tuned["default_schedules"] = schedule_untuned(mod, tvm_tgt)
        say(f"build for {profile.name}")
        start = time.perf_counter()
        try:
            with native.capture():
                executable = tvm.compile(mod, tvm_tgt, relax_pipeline=relax.get_default_pipeline(tvm_tgt))
        except Exception as exc:
            raise CompileError(f"TVM failed to build for {profile.name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
        build_seconds = time.perf_counter() - start
    staging = staging_dir(out)
    try:
        say("export")
        library = "model.tar" if profile.export_format == "tar" else "model.so"
        with native.capture():
            _export(executable, staging / library, compiler)
        files = [library]
        if weights in LIFTED_MODES:
            from safetensors.numpy import save_file

            save_file({f"p{k:04d}": np.array(a, order="C", copy=True) for k, a in enumerate(params)}, str(staging / "params.safetensors"))
            files.append("params.safetensors")
        manifest = {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "model": Path(onnx_path).stem,
            "source": str(Path(onnx_path).name),
            "profile": profile.name,
            "arch": host_arch() if profile.arch == "native" else profile.arch,
            "device": profile.device,
            "target": str(tvm_tgt),
            "weights": weights,
            "library": library,
            "params_file": "params.safetensors" if weights in LIFTED_MODES else None,
            "params": [f"p{k:04d}" for k in range(len(params))],
            "param_sources": imported.param_names,
            "tuning": tuned,
            "inputs": [{"name": n, "shape": s, "dtype": imported.input_dtypes.get(n, "float32")} for n, s in shapes.items()],
            "outputs": outputs,
            "generators": imported.generators,
            "streamed": imported.streamed,
            "runtime_libs": list(profile.runtime_libs),
            "versions": {"adntn_deploy": __version__, "tvm": tvm.__version__},
            "build_seconds": build_seconds,
            "native_messages": native.count,
        }
        if native.count:
            (staging / "build.log").write_text(native.text)
            files.append("build.log")
            tell(native.summary(out / "build.log"))
        manifest = write_manifest(staging, manifest, files)
        replace_output_dir(staging, out, is_artifact_dir, what="an artifact")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return Artifact(out, manifest)


def _export(executable, path: Path, compiler: str | None) -> None:
    import tvm

    try:
        if path.suffix == ".tar":
            executable.export_library(str(path), fcompile=tvm.support.tar.tar)
        elif compiler:
            executable.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(compiler))
        else:
            executable.export_library(str(path))
    except Exception as exc:
        raise CompileError(f"exporting the library failed: {str(exc).strip().splitlines()[0]}") from None


def _refresh_private_records(private: Path, records: Path, tell: Callable[[str], None]) -> None:
    """Replay the applied records (``private``: the compile's own copy) through today's schedule rules.

    Records tuned with an older adntn-deploy keep that version's schedule; the kernel they schedule can
    then be slower than today's untuned default (:mod:`adntn_deploy.compiler.refresh`). The user's
    ``records`` folder is not touched; a record that cannot be refreshed is applied as it was, with a note.
    """
    from adntn_deploy.compiler.errors import TuningError
    from adntn_deploy.compiler.refresh import refresh_records

    try:
        report = refresh_records(private, best_only=True)
    except TuningError:
        tell(f"tuning records in {records} applied as tuned: a record's choices no longer fit today's schedule "
             "rules (tune that model again for today's kernels)")
        return
    if report.refreshed:
        tell(f"{report.refreshed} tuning record(s) in {records} were made by an older adntn-deploy: applied with "
             f"today's schedule and their tuned choices (adntn-deploy refresh-records {records} updates the folder)")
