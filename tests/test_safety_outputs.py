"""Nothing lost, nothing crashes (issue 20): outputs, artifacts, manifests and JSON depth.

Each test reproduces one defect found by adversarial testing: compile -o deleting a user's folder,
commands writing over their own inputs, tuning databases rewritten in place, deeply nested JSON
crashing TVM's reader and the native runner, and manifests naming files outside the artifact.
The tiny model is compiled twice in all (a module fixture, and the records test).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inprocess import invoke_cli

pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from adntn_deploy.compiler.build import compile_model  # noqa: E402
from adntn_deploy.compiler.bundle import _RUN_SH, is_bundle_dir, make_bundle  # noqa: E402
from adntn_deploy.compiler.database import DB_FILES, clean_database, copy_database, schedules_dir  # noqa: E402
from adntn_deploy.compiler.errors import TuningError  # noqa: E402
from adntn_deploy.compiler.artifact import is_artifact_dir, read_manifest  # noqa: E402
from adntn_deploy.compiler.errors import ArtifactError  # noqa: E402
from adntn_deploy.outputs import OutputError, refuse_overwriting_inputs, replace_output_dir, staging_dir  # noqa: E402
from adntn_deploy.safejson import JsonLimitError, loads_bounded, nesting_depth  # noqa: E402
from adntn_deploy.serving.triton import package_triton  # noqa: E402

CLI = [sys.executable, "-m", "adntn_deploy.cli.main"]
ENV = {**os.environ, "TQDM_DISABLE": "1"}


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    """Exit code 1 (no signal, no traceback) and one line on stderr that contains ``needle``."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert needle in proc.stderr, proc.stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), to prove that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_model(tiny_onnx):
    return tiny_onnx.module("ttn", "linear")  # ADNTNLinear(16 -> 8) + ReLU


@pytest.fixture(scope="module")
def tiny(tiny_onnx):
    return tiny_onnx("ttn", "linear")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny):
    return compile_model(tiny, "host", tmp_path_factory.mktemp("art") / "art").path


# ---- 1. compile -o never deletes what it did not write --------------------------------------------------------

def test_compile_keeps_a_user_folder_that_holds_a_manifest(tmp_path, tiny):
    user = tmp_path / "work"
    user.mkdir()
    (user / "manifest.json").write_text('{"project": "mine"}')
    (user / "notes.txt").write_text("irreplaceable")
    shutil.copy(tiny, user / "tiny.onnx")
    before = snapshot(user)
    with pytest.raises(OutputError, match="not an artifact this tool wrote"):
        compile_model(tiny, "host", user)
    assert snapshot(user) == before


def test_compile_keeps_an_artifact_with_a_user_file_added(tmp_path, tiny, artifact):
    folder = tmp_path / "art"
    shutil.copytree(artifact, folder)
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    with pytest.raises(OutputError, match="choose another output="):
        compile_model(tiny, "host", folder)
    assert snapshot(folder) == before


@pytest.mark.parametrize("output, needle", [
    (".", "current folder"),              # -o . used to empty the folder and then crash
    ("..", "current folder"),
    ("records", "is the input"),          # the tuning records
])
def test_compile_refuses_outputs_over_inputs_and_the_current_folder(tmp_path, tiny, output, needle):
    work = tmp_path / "work"
    (work / "records").mkdir(parents=True)
    shutil.copy(tiny, work / "tiny.onnx")
    for name in DB_FILES:
        (work / "records" / name).write_text("")
    (work / "notes.txt").write_text("mine")
    before = snapshot(work)
    one_line_error(cli("compile", "tiny.onnx", "--target", "host", "-o", output, "--tuning-records", "records", cwd=work), needle)
    assert snapshot(work) == before


def test_compile_refuses_an_output_that_is_or_holds_the_model(tmp_path, tiny):
    model = tmp_path / "tiny.onnx"
    shutil.copy(tiny, model)
    with pytest.raises(OutputError, match="is the input"):
        compile_model(model, "host", model)
    with pytest.raises(OutputError, match="holds the input"):
        compile_model(model, "host", tmp_path)
    assert model.read_bytes() == tiny.read_bytes()


def test_refuse_overwriting_inputs_table(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    folder = tmp_path / "in"
    folder.mkdir()
    os.link(model, tmp_path / "hard.onnx")
    os.symlink(model, tmp_path / "soft.onnx")
    for output, needle in [(model, "is the input"), (tmp_path / "hard.onnx", "is the input"),
                           (tmp_path / "soft.onnx", "is the input"), (tmp_path, "holds the input"),
                           (folder / "sub", "lies inside the input")]:
        with pytest.raises(OutputError, match=needle):
            refuse_overwriting_inputs(output, model, folder)
    refuse_overwriting_inputs(tmp_path / "new", model, folder, None, tmp_path / "missing")


def test_replace_output_dir_replaces_only_ours_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    staging = staging_dir(out)
    (staging / "new").write_text("new")
    with pytest.raises(OutputError, match="choose another output="):
        replace_output_dir(staging, out, lambda p: False)
    assert (out / "old").read_text() == "old" and staging.exists()
    replace_output_dir(staging, out, lambda p: (p / "old").exists())
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["new"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        replace_output_dir(staging_dir(tmp_path / "file"), tmp_path / "file", lambda p: True)


# ---- 2. no command writes over its own inputs ----------------------------------------------------------------------

def test_export_refuses_to_overwrite_its_checkpoint(tmp_path, tiny_model):
    from adntn_deploy.checkpoint import save_checkpoint

    ckpt = tmp_path / "model.ckpt"
    save_checkpoint(ckpt, tiny_model, {"inputs": [{"name": "input", "shape": [1, 16]}]})
    os.link(ckpt, tmp_path / "link.ckpt")
    before = ckpt.read_bytes()
    for output in (ckpt, tmp_path / "link.ckpt"):
        one_line_error(invoke_cli("export", ckpt, "-o", output), "is the input")
    assert ckpt.read_bytes() == before


def test_run_refuses_outputs_over_its_inputs(tmp_path, tiny):
    inputs = tmp_path / "x.npz"
    np.savez(inputs, input=np.ones((1, 16), np.float32))
    before = inputs.read_bytes()
    for outputs in (inputs, tmp_path / "x"):  # numpy.savez appends .npz: "x" writes x.npz too
        one_line_error(invoke_cli("run", tiny, "--inputs", inputs, "--outputs", outputs), "is the input")
    assert inputs.read_bytes() == before


# ---- 3. tuning databases: never modified by compile, rewritten only by rename ------------------------------------

def test_compile_leaves_tuning_records_byte_identical_and_replaces_its_artifact(tmp_path, tiny, artifact):
    records = tmp_path / "records"
    records.mkdir()
    (records / DB_FILES[0]).write_text("")
    (records / DB_FILES[1]).write_text('[0, [[["GetSBlock"')  # an interrupted append (compile used to cut it)
    before = snapshot(records)
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    (out / "model.so").write_bytes(b"damaged")  # still ours: replaced, not refused
    result = compile_model(tiny, "host", out, tuning_records=records)
    assert snapshot(records) == before
    assert is_artifact_dir(out) and read_manifest(out)["tuning"]["records"] == str(records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "records"]  # no staging or old folder left
    from adntn_deploy.runtime import load

    x = np.ones((1, 16), np.float32)
    assert np.allclose(load(result.path).run({"input": x})[result.manifest["outputs"][0]["name"]],
                       load(tiny).run({"input": x})[result.manifest["outputs"][0]["name"]], atol=1e-5)


def test_clean_database_rewrites_by_rename(tmp_path):
    path = tmp_path / DB_FILES[1]
    path.write_bytes(b'[0, [1]]\n[0, [')
    os.link(path, tmp_path / "reader-view")  # what a reader holding the old file sees
    inode = path.stat().st_ino
    clean_database(tmp_path)
    assert path.read_bytes() == b"[0, [1]]\n" and path.stat().st_ino != inode
    assert (tmp_path / "reader-view").read_bytes() == b'[0, [1]]\n[0, ['  # the old file was never written to


def test_shipped_databases_pass_the_checks_unchanged(tmp_path):
    source = schedules_dir() / "x86-64-avx512"
    if not all((source / f).exists() for f in DB_FILES):
        pytest.skip("no shipped x86-64-avx512 database in schedules/")
    copy_database(source, tmp_path)
    for name in DB_FILES:
        assert (tmp_path / name).read_bytes() == (source / name).read_bytes()


# ---- 4. deeply nested JSON: a clean error, never a crash -----------------------------------------------------------

def test_deeply_nested_tuning_records_give_one_line_error_not_a_segfault(tmp_path, tiny):
    records = tmp_path / "records"
    records.mkdir()
    (records / DB_FILES[0]).write_text("")
    (records / DB_FILES[1]).write_text("[" * 100_000 + "\n")
    proc = cli("compile", tiny, "--target", "host", "-o", tmp_path / "art", "--tuning-records", records)
    one_line_error(proc, "deeper than 64 levels")
    assert not (tmp_path / "art").exists()


def _workload_line(ir: bytes) -> str:
    import base64

    return json.dumps(["1", base64.b64encode(len(ir).to_bytes(8, "little") + ir).decode()])


@pytest.mark.parametrize("workloads, records, needle", [
    ("[" * 100_000 + "]" * 100_000 + "\n", "", "deeper than 64"),
    (_workload_line(b"[" * 100_000) + "\n", "", "the IR in"),                         # inside the base64 IR
    (_workload_line(b"{}") + "\n", '[0, [["Annotate", ["b0", "' + "[" * 1000 + '"]]]]\n', "deeper than 64"),
    (_workload_line(b"{}") + "\n", "[5, []]\n", "workload index below 1"),
    ('["1", "not base64!"]\n', "", "not a workload"),
    ("{}\n", "", "not a workload"),
    ("[1,\n", "", "not valid JSON"),
])
def test_malformed_databases_are_refused_before_tvm(tmp_path, workloads, records, needle):
    (tmp_path / DB_FILES[0]).write_text(workloads)
    (tmp_path / DB_FILES[1]).write_text(records)
    with pytest.raises(TuningError, match=needle):
        copy_database(tmp_path, tmp_path / "copy")


@pytest.mark.parametrize("text, ok", [
    ("[" * 64 + "]" * 64, True), ("[" * 65 + "]" * 65, False), ("[" * 100_000, False), ('{"a":' * 65 + "1" + "}" * 65, False),
    ('["' + "[" * 1000 + '"]', True), ('["\\\\", "\\"[[["]', True), ("[}", False), (b"\xff", False),
])
def test_loads_bounded(text, ok):
    if ok:
        loads_bounded(text)
    else:
        with pytest.raises(JsonLimitError):
            loads_bounded(text)
    assert nesting_depth('["' + "[" * 1000 + '"]', strings=True) == 1000


# ---- 5. manifests: names stay inside the artifact, loaded files are listed and hashed -----------------------------

def _mutated(artifact: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "mutated"
    shutil.copytree(artifact, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest, folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _rename_library(manifest, folder, name):
    manifest["files"][name] = manifest["files"].pop(manifest["library"])
    manifest["library"] = name


@pytest.mark.parametrize("change, needle", [
    (lambda m, f: _rename_library(m, f, "../model.so"), "not a plain file name"),
    (lambda m, f: _rename_library(m, f, str(f / "model.so")), "not a plain file name"),
    (lambda m, f: _rename_library(m, f, "sub/model.so"), "not a plain file name"),
    (lambda m, f: m.update(params_file="../params.safetensors"), "not a plain file name"),
    (lambda m, f: m["files"].update({"../../../../etc/passwd": m["files"][m["library"]]}), "not a plain file name"),
    # a file the runtime would load that the manifest does not list (and so does not hash)
    (lambda m, f: (shutil.copy(f / m["library"], f / "other.so"), m.update(library="other.so")), "is not listed"),
    (lambda m, f: m["files"].pop(m["params_file"]), "is not listed"),
    (lambda m, f: m.update(version=[1]), "unknown artifact format/version"),
    (lambda m, f: m.update(inputs=[{"name": "input", "shape": "x", "dtype": "float32"}]), "'inputs' must list"),
])
def test_manifest_names_outside_or_unlisted_are_refused(tmp_path, artifact, change, needle):
    folder = _mutated(artifact, tmp_path, change)
    with pytest.raises(ArtifactError, match=needle):
        read_manifest(folder)
    from adntn_deploy.runtime import load

    with pytest.raises(ArtifactError):
        load(folder)


def test_manifest_file_that_is_a_symlink_out_of_the_folder_is_refused(tmp_path, artifact):
    folder = _mutated(artifact, tmp_path, lambda m, f: None)
    library = read_manifest(folder)["library"]
    outside = tmp_path / "outside.so"
    shutil.move(folder / library, outside)
    os.symlink(outside, folder / library)  # same bytes, same hash: only the containment check catches it
    with pytest.raises(ArtifactError, match="leads outside the artifact folder"):
        read_manifest(folder)


def test_deeply_nested_manifest_is_refused(tmp_path, artifact):
    folder = _mutated(artifact, tmp_path, lambda m, f: None)
    (folder / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(ArtifactError, match="deeper than 64"):
        read_manifest(folder)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
_KEYS = ["format", "version", "files", "library", "params_file", "params", "weights", "device", "arch", "inputs",
         "outputs", "profile"]


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory, artifact):
    folder = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(artifact, folder)
    return folder


def _reads_cleanly(folder: Path, data: bytes) -> None:
    (folder / "manifest.json").write_bytes(data)
    try:
        manifest = read_manifest(folder)
    except ArtifactError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(manifest, dict) and manifest["library"] in manifest["files"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json, raw=st.binary(max_size=64), use_raw=st.booleans())
def test_fuzz_manifest_reader_random_documents(fuzz_folder, value, raw, use_raw):
    _reads_cleanly(fuzz_folder, raw if use_raw else json.dumps(value).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(_KEYS), value=_json, drop=st.booleans())
def test_fuzz_manifest_reader_mutated_fields(fuzz_folder, artifact, key, value, drop):
    manifest = json.loads((artifact / "manifest.json").read_text())
    if drop:
        manifest.pop(key, None)
    else:
        manifest[key] = value
    _reads_cleanly(fuzz_folder, json.dumps(manifest).encode())


# ---- bundle and package: the same rules --------------------------------------------------------------------------

def test_bundle_refuses_user_folders_and_paths_over_its_artifact(tmp_path, artifact):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a bundle this tool wrote"):
        make_bundle(artifact, user)
    for output in (artifact, artifact / "bundle", artifact.parent):
        with pytest.raises(OutputError, match="input"):
            make_bundle(artifact, output)
    assert (user / "notes.txt").read_text() == "mine" and is_artifact_dir(artifact)


def test_is_bundle_dir_accepts_only_our_layout(tmp_path, artifact):
    bundle = tmp_path / "b"
    bundle.mkdir()
    shutil.copytree(artifact, bundle / "artifact")
    for name in ("adntn-runner", "libtvm_runtime.so", "libtvm_ffi.so"):
        (bundle / name).write_bytes(b"\x7fELF")
    (bundle / "run.sh").write_text(_RUN_SH)
    assert is_bundle_dir(bundle)
    (bundle / "artifact" / "extra.txt").write_text("mine")
    assert not is_bundle_dir(bundle)
    (bundle / "artifact" / "extra.txt").unlink()
    (bundle / "run.sh").write_text(_RUN_SH + "# edited\n")
    assert not is_bundle_dir(bundle)


def test_package_never_overwrites_what_it_did_not_write(tmp_path, tiny):
    repo = tmp_path / "repo"
    folder = package_triton(tiny, repo, name="m", version=1)
    package_triton(tiny, repo, name="m", version=2)
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "config.pbtxt"]
    assert [p.name for p in repo.iterdir()] == ["m"]  # no staging folder left
    with pytest.raises(OutputError, match="exists"):
        package_triton(tiny, repo, name="m", version=1)
    config = folder / "config.pbtxt"
    config.write_text(config.read_text() + "dynamic_batching { }\n")  # edited by hand: never overwritten
    with pytest.raises(OutputError, match="differs"):
        package_triton(tiny, repo, name="m", version=3)
    assert config.read_text().endswith("dynamic_batching { }\n")
    (folder / "README").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        package_triton(tiny, repo, name="m", version=3)
    assert (folder / "README").read_text() == "mine" and not (folder / "3").exists()


# ---- the native runner: depth bound, containment, hashes -----------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, artifact):
    if shutil.which("g++") is None:
        pytest.skip("needs a host C++ compiler: apt-get install g++")
    return make_bundle(artifact, tmp_path_factory.mktemp("bundle") / "bundle")


def _runner_case(bundle: Path, tmp_path: Path, change) -> subprocess.CompletedProcess:
    from safetensors.numpy import save_file

    folder = tmp_path / "art"
    shutil.copytree(bundle / "artifact", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    text = change(manifest, folder)
    (folder / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(manifest))
    save_file({"input": np.ones((1, 16), np.float32)}, str(tmp_path / "in.safetensors"))
    return subprocess.run([str(bundle / "adntn-runner"), str(folder), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=120)


def _tamper(folder: Path, name: str, at: int = -1) -> None:
    data = bytearray((folder / name).read_bytes())
    data[at] ^= 0xFF
    (folder / name).write_bytes(bytes(data))


def _truncate_and_rehash(manifest: dict, folder: Path) -> None:
    """A params file cut short by a broken writer that still recorded its hash: a parse error, not a
    modification."""
    path = folder / manifest["params_file"]
    path.write_bytes(path.read_bytes()[:-4])
    manifest["files"][manifest["params_file"]]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("change, needle", [
    (lambda m, f: None, None),  # the artifact as compile wrote it runs (its hashes match)
    (lambda m, f: "[" * 100_000, "nested deeper than 64"),
    (lambda m, f: _rename_library(m, f, "../model.so"), "not a plain file name"),
    (lambda m, f: m.update(params_file="/etc/passwd"), "not a plain file name"),
    (lambda m, f: (shutil.copy(f / m["library"], f / "other.so"), m.update(library="other.so")), "is not listed"),
    (lambda m, f: _tamper(f, m["library"]), "sha256 mismatch"),
    (lambda m, f: _tamper(f, m["params_file"]), "sha256 mismatch"),
    (lambda m, f: _tamper(f, m["params_file"], at=0), "sha256 mismatch"),  # the header length: the parse fails first
    (_truncate_and_rehash, "data_offsets do not match"),
    (lambda m, f: (shutil.move(f / m["library"], f.parent / "outside.so"), os.symlink(f.parent / "outside.so", f / m["library"])),
     "leads outside"),
])
def test_runner_bounds_json_and_loads_only_listed_files(bundle, tmp_path, change, needle):
    proc = _runner_case(bundle, tmp_path, change)
    if needle is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 1 and needle in proc.stderr and proc.stderr.count("\n") == 1, (proc.returncode, proc.stderr)


def test_hashes_in_manifest_match_files(artifact):
    manifest = read_manifest(artifact)
    for name, info in manifest["files"].items():
        assert hashlib.sha256((artifact / name).read_bytes()).hexdigest() == info["sha256"]
