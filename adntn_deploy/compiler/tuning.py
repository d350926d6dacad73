"""Auto-tuning with MetaSchedule: tune every kernel of a model, store and apply tuning databases.

Tuning works on the module exactly as the build sees it: the lifted model (``main`` and
``main_transform_params``, so both the inference kernels and the load-time generator kernels are tasks)
after inference decomposition, legalisation and fusion. A database is a MetaSchedule JSON work dir:
``database_workload.json`` + ``database_tuning_record.json`` (one JSON record per line).

Crash safety: MetaSchedule writes into a private staging folder; after every measured batch the two
files are published to the records folder by write-to-temp-and-rename, with any incomplete last line
dropped, so the records folder always holds a database that loads, even after ``kill -9``. Running
again continues: the staging folder starts from the published records, which seed the search.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from adntn_deploy.compiler.database import DB_FILES, RecordsChoice, has_database
from adntn_deploy.compiler.profiles import DeviceProfile, require_cross_compiler, resolve_target
from adntn_deploy.errors import GeneratorError

SCHEDULES_ENV = "ADNTN_SCHEDULES_DIR"


class TuningError(GeneratorError):
    """Tuning could not run (bad options, unreachable tracker, broken database)."""


def schedules_dir() -> Path:
    """The shipped tuning databases: $ADNTN_SCHEDULES_DIR or the repository's schedules/ folder."""
    env = os.environ.get(SCHEDULES_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "schedules"


def _tuning_passes():
    import tvm
    from tvm.relax import transform
    from tvm.relax.pipeline import zero_pipeline

    return tvm.transform.Sequential([transform.DecomposeOpsForInference(), transform.CanonicalizeBindings(), zero_pipeline()])


def prepare_for_tuning(mod, target):
    """The module as tasks are extracted from it: decomposed, legalised and fused, within ``target``.

    Fused packed-dense kernels are then annotated so that only their own rule schedules them.
    """
    from adntn_deploy.compiler.dense import annotate_fused

    with target:
        return annotate_fused(_tuning_passes()(mod))


def is_scheduled(func) -> bool:
    """Whether a PrimFunc already carries a schedule (from the database or one of our defaults)."""
    attrs = func.attrs or {}
    # the attribute's namespace moved between TVM releases (tir. -> tirx. / s_tir.)
    return any(str(k).endswith("is_scheduled") and bool(attrs[k]) for k in attrs.keys())


def _count_scheduled(mod) -> tuple[int, int]:
    """(kernels that carry a schedule from the database, all kernels) in a fused module."""
    funcs = [f for _, f in mod.functions.items() if type(f).__name__ == "PrimFunc"]
    return sum(1 for f in funcs if is_scheduled(f)), len(funcs)


_TENSOR_INTRIN = "tvm.s_tir.tensor_intrin"


def register_tensor_intrinsics(target) -> None:
    """Register the tensor intrinsics MetaSchedule may name for ``target`` before it builds tune contexts.

    ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose package import registers every intrinsic of
    every backend; its CUDA part alone took 25 s, the whole 40-70 s, on a 2-core machine: more than a small
    tuning run. For CPU (llvm) targets only the CPU modules (x86 VNNI/AMX, ARM, RISC-V) are imported, under
    an unexecuted package module, so the import in TuneContext finds it done. Other targets, or any failure
    here, take TVM's full import. Idempotent.
    """
    import importlib
    import importlib.util
    import sys

    if _TENSOR_INTRIN in sys.modules:
        return
    if str(target.kind.name) != "llvm":
        importlib.import_module(_TENSOR_INTRIN)
        return
    import tvm.s_tir  # noqa: F401  (the parent package must exist before its submodule is placed)

    spec = importlib.util.find_spec(_TENSOR_INTRIN)
    package = importlib.util.module_from_spec(spec)
    sys.modules[_TENSOR_INTRIN] = package
    try:
        for name in ("x86", "arm_cpu", "riscv_cpu"):
            importlib.import_module(f"{_TENSOR_INTRIN}.{name}")
    except Exception:  # a TVM whose layout differs: fall back to its own (slow) import
        for name in [m for m in sys.modules if m == _TENSOR_INTRIN or m.startswith(_TENSOR_INTRIN + ".")]:
            del sys.modules[name]
        importlib.import_module(_TENSOR_INTRIN)


def register_schedule_rules() -> None:
    """Register our MetaSchedule custom rules (packed dense, the fused streamed kernel) for CPU targets.

    A block annotated ``schedule_rule = NAME`` is scheduled by the global function
    ``s_tir.meta_schedule.cpu.NAME``. Idempotent.
    """
    import tvm

    from adntn_deploy.compiler import dense, streaming

    for name, schedule in ((dense.RULE_NAME, dense.schedule_packed), (streaming.RULE_NAME, streaming.schedule_streamed)):
        if tvm.get_global_func(f"s_tir.meta_schedule.cpu.{name}", allow_missing=True) is None:
            tvm.register_global_func(f"s_tir.meta_schedule.cpu.{name}",
                                     lambda sch, block, schedule=schedule: [schedule(sch, block)])


def clean_database(folder: Path) -> None:
    """Drop incomplete trailing lines from a JSON database (what an interrupted writer leaves).

    A file that changes is rewritten through a temporary file and a rename, never in place: a reader (or
    a crash) sees the old file or the new one.
    """
    # records are appended one line at a time, so only the tail can be incomplete: check the last line
    # instead of parsing the whole (multi-MB) database
    for name in DB_FILES:
        path = folder / name
        if not path.exists():
            continue
        data = path.read_bytes()
        body = data.rstrip(b"\n")
        cut = body.rfind(b"\n") + 1
        try:
            json.loads(body[cut:]) if body[cut:].strip() else None
            fixed = body + b"\n" if body else b""
        except (json.JSONDecodeError, RecursionError):
            fixed = body[:cut]
        if fixed != data:
            _write_atomically(path, fixed)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` through a temporary file beside it and a rename (mode 0644)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a database is meant to be shared and shipped
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _checked_lines(path: Path, workloads: int | None) -> list[bytes]:
    """The lines of one database file, each checked before TVM's JSON reader may see it.

    TVM parses records (and the IR inside each workload, base64 after an 8-byte length) with a recursive
    reader that a deeply nested line crashes: every line and every embedded IR must nest at most
    DEFAULT_MAX_DEPTH levels, strings included (trace strings hold JSON too). A workload line is
    ``[hash, base64]``; a record line is ``[workload index, [trace, ...]]`` with an index into the
    ``workloads`` lines read before. A last line without its newline that does not parse is dropped
    (an interrupted writer left it); any other bad line is an error.

    Raises:
        TuningError: the file and line number, and what is wrong there.
    """
    import base64
    import binascii

    from adntn_deploy.safejson import DEFAULT_MAX_DEPTH, JsonLimitError, check_depth

    data = path.read_bytes()
    lines = data.split(b"\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            check_depth(line, what=where, strings=True)
            value = json.loads(line)
        except JsonLimitError as exc:
            raise TuningError(f"{exc}; it is not a tuning database this tool wrote (run adntn-deploy tune again)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            if number == len(lines):  # no newline after it: an interrupted append
                break
            raise TuningError(f"{where} is not valid JSON; remove the line or tune again") from None
        if workloads is None:
            ok = (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value))
            if ok:
                try:
                    ir = base64.b64decode(value[1], validate=True)
                except (binascii.Error, ValueError):
                    ok = False
                else:
                    ok = len(ir) >= 8 and int.from_bytes(ir[:8], "little") == len(ir) - 8
                    if ok:
                        try:
                            check_depth(ir[8:], DEFAULT_MAX_DEPTH, f"the IR in {where}", strings=True)
                        except JsonLimitError as exc:
                            raise TuningError(f"{exc}; it is not a tuning database this tool wrote") from None
            what = "a workload [hash, base64 IR]"
        else:
            ok = (isinstance(value, list) and len(value) == 2 and type(value[0]) is int
                  and 0 <= value[0] < workloads and isinstance(value[1], list))
            what = f"a record [workload index below {workloads}, [trace, ...]]"
        if not ok:
            raise TuningError(f"{where} is not {what}; it is not a tuning database this tool wrote (tune again)")
        kept.append(line)
    return kept


def copy_database(source: Path, destination: Path) -> None:
    """Copy the database in ``source`` into the folder ``destination``, checked line by line.

    ``source`` is only read. Incomplete trailing lines are left out of the copy (see :func:`_checked_lines`).

    Raises:
        TuningError: a file is missing or a line is malformed or too deeply nested.
    """
    source, destination = Path(source), Path(destination)
    if not has_database(source):
        raise TuningError(f"{source} is not a tuning database (needs {' and '.join(DB_FILES)}); run adntn-deploy tune")
    workloads = _checked_lines(source / DB_FILES[0], None)
    records = _checked_lines(source / DB_FILES[1], len(workloads))
    destination.mkdir(parents=True, exist_ok=True)
    for name, lines in zip(DB_FILES, (workloads, records)):
        (destination / name).write_bytes(b"".join(line + b"\n" for line in lines))


def apply_records(fused, target, records: Path) -> tuple[Any, int, int]:
    """Apply the database in ``records`` to ``fused`` (from :func:`prepare_for_tuning`).

    ``records`` is only read: TVM gets a checked private copy (:func:`copy_database`).
    Returns (module, kernels scheduled, kernels in all).

    Raises:
        TuningError: the folder is not a tuning database, a line is malformed, or TVM refused it.
    """
    from tvm import relax

    records = Path(records)
    private = Path(tempfile.mkdtemp(prefix="adntn-records-"))
    try:
        copy_database(records, private)
        with target:
            try:
                applied = relax.transform.MetaScheduleApplyDatabase(str(private))(fused)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise TuningError(f"the tuning records in {records} could not be applied ({first}); tune again") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)
    scheduled, total = _count_scheduled(applied)
    return applied, scheduled, total


def default_records(profile: DeviceProfile, target) -> RecordsChoice:
    """The shipped database to apply when compiling ``profile`` as ``target``, and a note saying why.

    See :mod:`adntn_deploy.compiler.database`: the profile's own records, else those of the best
    instruction-set profile the target's CPU supports (records travel between CPUs of one ISA), else none.
    """
    from adntn_deploy.compiler.database import choose_records

    return choose_records(profile, target, schedules_dir())


def _read_meta(path: Path) -> dict:
    """A schedules folder's adntn_schedule.json (depth-bounded), as a dict.

    Raises:
        TuningError: the file is not a JSON object.
    """
    from adntn_deploy.safejson import JsonLimitError, loads_object

    try:
        return loads_object(path.read_bytes(), what=str(path))
    except JsonLimitError as exc:
        raise TuningError(f"{exc}; delete it or tune again") from None


def list_schedules() -> list[dict[str, Any]]:
    """What schedules/ ships: per profile folder, the target, models, workloads and records."""
    rows = []
    root = schedules_dir()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        meta_path = folder / "adntn_schedule.json"
        meta = _read_meta(meta_path) if meta_path.exists() else {}
        counts = {f: sum(1 for line in (folder / f).read_text().splitlines() if line.strip()) if (folder / f).exists() else 0
                  for f in DB_FILES}
        rows.append({"profile": folder.name, "target": meta.get("target") or (meta.get("tuned_on") or {}).get("target"), "models": meta.get("models", []),
                     "trials": meta.get("trials"), "workloads": counts[DB_FILES[0]], "records": counts[DB_FILES[1]]})
    return rows


def _publish(staging: Path, records: Path) -> None:
    """Copy the staging database to ``records`` atomically (temp file + rename per file)."""
    records.mkdir(parents=True, exist_ok=True)
    for name in DB_FILES:
        source = staging / name
        if not source.exists():
            continue
        data = source.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
        _write_atomically(records / name, data)


def build_candidate(mod, target, _params=None):
    """MetaSchedule f_build: TVM's default candidate build, without importing ``tvm.s_tir.tensor_intrin``.

    TVM's default imports every tensor intrinsic in each builder worker, and its builder pool is restarted
    for every measured batch: on a 2-core machine that import alone took 15-70 s per batch, more than the
    builds themselves. CPU (llvm) candidates of float32 kernels never tensorize, so they skip it; other
    targets (CUDA tensor cores...) keep TVM's behaviour. Returns the built runtime module.
    """
    if str(target.kind.name) != "llvm":
        import tvm.s_tir.tensor_intrin  # noqa: F401  (registers the intrinsics that tensorized blocks name)
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _export_with(compiler: str, mod, path_hint: str | None = None) -> str:
    """MetaSchedule f_export: link a candidate with the host's cross compiler (boards may lack one)."""
    import tvm

    folder = tempfile.mkdtemp(prefix="adntn-ms-")
    path = os.path.join(folder, "candidate.so")
    mod.export_library(path, fcompile=tvm.support.cc.cross_compiler(compiler))
    return path


@dataclass
class TuneReport:
    """What a tuning run did: tasks, trials, best latency per task (seconds), wall time, records folder."""

    records: Path
    tasks: int
    trials: int
    seconds: float
    best: dict[str, float] = field(default_factory=dict)


def tune_model(
    onnx_path: str | os.PathLike,
    target: str,
    records: str | os.PathLike,
    *,
    trials: int = 64,
    trials_per_task: int | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    timeout: float = 300.0,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    cross_compiler: str | None = None,
    weights: str = "load",
    prepack: bool = True,
    only: list[str] | None = None,
    on_batch: Callable[[int, int, str, float | None], None] | None = None,
) -> TuneReport:
    """Tune every kernel of ``onnx_path`` for ``target``; the database goes to (or grows in) ``records``.

    Args:
        trials: total measured candidates across all tasks; trials_per_task caps one task (default: an
            equal share, so no kernel is left with its naive first candidate).
        rpc_tracker / rpc_key: measure on a board registered with a TVM RPC tracker ("host:port").
        timeout: seconds a candidate may take to build (2-core machines need minutes) and to run.
        weights: the compile mode whose kernels to tune: "load" (generators + inference) or "stream"
            (factor generators + the streamed kernels, whose tile sizes are searched by a custom rule).
        prepack: tune the packed-dense kernels that compile makes on CPU targets (the default; pass the
            same value compile gets, or the records will not match its kernels).
        only: tune only the kernels whose task name contains one of these strings (e.g. "adntn_streamed").
        on_batch: called after every measured batch as (trials done, trials total, task name, best
            seconds of that task so far or None).

    Raises:
        TuningError: bad options or an unreachable tracker. ProfileError / CompileError as for compile.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from adntn_deploy.compiler.build import LIFTED_MODES, import_model, tvm_target

    if trials < 1:
        raise TuningError("--trials must be at least 1")
    if bool(rpc_tracker) != bool(rpc_key):
        raise TuningError("--rpc-tracker and --rpc-key go together")
    profile = resolve_target(target)
    compiler = require_cross_compiler(profile, cross_compiler)
    if compiler and not rpc_tracker:
        raise TuningError(f"{profile.name} runs on {profile.arch}: tune on the board with --rpc-tracker HOST:PORT --rpc-key KEY")
    tvm_tgt = tvm_target(profile)
    if weights not in LIFTED_MODES:
        raise TuningError(f"--weights must be load or stream for tuning, not {weights!r} (fold has the load kernels' inference part)")
    register_schedule_rules()
    register_tensor_intrinsics(tvm_tgt)
    imported = import_model(onnx_path, weights, input_shapes, prepack_target=tvm_tgt if prepack else None)
    fused = prepare_for_tuning(imported.mod, tvm_tgt)
    records = Path(records)
    staging = Path(tempfile.mkdtemp(prefix="adntn-tune-"))
    if has_database(records):  # resume: start from what was published, checked
        copy_database(records, staging)
    builder = ms.builder.LocalBuilder(
        timeout_sec=timeout, f_build=build_candidate, f_export=partial(_export_with, compiler) if compiler else None,
    )
    if rpc_tracker:
        host, _, port = rpc_tracker.rpartition(":")
        if not host or not port.isdigit():
            raise TuningError(f"--rpc-tracker must be HOST:PORT, not {rpc_tracker!r}")
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=rpc_key,
                                     session_timeout_sec=int(timeout))
        runner = ms.runner.RPCRunner(config, max_workers=1)  # one server serves one session at a time
    else:
        # candidates are measured in worker processes started from here: give them the thread pool that
        # inference will use (TVM's x86 default is half the CPUs), or the search tunes for the wrong machine
        from adntn_deploy.compiler.tvm_runtime import configure_threads

        configure_threads()
        runner = ms.runner.LocalRunner(timeout_sec=timeout)
    state = {"done": 0, "best": {}}

    @tvm.ir.utils.derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            name = str(task_scheduler.tasks_[task_id].ctx.task_name) if hasattr(task_scheduler, "tasks_") else str(task_id)
            times = [float(sum(r.run_secs) / len(r.run_secs)) for r in runner_results if r.run_secs and r.error_msg is None]
            if times:
                state["best"][name] = min(times + ([state["best"][name]] if name in state["best"] else []))
            state["done"] += len(runner_results)
            _publish(staging, records)
            if on_batch:
                on_batch(state["done"], trials, name, state["best"].get(name))

    # MetaSchedule prints every batch and a task table to stdout at INFO; its per-task logs still go to
    # files. Our progress callback is the user-facing report.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(
        logging.DEBUG if os.environ.get("ADNTN_TUNE_VERBOSE") else logging.WARNING)
    start = time.perf_counter()
    try:
        tasks = ms.relax_integration.extract_tasks(fused, tvm_tgt)
        if only:
            tasks = [t for t in tasks if any(name in t.task_name for name in only)]
            if not tasks:
                raise TuningError(f"no kernel's task name contains {' or '.join(only)}; drop --only to tune all kernels")
        # without a per-task cap the gradient scheduler can spend the whole budget on cheap kernels and
        # leave a big matmul with its first (naive) candidate; default: an equal share per task
        per_task = trials_per_task or max(1, -(-trials // max(len(tasks), 1)))
        # tune the tasks extracted above (tune_relax would extract them all again, and its op_names filter
        # selects a task once per matching name)
        contexts, weights_per_task = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(staging))
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights_per_task, work_dir=str(staging), max_trials_global=trials,
            max_trials_per_task=per_task, num_trials_per_iter=min(64, trials), builder=builder, runner=runner,
            measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [Progress()],
        )
        _publish(staging, records)
    except GeneratorError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuningError(f"tuning failed: {first}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = records / "adntn_schedule.json"
    info = json.loads(meta.read_text()) if meta.exists() else {"models": [], "trials": 0}
    info.update(target=str(tvm_tgt), profile=profile.name, trials=int(info.get("trials", 0)) + state["done"])
    info["models"] = sorted(set(info["models"]) | {Path(onnx_path).name})
    meta.write_text(json.dumps(info, indent=2) + "\n")
    return TuneReport(records, len(tasks), state["done"], time.perf_counter() - start, dict(state["best"]))
