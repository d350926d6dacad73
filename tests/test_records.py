"""Shipped tuning records travel: compile picks the best instruction-set profile a target's CPU supports."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adntn_deploy.compiler.target import tvm_target  # noqa: E402
from adntn_deploy.compiler.profiles import host_arch, resolve_target  # noqa: E402
from adntn_deploy.compiler.database import default_records, schedules_dir  # noqa: E402
from adntn_deploy.onnx_export import export_onnx  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402

x86_only = pytest.mark.skipif(host_arch() != "x86_64", reason="x86-64 targets compile only on an x86-64 host here")


def host_isa() -> str | None:
    """The ISA profile this machine's CPU supports, read from /proc/cpuinfo (independently of LLVM)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    if host_arch() == "x86_64":
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            return "x86-64-avx512"
        return "x86-64-avx2" if {"avx2", "fma"} <= flags else None
    return None


def choice(target: str):
    profile = resolve_target(target)
    return default_records(profile, tvm_target(profile))


@x86_only
@pytest.mark.parametrize("target, expected, note", [
    ('{"kind": "llvm", "mcpu": "znver2", "num-cores": 2}', "x86-64-avx2", "znver2 CPU has its instruction set"),
    ('{"kind": "llvm", "mcpu": "haswell"}', "x86-64-avx2", "haswell"),
    ('{"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 8}', "x86-64-avx512", "sapphirerapids"),
    ('{"kind": "llvm", "mcpu": "znver4"}', "x86-64-avx512", "znver4"),
    ('{"kind": "llvm", "mcpu": "core2"}', None, "none of the instruction sets of x86-64-avx512, x86-64-avx2"),
    ("x86-64-avx2", "x86-64-avx2", "records of profile x86-64-avx2"),
    ("x86-64-avx512", "x86-64-avx512", "records of profile x86-64-avx512"),
    ("rpi4", None, "no shipped records for aarch64"),
    ("riscv64", None, "no instruction-set profile for riscv64"),
    ("cuda-sm80", None, "no shipped records for cuda-sm80"),
])
def test_records_chosen_by_instruction_set(target, expected, note):
    chosen = choice(target)
    assert chosen.profile == expected
    assert (chosen.folder == schedules_dir() / expected) if expected else chosen.folder is None
    assert note in chosen.note


def test_host_takes_the_best_profile_its_cpu_supports():
    expected = host_isa()
    chosen = choice("host")
    assert chosen.profile == expected, chosen.note
    if expected is None:
        assert chosen.folder is None and chosen.note.startswith("generic schedules")


@x86_only
def test_an_avx512_cpu_falls_back_to_avx2_records(tmp_path, monkeypatch):
    shutil.copytree(schedules_dir() / "x86-64-avx2", tmp_path / "x86-64-avx2")
    monkeypatch.setenv("ADNTN_SCHEDULES_DIR", str(tmp_path))
    assert choice('{"kind": "llvm", "mcpu": "sapphirerapids"}').profile == "x86-64-avx2"
    assert choice("x86-64-avx512").profile == "x86-64-avx2"  # the profile's own folder is missing: by ISA too


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """The MLP that the shipped records were tuned on (benchmarks/tuning.py), at batch 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    path = tmp_path_factory.mktemp("records") / "mlp-dense-b1.onnx"
    export_onnx(model, [torch.randn(1, 784)], path, input_names=["input"])
    return path


@x86_only
@pytest.mark.parametrize("target", ["host", '{"kind": "llvm", "mcpu": "znver2", "num-cores": 2}'])
def test_records_tuned_on_another_cpu_schedule_every_kernel(tmp_path, mlp, cli_runner, target):
    expected = host_isa() if target == "host" else "x86-64-avx2"
    if expected is None:
        pytest.skip("this CPU has neither AVX-512 nor AVX2: no shipped records apply to it")
    proc = cli_runner("compile", mlp, "--target", target, "-o", tmp_path / "art", "--json")
    assert proc.returncode == 0, proc.stderr
    tuning = json.loads(proc.stdout)["tuning"]
    assert tuning["records_profile"] == expected and expected in tuning["records_note"]
    assert tuning["scheduled_kernels"] == tuning["kernels"] > 0
    x = np.random.default_rng(0).standard_normal((1, 784)).astype(np.float32)
    want = load(mlp).run({"input": x})
    got = load(tmp_path / "art").run({"input": x})
    (name,) = want
    # float32, two layers of 784- and 1024-term sums (see tests/tolerance.py)
    from tolerance import float32_rtol, relative_error
    assert relative_error(got[name], want[name]) < float32_rtol(784, 1024, 1024)


def test_compile_says_which_records_it_applied(tmp_path, mlp, cli_runner):
    if host_arch() != "x86_64":
        pytest.skip("an x86-64 JSON target compiles only on an x86-64 host here")
    proc = cli_runner("compile", mlp, "--target", '{"kind": "llvm", "mcpu": "core2"}', "-o", tmp_path / "art")
    assert proc.returncode == 0, proc.stderr
    assert "untuned (generic schedules: this core2 CPU has none of the instruction sets" in proc.stdout


def test_a_compile_copies_only_its_own_workloads(tmp_path):
    """Only the workloads asked for (and their records, renumbered) are read, checked and copied."""
    from adntn_deploy.compiler.database import DB_FILES, copy_database

    source = schedules_dir() / "x86-64-avx512"
    workloads = [line for line in (source / DB_FILES[0]).read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in (source / DB_FILES[1]).read_text().splitlines() if line.strip()]
    picked = [2, 5]
    hashes = {json.loads(workloads[i])[0] for i in picked}
    assert copy_database(source, tmp_path / "db", workloads_of=hashes) == 2
    copied = [line for line in (tmp_path / "db" / DB_FILES[0]).read_text().splitlines() if line.strip()]
    assert copied == [workloads[i] for i in picked]
    got = [json.loads(line) for line in (tmp_path / "db" / DB_FILES[1]).read_text().splitlines() if line.strip()]
    want = [[picked.index(r[0]), r[1]] for r in records if r[0] in picked]
    assert got == want and got
    assert copy_database(source, tmp_path / "none", workloads_of=set()) == 0


def test_records_apply_by_the_kernels_own_hashes(tmp_path, mlp):
    """The hashes a compile computes for its kernels are the ones MetaSchedule filed them under: the MLP's
    kernels, tuned into the shipped database, are all found (and scheduled) through the filtered copy."""
    from adntn_deploy.compiler.database import apply_records, workload_hashes
    from adntn_deploy.compiler.frontend import import_model
    from adntn_deploy.compiler.schedules import fuse_kernels

    target = tvm_target(resolve_target("x86-64-avx512"))
    fused = fuse_kernels(import_model(mlp, "load", prepack_target=target).mod, target)
    shipped = {json.loads(line)[0] for line in (schedules_dir() / "x86-64-avx512" / "database_workload.json").read_text().splitlines()
               if line.strip()}
    mine = workload_hashes(fused)
    assert mine & shipped
    _, scheduled, _ = apply_records(fused, target, schedules_dir() / "x86-64-avx512")
    assert scheduled == len(mine & shipped)


@pytest.mark.parametrize("profile", ["x86-64-avx2", "x86-64-avx512"])
def test_shipped_databases_hold_each_kernel_once(profile):
    """No two workload lines of a shipped database share a structural hash: MetaSchedule would file the
    records of every workload tuned into it later under the wrong index (see merge_equal_workloads)."""
    lines = (schedules_dir() / profile / "database_workload.json").read_text().splitlines()
    hashes = [json.loads(line)[0] for line in lines if line.strip()]
    assert len(hashes) == len(set(hashes))


def _adds(n, name):
    """A PrimFunc y = x + 1 over n floats, its buffers named after ``name`` (same TIR, other names)."""
    from tvm import te

    x = te.placeholder((n,), name=f"x_{name}")
    return te.create_prim_func([x, te.compute((n,), lambda i: x[i] + 1.0, name=f"y_{name}")])


def test_tuning_into_a_database_with_a_kernel_twice_files_new_records_right(tmp_path):
    """A database holding one kernel under two serialisations (other buffer names) is merged to one line
    before new workloads are added: the record of a kernel added afterwards names that kernel, and TVM
    reads the database back. Unmerged, TVM files the new record under an earlier line's index."""
    import tvm_ffi
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    from adntn_deploy.compiler.database import DB_FILES, merge_equal_workloads
    from adntn_deploy.compiler.tuning import same_kernel

    def workload_line(func, folder):
        folder.mkdir()
        db = ms.database.JSONDatabase(str(folder / DB_FILES[0]), str(folder / DB_FILES[1]))
        db.commit_workload(tvm.IRModule({"main": func}))
        return (folder / DB_FILES[0]).read_text()

    first = workload_line(_adds(16, "a"), tmp_path / "a")
    second = workload_line(_adds(16, "b"), tmp_path / "b")
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    (db_dir / DB_FILES[0]).write_text(first + second)
    (db_dir / DB_FILES[1]).write_text("")
    assert json.loads(first)[0] == json.loads(second)[0] and first != second  # one hash, two lines
    assert merge_equal_workloads(db_dir, same_kernel) == 1
    assert len((db_dir / DB_FILES[0]).read_text().splitlines()) == 1

    other = tvm.IRModule({"main": _adds(32, "c")})
    db = ms.database.JSONDatabase(str(db_dir / DB_FILES[0]), str(db_dir / DB_FILES[1]))
    target = tvm.target.Target("llvm")
    db.commit_tuning_record(ms.database.TuningRecord(s_tir.Schedule(other).trace, db.commit_workload(other), [1e-6],
                                                     target, ms.arg_info.ArgInfo.from_prim_func(other["main"])))
    reread = ms.database.JSONDatabase(str(db_dir / DB_FILES[0]), str(db_dir / DB_FILES[1]), allow_missing=False)
    (record,) = reread.get_all_tuning_records()
    assert tvm_ffi.structural_equal(record.workload.mod, other)
