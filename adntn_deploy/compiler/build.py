"""Compile an ONNX model (with ai.adntn generators) into a deployable TVM artifact for a device profile.

Pipeline: validate the ONNX file -> inline the ai.adntn function bodies (the TVM importer dispatches on
op type only) -> Relax import with parameters kept as inputs -> ``--weights load``: LiftTransformParams
moves everything that depends only on parameters (the generators, and any other weight-only work) into
``main_transform_params``, run once on the device at load; ``--weights fold``: parameters are bound and
constant-folded at compile time (dense weights inside the library) -> tvm.compile with the target's
default Relax pipeline -> export (cross-linked for other architectures) -> artifact folder.

Artifact folder (``manifest.json`` describes it; the sha256 of every file is recorded):
    model.so | model.tar     the compiled Relax VM executable
    params.safetensors       parameters in the order main_transform_params takes them (keys p0000, ...):
                             the cores and the model's other (dense) tensors, never a generated weight
    manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from adntn_deploy import __version__
from adntn_deploy.compiler.profiles import DeviceProfile, ProfileError, host_arch, require_cross_compiler, resolve_target
from adntn_deploy.errors import GeneratorError

ARTIFACT_FORMAT = "adntn-artifact"
ARTIFACT_VERSION = 1
WEIGHT_MODES = ("load", "fold", "stream")
#: modes whose parameters stay inputs and whose weight-only work runs once at load (main_transform_params)
LIFTED_MODES = ("load", "stream")


class CompileError(GeneratorError):
    """The model could not be compiled for the target; the message says why."""


@dataclass
class Artifact:
    """A compiled artifact on disk and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        """Total size of the artifact's files."""
        return sum(f["bytes"] for f in self.manifest["files"].values())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tvm_target(profile: DeviceProfile):
    """The tvm.target.Target of a profile, with ``mcpu: native`` and missing ``num-cores`` filled in."""
    import tvm

    from adntn_deploy.runtime.ort import default_threads

    def fill(target: dict[str, Any]) -> dict[str, Any]:
        target = dict(target)
        if target.get("kind") == "llvm":
            if target.get("mcpu") == "native":
                target["mcpu"] = str(tvm.target.codegen.llvm_get_system_cpu())
            if profile.arch in ("native", host_arch()):
                target.setdefault("num-cores", default_threads())
        if isinstance(target.get("host"), dict):
            target["host"] = fill(target["host"])
        return target

    try:
        return tvm.target.Target(fill(profile.target))
    except Exception as exc:
        raise ProfileError(f"target of profile {profile.name!r} is not valid for TVM: {str(exc).splitlines()[0]}") from None


def _sanitize_initializer_names(model) -> None:
    """Prefix initializer names that do not start with a letter (torch names them "0.bias").

    TVM turns parameter names into C identifiers in generated GPU source without fixing a leading digit,
    which nvcc rejects; renaming here (in the inlined copy, not the user's file) avoids that.
    """
    renames = {i.name: f"w_{i.name}" for i in model.graph.initializer if not i.name[:1].isalpha()}
    if not renames:
        return
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    for inp in model.graph.input:
        if inp.name in renames:
            inp.name = renames[inp.name]


def _graph_inputs(model, overrides: Mapping[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """{input name: fixed shape}: the model's shapes with ``overrides`` applied and symbolic axes set to 1.

    Raises:
        CompileError: an override that does not fit the model or names no input.
        LimitError: an input larger than the memory limit (:mod:`adntn_deploy.limits`).
    """
    from adntn_deploy.limits import check_tensor

    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if inp.name in overrides:
            given = list(overrides[inp.name])
            if len(given) != len(dims) or any(d is not None and d != g for d, g in zip(dims, given)):
                raise CompileError(f"--input-shape {inp.name}:{given} does not fit the model's input shape {dims}")
            dims = given
        shapes[inp.name] = [d if d is not None else 1 for d in dims]  # symbolic axes (batch) default to 1
        itemsize = np.dtype(_ONNX_DTYPES.get(inp.type.tensor_type.elem_type, "float32")).itemsize
        check_tensor(f"input {inp.name!r}", shapes[inp.name], itemsize)  # before TVM plans buffers for it
    unknown = sorted(set(overrides) - set(shapes))
    if unknown:
        raise CompileError(f"--input-shape names {unknown}, but the model's inputs are {sorted(shapes)}")
    return shapes


_ONNX_DTYPES = {1: "float32", 11: "float64", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 3: "int8", 2: "uint8"}


def _fix_input_shapes(model, shapes: Mapping[str, list[int]]) -> list[dict[str, Any]]:
    """Set the inputs' shapes in ``model`` (in place) and infer the outputs' shapes and dtypes."""
    import onnx

    for inp in model.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, value in zip(dims, shapes[inp.name]):
                d.ClearField("dim_param")
                d.dim_value = value
    inferred = onnx.shape_inference.infer_shapes(model)
    outputs = []
    for out in inferred.graph.output:
        tensor = out.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        outputs.append({"name": out.name, "shape": dims, "dtype": _ONNX_DTYPES.get(tensor.elem_type, "float32")})
    return outputs


@dataclass
class ImportedModel:
    """An ONNX model imported into Relax: lifted (weights "load") or folded, with its I/O and parameters."""

    mod: Any
    params: list[np.ndarray]
    param_names: list[str]
    shapes: dict[str, list[int]]
    outputs: list[dict[str, Any]]
    generators: dict[str, Any]
    streamed: list[dict[str, Any]]
    packed_dense: int = 0


def import_model(
    onnx_path: str | os.PathLike,
    weights: str = "load",
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    opt_level: int = 3,
    dump_ir: str | os.PathLike | None = None,
    prepack_target: Any = None,
) -> ImportedModel:
    """Validate an ONNX file, inline its ai.adntn functions and import it into Relax.

    With ``weights="load"`` parameters stay inputs and every weight-only computation is lifted into
    ``main_transform_params``; with ``"fold"`` they are constants and folded; with ``"stream"`` every
    generated layer is first rewritten to run from its two factors (:mod:`adntn_deploy.onnx_export.streaming`)
    and then lifted as in "load" (the factors, not the weights, are generated at load). With a CPU
    ``prepack_target`` (a tvm Target), dense matmuls on weights are rewritten to read the weight packed
    into that target's vector panels (:mod:`adntn_deploy.compiler.dense`; the packing is weight-only work).

    Raises:
        OnnxModelError: an invalid ONNX file. CompileError: TVM cannot import it (an unsupported op...).
        StreamError: a generated layer cannot be streamed (``weights="stream"``).
        LimitError: generated weights or an input larger than the memory limit (:mod:`adntn_deploy.limits`).
    """
    import onnx.inliner
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from adntn_deploy.onnx_export.reader import find_generators, generator_summary, load_onnx

    from adntn_deploy.limits import check_generators

    model = load_onnx(onnx_path)
    generators = find_generators(model)
    check_generators({g.layer: g.ir for g in generators}, what=f"the generated weights of {onnx_path}")
    summary = generator_summary(model) or {g.weight: {"layer": g.layer, "family": g.ir.family} for g in generators}
    shapes = _graph_inputs(model, dict(input_shapes or {}))
    streamed: list[dict[str, Any]] = []
    if weights == "stream":
        from adntn_deploy.onnx_export.streaming import stream_weights

        model, layers = stream_weights(model)
        streamed = [layer.as_dict() for layer in layers]
    inlined = onnx.inliner.inline_local_functions(model)
    _sanitize_initializer_names(inlined)
    outputs = _fix_input_shapes(inlined, shapes)
    from adntn_deploy.compiler.streaming import onnx_streamed_ops

    lifted = weights in LIFTED_MODES
    try:
        with onnx_streamed_ops():
            mod = from_onnx(inlined, shape_dict=shapes, keep_params_in_input=lifted)
    except GeneratorError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "; run it with ONNX Runtime (--backend ort) or re-export without that op" if "not supported" in first else ""
        raise CompileError(f"TVM cannot import the model: {type(exc).__name__}: {first}{hint}") from None
    params: list[np.ndarray] = []
    param_names: list[str] = []
    if lifted:
        mod, detached = relax.frontend.detach_params(mod)
        main_params = list(mod["main"].params)
        param_names = [str(v.name_hint) if hasattr(v, "name_hint") else str(v) for v in main_params[len(shapes):]]
        params = [np.asarray(t.numpy()) for t in detached.get("main", [])]
    dump = Path(dump_ir) if dump_ir else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "01_imported.py").write_text(mod.script())
    packed = 0
    if prepack_target is not None:
        from adntn_deploy.compiler.dense import prepack_dense

        mod, packed = prepack_dense(mod, prepack_target)
    with tvm.transform.PassContext(opt_level=opt_level):
        if lifted:
            mod = relax.transform.LiftTransformParams()(mod)
        else:
            mod = relax.transform.FoldConstant()(mod)
    if dump:
        (dump / ("02_lifted.py" if lifted else "02_folded.py")).write_text(mod.script())
    return ImportedModel(mod, params, param_names, shapes, outputs, summary, streamed, packed)


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
        prepack: on CPU targets, run dense layers from weights packed into vector panels at load
            (:mod:`adntn_deploy.compiler.dense`); False keeps TVM's generic matmul (tuned by MetaSchedule).
        progress: called with a short message at each stage.

    Raises:
        ProfileError: unknown target, invalid target, missing cross compiler (names the Debian package).
        OnnxModelError: the ONNX file is invalid. CompileError: TVM cannot import or build the model.
        StreamError / StreamCompileError: ``weights="stream"`` for a layer or target that cannot stream.
        OutputError: ``output`` is or holds the model, the tuning records or the current folder, or it
            exists and is not an artifact this tool wrote (an artifact is replaced atomically, nothing else).
    """
    say = progress or (lambda message: None)
    if weights not in WEIGHT_MODES:
        raise CompileError(f"--weights must be one of {', '.join(WEIGHT_MODES)}, not {weights!r}")
    if not 0 <= opt_level <= 3:
        raise CompileError(f"--opt-level must be 0..3, not {opt_level}")
    from adntn_deploy.compiler.tvm_runtime import is_artifact_dir
    from adntn_deploy.outputs import check_replaceable, refuse_overwriting_inputs, replace_output_dir, staging_dir

    out = Path(output)
    # before minutes of work: the output must not be an input, and an existing folder must be our artifact
    refuse_overwriting_inputs(out, onnx_path, tuning_records)
    check_replaceable(out, is_artifact_dir, what="an artifact")
    profile = resolve_target(target)
    compiler = require_cross_compiler(profile, cross_compiler)
    import tvm
    from tvm import relax

    from adntn_deploy.compiler.tuning import apply_records, default_records, prepare_for_tuning

    tvm_tgt = tvm_target(profile)
    say("validate and import")
    imported = import_model(onnx_path, weights, input_shapes, opt_level, dump_ir,
                            prepack_target=tvm_tgt if prepack else None)
    mod, params, shapes, outputs = imported.mod, imported.params, imported.shapes, imported.outputs
    if tuning_records:
        records, records_profile, records_note = Path(tuning_records), None, f"records from {tuning_records}"
    else:
        choice = default_records(profile, tvm_tgt)
        records, records_profile, records_note = choice.folder, choice.profile, choice.note
    refuse_overwriting_inputs(out, records)
    tuned = {"records": str(records) if records else None, "records_profile": records_profile,
             "records_note": records_note, "scheduled_kernels": 0, "kernels": 0, "packed_dense": imported.packed_dense}
    with tvm.transform.PassContext(opt_level=opt_level):
        if records is not None or imported.packed_dense:
            mod = prepare_for_tuning(mod, tvm_tgt)
        if records is not None:
            say("apply tuning records")
            mod, tuned["scheduled_kernels"], tuned["kernels"] = apply_records(mod, tvm_tgt, records)
        if imported.packed_dense:
            from adntn_deploy.compiler import dense

            mod, tuned["default_packed_schedules"] = dense.schedule_untuned(mod, tvm_tgt)
        if weights == "stream":
            from adntn_deploy.compiler.streaming import schedule_untuned

            mod, tuned["default_streamed_schedules"] = schedule_untuned(mod, tvm_tgt)
        say(f"build for {profile.name}")
        start = time.perf_counter()
        try:
            executable = tvm.compile(mod, tvm_tgt, relax_pipeline=relax.get_default_pipeline(tvm_tgt))
        except Exception as exc:
            raise CompileError(f"TVM failed to build for {profile.name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
        build_seconds = time.perf_counter() - start
    staging = staging_dir(out)
    try:
        say("export")
        library = "model.tar" if profile.export_format == "tar" else "model.so"
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
            "inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in shapes.items()],
            "outputs": outputs,
            "generators": imported.generators,
            "streamed": imported.streamed,
            "runtime_libs": list(profile.runtime_libs),
            "versions": {"adntn_deploy": __version__, "tvm": tvm.__version__},
            "build_seconds": build_seconds,
            "files": {f: {"sha256": sha256_file(staging / f), "bytes": (staging / f).stat().st_size} for f in files},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        staging.chmod(0o755)  # mkdtemp makes 0700 folders and files; an artifact is meant to be shared
        for f in staging.iterdir():
            f.chmod(0o644 if f.suffix != ".so" else 0o755)
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
