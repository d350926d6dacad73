"""Refreshing tuning records: old packed-conv and packed-dense records get today's schedule with their own
register block."""

from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

from adntn_deploy.compiler.database import DB_FILES  # noqa: E402
from adntn_deploy.compiler.errors import TuningError  # noqa: E402
from adntn_deploy.compiler.refresh import refresh_records  # noqa: E402
from adntn_deploy.compiler.schedules import packed_conv2d  # noqa: E402

AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
REPO = Path(__file__).resolve().parents[1]


def _conv_func(width=8):
    """A standalone packed 3x3 conv kernel, 16 -> 32 channels at 7x7 (input already padded)."""
    from tvm import te

    from adntn_deploy.compiler.schedules.common import int64_placeholder

    xp = int64_placeholder((1, 16, 9, 9), "xp")
    wp = int64_placeholder((32 // width, 16, 3, 3, width), "wp")
    out = packed_conv2d.packed_conv2d_te(xp, wp, 32, 1, (7, 7), (1, 1), (1, 1))
    return te.create_prim_func([xp, wp, out]).with_attr("global_symbol", "main")


def _unrolls(trace) -> int:
    return sum(inst.kind.name == "Unroll" for inst in trace.insts)


def _old_rule_trace(func, row_block, panel_block):
    """The trace the rule gave before it unrolled filter taps: today's, less the tap loops' Unroll steps and
    the rule-version stamp."""
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    packed_conv2d.schedule(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME), row_block, panel_block, decided=True)
    trace = sch.trace
    unrolls = [inst for inst in trace.insts if inst.kind.name == "Unroll"]
    tap_unrolls = unrolls[2:]  # after the tile's own row and panel loops
    assert tap_unrolls, "today's rule unrolls this kernel's taps"
    kept = [inst for inst in trace.insts if not any(inst.same_as(tap) for tap in tap_unrolls)
            and inst.kind.name != "Annotate"]
    return s_tir.schedule.Trace(kept, {inst: trace.decisions[inst] for inst in kept if inst in trace.decisions})


def _database(folder: Path, records):
    """A JSON database in ``folder`` holding ``records``: (func, trace, run seconds) each."""
    from tvm.s_tir import meta_schedule as ms

    folder.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(folder))
    target = tvm.target.Target(AVX2)
    for func, trace, seconds in records:
        workload = db.commit_workload(tvm.IRModule({"main": func}))
        db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [seconds], target,
                                                         ms.arg_info.ArgInfo.from_prim_func(func)))


def _other_func():
    from tvm import te

    a = te.placeholder((4, 4), name="a")
    b = te.compute((4, 4), lambda i, j: a[i, j] * 2.0, name="double")
    return te.create_prim_func([a, b]).with_attr("global_symbol", "main")


def _records(folder: Path):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(work_dir=str(folder)).get_all_tuning_records()


@pytest.mark.parametrize("row_block, panel_block", [(7, 1), (1, 4), (7, 2)])
def test_old_conv_records_get_the_tap_unroll_and_keep_their_block(tmp_path, row_block, panel_block):
    from tvm import s_tir

    func = _conv_func()
    other = s_tir.Schedule(tvm.IRModule({"main": _other_func()}))
    _database(tmp_path, [(func, _old_rule_trace(func, row_block, panel_block), 2.5e-5), (_other_func(), other.trace, 1e-6)])
    before = (tmp_path / DB_FILES[1]).read_bytes().splitlines()
    workloads = (tmp_path / DB_FILES[0]).read_bytes()

    report = refresh_records(tmp_path)

    assert (report.refreshed, report.unchanged, report.other) == (1, 0, 1)
    after = (tmp_path / DB_FILES[1]).read_bytes().splitlines()
    assert after[1] == before[1]  # another rule's record: byte for byte
    conv = next(r for r in _records(tmp_path) if "packed_conv2d" in str(r.trace))
    sampled = [conv.trace.decisions[i] for i in conv.trace.insts if i.kind.name == "SamplePerfectTile"]
    assert [int(d[-1]) for d in sampled] == [row_block, panel_block]
    assert float(conv.run_secs[0]) == pytest.approx(2.5e-5)
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    packed_conv2d.schedule(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME), row_block, panel_block)
    assert _unrolls(conv.trace) == _unrolls(sch.trace)  # the same unrolled loops as today's rule gives
    assert (tmp_path / DB_FILES[0]).read_bytes() == workloads

    again = refresh_records(tmp_path)
    assert (again.refreshed, again.unchanged, again.other) == (0, 1, 1)
    assert (tmp_path / DB_FILES[1]).read_bytes().splitlines() == after


def test_a_refreshed_record_builds_a_correct_kernel(tmp_path):
    from tvm import s_tir

    func = _conv_func()
    _database(tmp_path, [(func, _old_rule_trace(func, 7, 1), 1e-5)])
    refresh_records(tmp_path)
    (record,) = _records(tmp_path)
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    ex = tvm.compile(sch.mod, target=tvm.target.Target(AVX2))
    rng = np.random.default_rng(0)
    xp = rng.standard_normal((1, 16, 9, 9)).astype(np.float32)
    wp = rng.standard_normal((4, 16, 3, 3, 8)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 32, 7, 7), np.float32))
    ex.mod["main"](tvm.runtime.tensor(xp), tvm.runtime.tensor(wp), out)
    windows = np.lib.stride_tricks.sliding_window_view(xp[0], (3, 3), axis=(1, 2))
    want = np.einsum("chwrs,pcrsj->pjhw", windows, wp).reshape(1, 32, 7, 7)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("profile", ["x86-64-avx2", "x86-64-avx512"])
def test_shipped_records_are_current(tmp_path, profile):
    """Every shipped packed-conv record replays today's rule (else: adntn-deploy refresh-records schedules/PROFILE)."""
    import shutil

    folder = tmp_path / profile
    shutil.copytree(REPO / "schedules" / profile, folder)
    report = refresh_records(folder)
    assert report.refreshed == 0 and report.unchanged > 0, report


def test_a_folder_without_a_database_is_refused(tmp_path):
    with pytest.raises(TuningError, match="not a tuning database"):
        refresh_records(tmp_path)


def test_refresh_records_command(tmp_path):
    """The CLI: counts (text and --json) for a database, one line and exit 1 for a folder that is not one."""
    import json
    import subprocess
    import sys

    func = _conv_func()
    _database(tmp_path / "db", [(func, _old_rule_trace(func, 7, 1), 1e-5)])
    cli = [sys.executable, "-m", "adntn_deploy.cli.main", "refresh-records"]
    done = subprocess.run([*cli, str(tmp_path / "db"), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"records": str(tmp_path / "db"), "refreshed": 1, "unchanged": 0, "other_rules": 0}
    done = subprocess.run([*cli, str(tmp_path / "db")], capture_output=True, text=True, timeout=300)
    assert "0 record(s) refreshed, 1 already current" in done.stdout
    (tmp_path / "empty").mkdir()
    done = subprocess.run([*cli, str(tmp_path / "empty")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "not a tuning database" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_compile_applies_old_records_with_todays_schedule_and_leaves_them_alone(tmp_path):
    """A user's database tuned before the tap unroll: compile replays the record's block through today's
    rule in its private copy, says so, matches ORT, and leaves the user's folder byte for byte."""
    from torch import nn
    from tvm import s_tir

    from exporting import export_seeded
    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.compiler.frontend import import_model
    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.schedules import fuse_kernels
    from adntn_deploy.compiler.target import tvm_target
    from adntn_deploy.runtime import load

    model = export_seeded(lambda: nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()), (1, 16, 7, 7),
                          tmp_path / "conv.onnx")
    target = tvm_target(resolve_target("host"))
    fused = fuse_kernels(import_model(model, "load", prepack_target=target).mod, target)

    def has_conv(func):
        try:
            s_tir.Schedule(func).get_sblock(packed_conv2d.BLOCK_NAME)
            return True
        except Exception:  # noqa: BLE001 - no such block
            return False

    (conv,) = [f.with_attr("global_symbol", "main") for _, f in fused.functions_items()
               if type(f).__name__ == "PrimFunc" and has_conv(f)]
    _database(tmp_path / "rec", [(conv, _old_rule_trace(conv, 7, 1), 1e-5)])
    before = {name: (tmp_path / "rec" / name).read_bytes() for name in DB_FILES}

    notes = []
    artifact = compile_model(model, "host", tmp_path / "art", tuning_records=tmp_path / "rec", notes=notes.append)

    assert any("1 tuning record(s)" in note and "older adntn-deploy" in note for note in notes), notes
    assert artifact.manifest["tuning"]["scheduled_kernels"] >= 1
    assert {name: (tmp_path / "rec" / name).read_bytes() for name in DB_FILES} == before
    x = {"input": np.random.default_rng(0).standard_normal((1, 16, 7, 7)).astype(np.float32)}
    (want,) = load(model).run(x).values()
    (got,) = load(tmp_path / "art").run(x).values()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_best_only_refreshes_the_record_a_compile_applies(tmp_path):
    func = _conv_func()
    _database(tmp_path, [(func, _old_rule_trace(func, 1, 4), 3e-5), (func, _old_rule_trace(func, 7, 1), 1e-5)])
    before = (tmp_path / DB_FILES[1]).read_bytes().splitlines()
    report = refresh_records(tmp_path, best_only=True)
    assert (report.refreshed, report.not_best) == (1, 1)
    after = (tmp_path / DB_FILES[1]).read_bytes().splitlines()
    assert after[0] == before[0] and after[1] != before[1]  # the slower (1 x 4) record is left as it was


def test_prune_keeps_the_record_a_compile_applies(tmp_path):
    """refresh-records --prune: each kernel keeps only its fastest record; the workloads stay; a second prune
    removes nothing."""
    import json
    import subprocess
    import sys

    func, other = _conv_func(), _conv_func(width=16)
    _database(tmp_path, [(func, _old_rule_trace(func, 1, 4), 3e-5), (func, _old_rule_trace(func, 7, 1), 1e-5),
                         (other, _old_rule_trace(other, 7, 1), 2e-5)])
    workloads = (tmp_path / DB_FILES[0]).read_bytes()
    cli = [sys.executable, "-m", "adntn_deploy.cli.main", "refresh-records", str(tmp_path), "--prune", "--json"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pruned"] == 1
    kept = [json.loads(line) for line in (tmp_path / DB_FILES[1]).read_text().splitlines()]
    assert sorted((index, float(record[1][0])) for index, record in kept) == [(0, 1e-5), (1, 2e-5)]
    assert (tmp_path / DB_FILES[0]).read_bytes() == workloads
    from adntn_deploy.compiler.refresh import prune_records

    assert prune_records(tmp_path) == 0


def test_a_record_of_todays_rule_stays_as_tuned(tmp_path):
    """A stamped record is left byte for byte, even where it differs from what a refresh would derive
    (MetaSchedule mutates a tuned trace's block without re-deriving the unroll or the K-blocking chunk)."""
    from tvm import s_tir

    func = _conv_func()
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    packed_conv2d.schedule(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME), 7, 1, decided=True)
    trace = sch.trace
    mutated = [inst for inst in trace.insts if inst.kind.name != "Unroll"]  # as if tuned from another block
    _database(tmp_path, [(func, s_tir.schedule.Trace(mutated, {i: trace.decisions[i] for i in mutated if i in trace.decisions}),
                          1e-5)])
    before = (tmp_path / DB_FILES[1]).read_bytes()
    report = refresh_records(tmp_path)
    assert (report.refreshed, report.unchanged) == (0, 1)
    assert (tmp_path / DB_FILES[1]).read_bytes() == before


def _dense_func(rows=16, depth=1024, out_dim=512, width=32):
    """A standalone packed dense kernel that today's rule K-blocks with a 4 x 2 block."""
    from tvm import te

    from adntn_deploy.compiler.schedules import packed_dense
    from adntn_deploy.compiler.schedules.common import int64_placeholder

    x = int64_placeholder((rows, depth), "x")
    wp = int64_placeholder((out_dim // width, depth, width), "wp")
    return te.create_prim_func([x, wp, packed_dense.packed_dense_te(x, wp, out_dim)]).with_attr("global_symbol", "main")


def test_old_dense_records_get_k_blocking_and_keep_their_block(tmp_path, monkeypatch):
    """A packed-dense record from before K-blocking (rule version 1: no stamp, one reduction) is replayed
    through today's rule with its own block: its reduction is split, and its kernel equals numpy."""
    from tvm import s_tir

    from adntn_deploy.compiler.schedules import packed_dense

    func = _dense_func()
    with monkeypatch.context() as patch:  # the rule as it was: no chunk, no stamp
        patch.setattr(packed_dense, "reduce_chunk", lambda *args: None)
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        packed_dense.schedule(sch, sch.get_sblock(packed_dense.BLOCK_NAME), 4, 2, decided=True)
    old = [inst for inst in sch.trace.insts if inst.kind.name != "Annotate"]
    _database(tmp_path, [(func, s_tir.schedule.Trace(old, {i: sch.trace.decisions[i] for i in old if i in sch.trace.decisions}),
                          1e-4)])

    report = refresh_records(tmp_path)

    assert (report.refreshed, report.unchanged) == (1, 0)
    (record,) = _records(tmp_path)
    splits = lambda trace: sum(inst.kind.name == "Split" for inst in trace.insts)  # noqa: E731
    assert splits(record.trace) == splits(s_tir.schedule.Trace(old, {})) + 1  # the reduction, in chunks
    sampled = [record.trace.decisions[i] for i in record.trace.insts if i.kind.name == "SamplePerfectTile"]
    assert [int(d[-1]) for d in sampled] == [4, 2]
    replay = s_tir.Schedule(tvm.IRModule({"main": func}))
    record.trace.apply_to_schedule(replay, remove_postproc=False)
    ex = tvm.compile(replay.mod, target=tvm.target.Target(AVX2))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    wp = rng.standard_normal((16, 1024, 32)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((16, 512), np.float32))
    ex.mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wp), out)
    np.testing.assert_allclose(out.numpy(), x @ wp.transpose(1, 0, 2).reshape(1024, 512), rtol=1e-3, atol=1e-2)
    assert refresh_records(tmp_path).unchanged == 1


HOLD_LOCK = """
import sys
from pathlib import Path
from adntn_deploy.compiler.database import lock_database
with lock_database(Path(sys.argv[1]), "tune into another folder"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_writers_of_one_database_exclude_each_other(tmp_path, tiny_onnx):
    """While one process writes a database (its lock, held by a real second process here), tune and
    refresh-records on that folder stop at once with one line and exit 1, and the files stay as they were;
    once the holder has gone the folder can be written again."""
    import subprocess
    import sys

    func = _conv_func()
    db = tmp_path / "db"
    _database(db, [(func, _old_rule_trace(func, 7, 1), 1e-5)])
    before = {name: (db / name).read_bytes() for name in DB_FILES}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cli = [sys.executable, "-m", "adntn_deploy.cli.main"]
        commands = [["refresh-records", str(db)],
                    ["tune", str(tiny_onnx("ttn", "linear")), "--target", "host", "--tuning-records", str(db), "--trials", "1"]]
        for command in commands:
            done = subprocess.run([*cli, *command], capture_output=True, text=True, timeout=300)
            assert done.returncode == 1, done.stderr
            assert "is being written by another adntn-deploy process" in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert {name: (db / name).read_bytes() for name in DB_FILES} == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert refresh_records(db).refreshed == 1


def test_a_lock_on_a_new_folder_leaves_nothing_behind(tmp_path):
    from adntn_deploy.compiler.database import lock_database

    with lock_database(tmp_path / "new" / "db", "tune into another folder"):
        assert (tmp_path / "new" / "db").is_dir()
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TuningError, match="cannot use .* as a tuning database folder"):
        with lock_database(tmp_path / "file", "tune into another folder"):
            pass
