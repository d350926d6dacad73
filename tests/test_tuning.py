"""Auto-tuning: tune, apply, resume, survive kill -9, tune through a real RPC tracker and server."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tolerance import float32_rtol, relative_error  # noqa: E402
from adntn_deploy.compiler.build import compile_model  # noqa: E402
from adntn_deploy.compiler.database import DB_FILES, clean_database, list_schedules  # noqa: E402
from adntn_deploy.compiler.errors import TuningError  # noqa: E402
from adntn_deploy.compiler.tuning import tune_model  # noqa: E402
from adntn_deploy.onnx_export import export_onnx  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402

CLI = [sys.executable, "-m", "adntn_deploy.cli.main"]


@pytest.fixture(scope="module")
def tiny(tiny_onnx):
    return tiny_onnx("ttn", "linear")  # ADNTNLinear(16 -> 8) + ReLU


def records_in(folder: Path) -> int:
    path = folder / "database_tuning_record.json"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(30)


@pytest.fixture(scope="module")
def dense64(tmp_path_factory):
    """One generic matmul kernel (--no-prepack) with a search space larger than a few trials."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval()
    path = tmp_path_factory.mktemp("tune") / "dense64.onnx"
    export_onnx(model, [torch.randn(1, 64)], path, input_names=["input"])
    return path


# Tuning is minutes of CPU on 2 cores; the README's test command runs it (-m "slow or not slow").
@pytest.mark.slow
def test_tune_survives_kill_resumes_and_applies(tmp_path, dense64):
    records = tmp_path / "records"
    tune = [*CLI, "tune", str(dense64), "--target", "host", "--tuning-records", str(records), "--no-prepack",
            "--only", "matmul", "--json"]
    proc = subprocess.Popen([*tune, "--trials", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        # event-driven: tune publishes after every measured batch (at most --trials candidates), so wait for
        # that file, however long the machine takes; the bound below only keeps a hung run from hanging CI
        hang_guard = time.time() + 3600
        while proc.poll() is None and records_in(records) == 0 and time.time() < hang_guard:
            time.sleep(0.2)
        assert records_in(records) > 0, f"tune ended (rc {proc.poll()}) without publishing a record: {proc.stderr.read()[-2000:]!r}"
    finally:
        kill_group(proc)  # kill -9 in the middle of tuning
    clean_database(records)
    before = records_in(records)
    artifact = compile_model(dense64, "host", tmp_path / "art", tuning_records=records, prepack=False)
    assert artifact.manifest["tuning"]["scheduled_kernels"] >= 1
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    expected = load(dense64).run({"input": x})
    got = load(artifact.path).run({"input": x})
    (name,) = expected
    assert relative_error(got[name], expected[name]) < float32_rtol(64)

    report = tune_model(dense64, "host", records, trials=4, prepack=False, only=["matmul"])  # resume from the records
    assert report.trials >= 4 and records_in(records) >= before + 1
    meta = json.loads((records / "adntn_schedule.json").read_text())
    assert meta["models"] == ["dense64.onnx"] and meta["trials"] >= 4


@pytest.mark.slow
def test_a_farm_of_two_rpc_servers_under_one_key_shares_the_measurements(tmp_path, dense64, free_port):
    """A tracker on loopback with two servers registered under one key: tune measures on both (each server's
    log shows sessions), and the records are the same kind of database as a local run's."""
    tracker_port = free_port()
    tracker = subprocess.Popen([*CLI, "rpc", "tracker", "--host", "127.0.0.1", "--port", str(tracker_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    servers, logs = [], [tmp_path / f"server{k}.log" for k in range(2)]
    try:
        import socket

        deadline = time.time() + 60  # rpc server refuses to start before its tracker listens
        while True:
            try:
                socket.create_connection(("127.0.0.1", tracker_port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the RPC tracker never listened")
                time.sleep(0.2)
        for log in logs:
            with open(log, "w") as sink:
                servers.append(subprocess.Popen(
                    [*CLI, "rpc", "server", "--tracker", f"127.0.0.1:{tracker_port}", "--key", "farm",
                     "--host", "127.0.0.1", "--port", str(free_port())],
                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True))
        from tvm import rpc

        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if rpc.connect_tracker("127.0.0.1", tracker_port).summary()["queue_info"].get("farm", {}).get("free") == 2:
                    break
            except Exception:
                pass
            time.sleep(1)
        else:
            pytest.fail("the two RPC servers never registered with the tracker")
        records = tmp_path / "farm-records"
        report = tune_model(dense64, "host", records, trials=8, rpc_tracker=f"127.0.0.1:{tracker_port}", rpc_key="farm",
                            prepack=False, only=["matmul"])
        assert report.trials >= 8 and records_in(records) >= 1
        assert set(DB_FILES) <= {p.name for p in records.iterdir()}  # what a local run writes, in the same format
        assert json.loads((records / "adntn_schedule.json").read_text())["models"] == ["dense64.onnx"]
        sessions = [log.read_text().count("start serving") for log in logs]  # one line per session
        assert all(n >= 1 for n in sessions), f"sessions per server: {sessions}"
    finally:
        for proc in (*servers, tracker):
            kill_group(proc, signal.SIGTERM)


@pytest.mark.parametrize("kwargs, message", [
    ({"trials": 0}, "at least 1"),
    ({"rpc_tracker": "127.0.0.1:9190"}, "go together"),
    ({"rpc_tracker": "nohost", "rpc_key": "k"}, "HOST:PORT"),
    ({"rpc_tracker": "127.0.0.1:70000", "rpc_key": "k"}, "HOST:PORT"),
    ({"rpc_tracker": "127.0.0.1:1", "rpc_key": "k"}, "cannot reach the RPC tracker at 127.0.0.1:1"),
])
def test_bad_tuning_options(tmp_path, tiny, kwargs, message):
    with pytest.raises(TuningError, match=message):
        tune_model(tiny, "host", tmp_path / "r", **kwargs)


@pytest.mark.parametrize("address, parsed", [
    ("127.0.0.1:9190", ("127.0.0.1", 9190)),
    ("[::1]:9190", ("::1", 9190)),
    ("board.local:1", ("board.local", 1)),
    ("nohost", None),
    (":9190", None),
    ("host:", None),
    ("host:0", None),
    ("host:65536", None),
    ("host:-1", None),
])
def test_split_host_port(address, parsed):
    """One parser for tune's rpc_tracker= and the rpc server's --tracker (before, two with different rules)."""
    from adntn_deploy.compiler.tuning import split_host_port

    assert split_host_port(address) == parsed


@pytest.mark.parametrize("args, message", [
    (["server", "--tracker", "127.0.0.1:{closed}", "--key", "k"], "cannot reach the RPC tracker at 127.0.0.1:"),
    (["server", "--tracker", "nohost", "--key", "k"], "--tracker must be HOST:PORT"),
    (["server", "--tracker", "127.0.0.1:{taken}", "--key", "k", "--port", "{taken}"], "pick another --port"),
    (["tracker", "--port", "{taken}"], "pick another --port"),
])
def test_rpc_commands_refuse_what_they_cannot_use_at_once(args, message):
    """A real process: one usage error (exit 2) in seconds, where TVM's server retried an absent tracker for a
    minute and then hung with a traceback, and its tracker printed one for a taken port."""
    import socket

    with socket.socket() as taken, socket.socket() as closed:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections to it are refused
        ports = {"taken": taken.getsockname()[1], "closed": closed.getsockname()[1]}
        proc = subprocess.run([*CLI, "rpc", *(a.format(**ports) for a in args)], capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cross_target_needs_a_board(tmp_path, tiny):
    with pytest.raises(TuningError, match="--rpc-tracker"):
        tune_model(tiny, "rpi4", tmp_path / "r", trials=2)


def test_applying_something_that_is_not_a_database(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TuningError, match="not a tuning database"):
        compile_model(tiny, "host", tmp_path / "art", tuning_records=tmp_path / "empty")


def test_clean_database_drops_incomplete_lines(tmp_path):
    good = json.dumps({"a": 1})
    for name in DB_FILES:
        (tmp_path / name).write_text(f"{good}\n{good}\n{{\"half\": ")
    clean_database(tmp_path)
    for name in DB_FILES:
        assert (tmp_path / name).read_text() == f"{good}\n{good}\n"


def test_schedules_listing(tmp_path, monkeypatch):
    folder = tmp_path / "host"
    folder.mkdir()
    for name, lines in zip(DB_FILES, (2, 5)):
        (folder / name).write_text("".join(json.dumps({"k": k}) + "\n" for k in range(lines)))
    (folder / "adntn_schedule.json").write_text(json.dumps({"target": "llvm -x", "models": ["m.onnx"], "trials": 64}))
    monkeypatch.setenv("ADNTN_SCHEDULES_DIR", str(tmp_path))
    (row,) = list_schedules()
    assert row == {"profile": "host", "target": "llvm -x", "models": ["m.onnx"], "trials": 64, "workloads": 2, "records": 5}
    proc = subprocess.run([*CLI, "schedules", "--json"], capture_output=True, text=True, env={**os.environ})
    assert json.loads(proc.stdout)[0]["records"] == 5


def _task_names(mod, target) -> list[str]:
    from tvm.s_tir import meta_schedule as ms

    return sorted(task.task_name for task in ms.relax_integration.extract_tasks(mod, target))


def test_load_kernels_are_left_out_unless_asked(tiny):
    """The generator's contractions run once at load: tune leaves them out of the budget by default."""
    from adntn_deploy.compiler.frontend import import_model
    from adntn_deploy.compiler.schedules import fuse_kernels
    from adntn_deploy.compiler.target import tvm_target
    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.tuning import inference_only

    target = tvm_target(resolve_target("host"))
    fused = fuse_kernels(import_model(tiny, "load", prepack_target=target).mod, target)
    everything, per_call = _task_names(fused, target), _task_names(inference_only(fused), target)
    assert per_call and set(per_call) < set(everything)
    assert all("packed" in name or "relu" in name for name in per_call), per_call


def test_builder_pool_outlives_a_batch():
    """Candidates of several batches are built by the same worker processes (no per-batch start-up)."""
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from adntn_deploy.compiler.tuning import build_candidate, persistent_builder

    a = te.placeholder((64,), name="a")
    func = te.create_prim_func([a, te.compute((64,), lambda i: a[i] * 2.0, name="b")])
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    builder = persistent_builder(120, build_candidate, workers=1)
    try:
        pools = []
        for _ in range(2):
            (result,) = builder.build([ms.builder.BuilderInput(tvm.IRModule({"main": func}), target)])
            assert result.error_msg is None and Path(result.artifact_path).exists()
            pools.append(builder.pool)
        assert pools[0] is pools[1]
    finally:
        builder.close()


def _tune_with_default(tmp_path, tiny):
    """Tune ``tiny`` with 1 trial; (records folder, its tuning-record lines, the line index of the default)."""
    from tvm.s_tir import meta_schedule as ms

    from adntn_deploy.compiler.database import copy_database
    from adntn_deploy.compiler.frontend import import_model
    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.schedules import default_schedule, fuse_kernels
    from adntn_deploy.compiler.target import tvm_target
    from adntn_deploy.compiler.tuning import inference_only, record_default_schedules

    records = tmp_path / "records"
    report = tune_model(tiny, "host", records, trials=1, only=["adntn_packed"])
    assert report.defaults == 1 and any("default" in note for note in report.notes)

    target = tvm_target(resolve_target("host"))
    fused = fuse_kernels(import_model(tiny, "load", prepack_target=target).mod, target)
    (task,) = [t for t in ms.relax_integration.extract_tasks(inference_only(fused), target) if "adntn_packed" in t.task_name]
    default_trace = str(default_schedule(task.dispatched[0], target).trace)
    stored = {str(r.trace): float(r.run_secs[0]) for r in ms.database.JSONDatabase(work_dir=str(records)).get_all_tuning_records()}
    assert default_trace in stored, "the default schedule is not among the records"
    lines = (records / "database_tuning_record.json").read_text().splitlines()
    (index,) = [i for i, line in enumerate(lines) if json.loads(line)[1][1][0] == pytest.approx(stored[default_trace], rel=1e-9)]

    # resumed: the default is in the database already, so nothing is built or run (no builder is needed)
    contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts([task], str(tmp_path / "work"))
    copy_database(records, tmp_path / "work")
    assert record_default_schedules(contexts, target, None, None, tmp_path / "work") == (0, [])
    return records, lines, index


def test_records_hold_the_measured_default_schedule(tmp_path, tiny):
    """Tuning measures our rules' untuned default next to the search, so records never lose to it; a resumed
    run keeps it once. (The one real MetaSchedule run of the default suite.)"""
    _tune_with_default(tmp_path, tiny)


@pytest.mark.slow
def test_compile_replays_the_default_when_it_measured_fastest(tmp_path, tiny):
    records, lines, index = _tune_with_default(tmp_path, tiny)
    # make the default the fastest record: compile must replay it, and it still computes the model
    rows = [json.loads(line) for line in lines]
    for i, row in enumerate(rows):
        row[1][1] = [1e-9] if i == index else [1.0]
    (records / "database_tuning_record.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    artifact = compile_model(tiny, "host", tmp_path / "art", tuning_records=records)
    assert artifact.manifest["tuning"]["scheduled_kernels"] >= 1
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    expected, got = load(tiny).run({"input": x}), load(artifact.path).run({"input": x})
    (name,) = expected
    assert relative_error(got[name], expected[name]) < float32_rtol(16)
