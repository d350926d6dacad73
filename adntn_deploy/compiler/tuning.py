"""Auto-tuning with MetaSchedule: tune the kernels of an imported model into a tuning database.

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
from typing import Callable

from adntn_deploy.compiler.database import copy_database, has_database, lock_database, merge_equal_workloads, publish
from adntn_deploy.compiler.errors import TuningError
from adntn_deploy.compiler.native_log import NativeLog
from adntn_deploy.compiler.profiles import require_cross_compiler, resolve_target
from adntn_deploy.compiler.target import configure_threads, import_tvm, tvm_target
from adntn_deploy.errors import AdntnError


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


#: builds one builder pool serves before it is replaced (TVM restarts its pool every batch because popen
#: workers leak memory over many builds; replacing it every few batches keeps that bounded)
BUILDS_PER_POOL = 256


def persistent_builder(timeout: float, f_build, f_export=None, workers: int | None = None):
    """A MetaSchedule builder whose worker processes outlive a batch.

    TVM's LocalBuilder starts a fresh process pool for every batch of candidates, and each worker imports
    tvm: on a 2-core machine about 20 s per batch, so 8 trials spread over 6 tasks cost minutes of start-up
    alone. This one keeps its pool for :data:`BUILDS_PER_POOL` builds (and replaces it after a worker is
    killed by a timeout). Candidates are built with ``f_build`` / ``f_export`` exactly as LocalBuilder would.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    from adntn_deploy.limits import usable_cpus

    @tvm.ir.utils.derived_object
    class PersistentBuilder(ms.builder.PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = None
            self.builds = 0

        def build(self, build_inputs):
            if self.pool is None or self.builds >= BUILDS_PER_POOL:
                self.close()
                self.pool = PopenPoolExecutor(max_workers=workers or usable_cpus(), timeout=timeout)
            self.builds += len(build_inputs)
            jobs = [(f_build, f_export, b.mod, b.target, local_builder._serialize_params(b.params)) for b in build_inputs]
            results = []
            for outcome in self.pool.map_with_error_catching(lambda job: local_builder._worker_func(*job), jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(None, f"build timed out after {timeout} s"))
                    self.builds = BUILDS_PER_POOL  # the pool lost a worker: start a fresh one next batch
                else:
                    results.append(ms.builder.BuilderResult(None, f"build failed: {outcome.value}"))
            return results

        def close(self):
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None
            self.builds = 0

    return PersistentBuilder()


def split_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` address (an IPv6 host in brackets, ``[::1]:9190``, loses them), or
    None when ``address`` has no host or its port is not a number from 1 to 65535."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def rpc_boards(host: str, port: int, key: str) -> int:
    """How many RPC servers are registered (and free) under ``key`` on the tracker at ``host:port``; at least 1.

    The runner measures on that many boards at once: the tracker hands each session to a different server.

    Raises:
        TuningError: the tracker cannot be reached.
    """
    import socket

    from tvm import rpc

    try:  # tvm's own connect retries for a minute; a closed port should fail at once
        socket.create_connection((host, port), timeout=10).close()
        queues = rpc.connect_tracker(host, port).summary().get("queue_info", {})
    except Exception as exc:  # tvm raises a bare TVMError or ConnectionError: either way, nothing listens there
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuningError(f"cannot reach the RPC tracker at {host}:{port} ({reason}); start it with "
                          "adntn-deploy rpc tracker, or fix rpc_tracker=") from None
    return max(1, int(queues.get(key, {}).get("free", 0)))


def inference_only(mod):
    """``mod`` without ``main_transform_params`` and the kernels only it calls.

    The load-time kernels (generator contractions, weight packing) run once per process start: tuning them
    spends the trial budget on work the user never waits for per call.
    """
    import tvm
    from tvm import relax

    names = [gv.name_hint for gv in mod.get_global_vars()]
    if "main_transform_params" not in names:
        return mod
    kept = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main_transform_params"}, attrs=mod.attrs)
    return relax.transform.DeadCodeElimination(["main"])(kept)


def record_default_schedules(contexts, target, builder, runner, work_dir: Path) -> tuple[int, list[str]]:
    """Measure our rules' untuned default schedule of every task in ``contexts`` with the tuning run's own
    ``builder`` and ``runner``, and commit each as a tuning record into the database in ``work_dir``.

    MetaSchedule's search starts from random samples and need not revisit the default; on a short budget
    its best candidate measured slower than the default (12.2 vs 10.7 ms on a VGG fc7 matmul). With the
    default in the database, the record a compile applies is the fastest of the searched candidates and
    the default, measured in the same run. A default already in the database (a resumed run) is kept as
    it was measured. CPU (llvm) targets only: our rules schedule nothing else.

    Returns (defaults committed, one-line notes on defaults that failed to build or run).
    """
    from tvm.s_tir import meta_schedule as ms

    from adntn_deploy.compiler.schedules import default_schedule

    if str(target.kind.name) != "llvm":
        return 0, []
    database = ms.database.JSONDatabase(work_dir=str(work_dir))
    candidates = []
    for ctx in contexts:
        sch = default_schedule(ctx.mod, target)
        if sch is None:
            continue
        workload = database.commit_workload(ctx.mod)
        trace_json = str(sch.trace.as_json())
        if any(str(r.trace.as_json()) == trace_json for r in database.get_top_k(workload, 1 << 20)):
            continue
        candidates.append((str(ctx.task_name), sch, workload, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
    if not candidates:
        return 0, []
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch, _, _ in candidates])
    committed, notes, pending = 0, [], []
    for (name, sch, workload, args), result in zip(candidates, built):
        if result.error_msg:
            notes.append(f"{name}: the default schedule did not build ({result.error_msg.strip().splitlines()[0]})")
            continue
        pending.append((name, sch, workload, args, result.artifact_path))
    futures = runner.run([ms.runner.RunnerInput(path, "cpu", args) for *_, args, path in pending]) if pending else []
    for (name, sch, workload, args, _), future in zip(pending, futures):
        outcome = future.result()
        if outcome.error_msg or not outcome.run_secs:
            notes.append(f"{name}: the default schedule did not run ({(outcome.error_msg or 'no timing').strip().splitlines()[0]})")
            continue
        secs = [float(t) for t in outcome.run_secs]
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, secs, target, args))
        committed += 1
    return committed, notes


@dataclass
class TuneReport:
    """What a tuning run did: tasks, trials, best latency per task (seconds), wall time, records folder."""

    records: Path
    tasks: int
    trials: int
    seconds: float
    best: dict[str, float] = field(default_factory=dict)
    #: one-line notes for the user (a summary of what TVM printed while importing and extracting tasks)
    notes: list[str] = field(default_factory=list)
    #: untuned default schedules measured and committed beside the searched candidates
    defaults: int = 0


def same_kernel(workload_line: bytes, other_line: bytes) -> bool:
    """Whether two workload lines of a MetaSchedule database hold structurally equal kernels (what TVM's
    database holds as one workload: buffer and variable names do not count)."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    first, second = (ms.database.Workload.from_json(json.loads(line)) for line in (workload_line, other_line))
    return bool(tvm_ffi.structural_equal(first.mod, second.mod))


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
    include_load_kernels: bool = False,
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
        include_load_kernels: also tune the kernels of ``main_transform_params`` (generators, weight
            packing), which run once at load; by default the whole budget goes to the per-call kernels.
        on_batch: called once with 0 trials done when measuring starts (after import and task extraction,
            so a time-left estimate starts there), then after every measured batch as (trials done, trials
            total, task name, best seconds of that task so far or None).

    Raises:
        TuningError: bad options or an unreachable tracker. ProfileError / CompileError as for compile.
    """
    tvm = import_tvm()  # first: without loading torch into a process that tunes an ONNX file
    from tvm.s_tir import meta_schedule as ms

    from adntn_deploy.compiler.artifact import LIFTED_MODES
    from adntn_deploy.compiler.frontend import import_model
    from adntn_deploy.compiler.schedules import fuse_kernels, register_schedule_rules

    if trials < 1:
        raise TuningError("trials= must be at least 1")
    if bool(rpc_tracker) != bool(rpc_key):
        raise TuningError("rpc_tracker= and rpc_key= go together")
    if rpc_tracker:  # checked before the import: a typo should not cost a minute of work
        address = split_host_port(rpc_tracker)
        if address is None:
            raise TuningError(f"rpc_tracker= must be HOST:PORT, not {rpc_tracker!r}")
        boards = rpc_boards(*address, rpc_key)
    profile = resolve_target(target)
    compiler = require_cross_compiler(profile, cross_compiler)
    if compiler and not rpc_tracker:
        raise TuningError(f"{profile.name} runs on {profile.arch}: tune on the board with --rpc-tracker HOST:PORT --rpc-key KEY")
    tvm_tgt = tvm_target(profile)
    if weights not in LIFTED_MODES:
        raise TuningError(f"weights= must be load or stream for tuning, not {weights!r} (fold has the load kernels' inference part)")
    records = Path(records)
    # held from before the resume read to the last write: every publish replaces the whole database
    with lock_database(records, "tune into another folder"):
        register_schedule_rules()
        register_tensor_intrinsics(tvm_tgt)
        verbose = bool(os.environ.get("ADNTN_TUNE_VERBOSE"))
        native = NativeLog(verbose)
        with native.capture():  # TVM's C++ warnings (see native_log): one summary note in the report
            imported = import_model(onnx_path, weights, input_shapes, prepack_target=tvm_tgt if prepack else None)
            fused = fuse_kernels(imported.mod, tvm_tgt)
        staging = Path(tempfile.mkdtemp(prefix="adntn-tune-"))
        if has_database(records):  # resume: start from what was published, checked
            copy_database(records, staging)
            # else TVM files the records of every workload this run adds under the wrong index
            merge_equal_workloads(staging, same_kernel)
        builder = persistent_builder(timeout, build_candidate, partial(_export_with, compiler) if compiler else None)
        if rpc_tracker:
            config = ms.runner.RPCConfig(tracker_host=address[0], tracker_port=address[1], tracker_key=rpc_key,
                                         session_timeout_sec=int(timeout))
            # one server serves one session at a time: one runner worker per board the key has (a farm)
            runner = ms.runner.RPCRunner(config, max_workers=boards)
        else:
            # candidates are measured in worker processes started from here: give them the thread pool that
            # inference will use (TVM's x86 default is half the CPUs), or the search tunes for the wrong machine
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
                publish(staging, records)
                if on_batch:
                    on_batch(state["done"], trials, name, state["best"].get(name))

        # MetaSchedule prints every batch and a task table to stdout at INFO; its per-task logs still go to
        # files. Our progress callback is the user-facing report.
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(
            logging.DEBUG if verbose else logging.WARNING)
        start = time.perf_counter()
        try:
            with native.capture():
                tasks = ms.relax_integration.extract_tasks(fused if include_load_kernels else inference_only(fused), tvm_tgt)
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
            if on_batch:
                on_batch(0, trials, "", None)
            ms.tune.tune_tasks(
                tasks=contexts, task_weights=weights_per_task, work_dir=str(staging), max_trials_global=trials,
                max_trials_per_task=per_task, num_trials_per_iter=min(64, trials), builder=builder, runner=runner,
                measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [Progress()],
            )
            with native.capture():
                defaults, default_notes = record_default_schedules(contexts, tvm_tgt, builder, runner, staging)
            publish(staging, records)
        except AdntnError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TuningError(f"tuning failed: {first}") from None
        finally:
            builder.close()
            shutil.rmtree(staging, ignore_errors=True)
        meta = records / "adntn_schedule.json"
        info = json.loads(meta.read_text()) if meta.exists() else {"models": [], "trials": 0}
        info.update(target=str(tvm_tgt), profile=profile.name, trials=int(info.get("trials", 0)) + state["done"])
        info["models"] = sorted(set(info["models"]) | {Path(onnx_path).name})
        meta.write_text(json.dumps(info, indent=2) + "\n")
        notes = [native.summary(None, "ADNTN_TUNE_VERBOSE=1 shows them")] if native.count else []
        if defaults:
            notes.append(f"{defaults} untuned default schedule(s) measured into the records too: a kernel's record "
                         "is the faster of the search and the default")
        notes += default_notes
        return TuneReport(records, len(tasks), state["done"], time.perf_counter() - start, dict(state["best"]), notes,
                          defaults=defaults)
