"""TVM stage: profiles, compiling for the host and for edge targets, the TVM predictor, bad input."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from torch import nn  # noqa: E402

from adntn_deploy.compiler.build import compile_model  # noqa: E402
from adntn_deploy.compiler.errors import CompileError  # noqa: E402
from adntn_deploy.compiler.profiles import ProfileError, list_profiles, resolve_target  # noqa: E402
from adntn_deploy.compiler.errors import ArtifactError  # noqa: E402
from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear  # noqa: E402
from adntn_deploy.onnx_export import export_onnx  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402
from tolerance import assert_rel_close, float32_rtol, relative_error  # noqa: E402

FAMILIES = ["ttn", "attn", "mera"]
ELF_MACHINE = {"x86_64": 62, "aarch64": 183, "armv7l": 40, "riscv64": 243}
#: float32 bounds from the models' reduction lengths (tests/tolerance.py)
RTOL = {"linear": float32_rtol(64, 32), "conv": float32_rtol(27, 128)}


def elf_machine(path):
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return struct.unpack("<H", header[18:20])[0]


def models(family, layout="split"):
    torch.manual_seed(0)
    linear = nn.Sequential(ADNTNLinear(64, 32, family=family, bond_dim=3, layout=layout), nn.GELU(),
                           ADNTNLinear(32, 10, family=family, layout=layout))
    conv = nn.Sequential(ADNTNConv2d(3, 8, 3, padding=1, family=family, bond_dim=2, layout=layout), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), ADNTNLinear(8 * 4 * 4, 6, family=family, layout=layout))
    return {"linear": (linear.eval(), (1, 64)), "conv": (conv.eval(), (1, 3, 8, 8))}


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    model, shape = models("mera")["linear"]
    path = tmp_path_factory.mktemp("c") / "small.onnx"
    export_onnx(model, [torch.randn(2, 64)], path, input_names=["input"], dynamic_batch=True)
    return path


@pytest.mark.parametrize(
    "spec, arch, device",
    [("host", "native", "cpu"), ("rpi4", "aarch64", "cpu"), ("raspberry-pi/4b-aarch64", "aarch64", "cpu"),
     ('{"kind": "llvm", "mtriple": "riscv64-unknown-linux-gnu", "mcpu": "sifive-u74"}', "riscv64", "cpu"),
     ("nvidia/jetson-agx-orin-64gb", "aarch64", "cuda"), ("cuda-sm90", "x86_64", "cuda")],
)
def test_target_resolution(spec, arch, device):
    profile = resolve_target(spec)
    assert (profile.arch, profile.device) == (arch, device)


def test_required_profiles_exist():
    names = {p.name for p in list_profiles()}
    assert {"host", "x86-64-avx2", "aarch64", "rpi4", "rpi5", "armv7-neon-hf", "riscv64", "cuda-sm80", "cuda-sm90",
            "jetson-orin", "opencl-adreno"} <= names
    orin = resolve_target("jetson-orin")
    assert orin.target["arch"] == "sm_87" and orin.target["host"]["mcpu"] == "cortex-a78"


@pytest.mark.parametrize("spec, message", [("no-such-board", "unknown target"), ("{bad json", "invalid"),
                                           ('{"mcpu": "x"}', "'kind'")])
def test_bad_targets(spec, message):
    with pytest.raises(ProfileError, match=message):
        resolve_target(spec)


@pytest.mark.parametrize("spec, message", [
    ('{"kind": "llvm", "mcpu": "nosuchcpu"}', "LLVM knows no CPU 'nosuchcpu' for x86_64"),
    ('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a27"}', "did you mean cortex-a78, cortex-a77"),
    ('{"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm", "mcpu": "znver9"}}', "no CPU 'znver9'"),
])
def test_an_unknown_cpu_is_refused_not_built_generic(spec, message, capfd):
    """LLVM took an unknown -mcpu with an error line per kernel and built for its generic CPU: a typo gave a
    slow artifact and exit 0. Now one error, with the closest names; LLVM's own lines stay off the terminal."""
    from adntn_deploy.compiler.target import tvm_target

    with pytest.raises(ProfileError, match=message):
        tvm_target(resolve_target(spec))
    assert "llvm_instance" not in capfd.readouterr().err


def test_every_shipped_profile_names_a_cpu_llvm_knows():
    from adntn_deploy.compiler.target import tvm_target

    for profile in list_profiles():
        tvm_target(profile)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("weights, layout", [("load", "split"), ("fold", "split"), ("load", "operator"), ("fold", "operator")])
def test_tvm_matches_onnxruntime_and_torch(tmp_path, family, kind, weights, layout):
    model, shape = models(family, layout)[kind]
    path = tmp_path / "m.onnx"
    export_onnx(model, [torch.randn(*shape)], path, input_names=["input"])
    artifact = compile_model(path, "host", tmp_path / "art", weights=weights)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    tvm_out = load(artifact.path).run({"input": x})
    ort_out = load(path).run({"input": x})
    (name,) = tvm_out
    assert_rel_close(tvm_out[name], expected, RTOL[kind], "TVM vs torch")
    assert_rel_close(tvm_out[name], ort_out[name], RTOL[kind], "TVM vs ONNX Runtime")


def test_load_artifact_holds_cores_and_fold_holds_dense(tmp_path):
    model = nn.Sequential(ADNTNLinear(512, 512, family="ttn", bias=False)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, [torch.randn(1, 512)], path, input_names=["input"])
    load_art = compile_model(path, "host", tmp_path / "load", weights="load")
    fold_art = compile_model(path, "host", tmp_path / "fold", weights="fold")
    params = load_art.manifest["files"]["params.safetensors"]["bytes"]
    assert params < 4 * model[0].generator.params + 4096
    assert fold_art.manifest["files"]["model.so"]["bytes"] > 4 * 512 * 512
    assert load_art.manifest["files"]["model.so"]["bytes"] < 4 * 512 * 512


#: what a fresh process measures of its resident set after loading an artifact and at the peak while
#: loading (MiB, from /proc; the peak counter is reset first where the kernel allows it)
_RESIDENT_AFTER_LOAD = """
import sys
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
import numpy, tvm, safetensors
from tvm import relax
from adntn_deploy.runtime.tvm import TvmPredictor
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS, so the peak is the load's own
    peak_counter_reset = True
except OSError:  # some kernels and sandboxes refuse it: the peak is then not measurable here
    peak_counter_reset = False
before = status("VmRSS")
predictor = TvmPredictor(sys.argv[1])
peak = status("VmHWM") - before if peak_counter_reset else float("nan")
print(status("VmRSS") - before, peak, predictor.resident_weight_bytes / 2**20)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set from Linux's /proc")
@pytest.mark.parametrize("generated", [True, False], ids=["generated", "dense"])
def test_loading_keeps_one_copy_of_the_weights_resident(tmp_path, generated):
    """After load the process holds the weights once: the generators' and the packing's intermediates
    (each a weight's size) are returned, not cached in the runtime's memory pool (they were: 2x). While
    loading it holds them at most twice (the stored or generated weight and its packed copy; a stored one
    was held three times: safetensors' mapping, its numpy copy and TVM's copy)."""
    torch.manual_seed(0)
    layer = ADNTNLinear(2048, 2048, family="ttn", layout="operator", bond_dim=2, max_mode=4, bias=False).eval()
    model = nn.Sequential(layer if generated else layer.to_dense()).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, [torch.randn(1, 2048)], path, input_names=["input"])
    artifact = compile_model(path, "host", tmp_path / "art", weights="load")
    done = subprocess.run([sys.executable, "-c", _RESIDENT_AFTER_LOAD, str(artifact.path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown, peak, weights = (float(v) for v in done.stdout.split())
    assert weights == 16.0
    assert grown < 1.4 * weights, f"{grown:.1f} MiB resident after loading {weights:.0f} MiB of weights"
    if peak != peak:  # nan
        pytest.skip("this kernel refuses /proc/self/clear_refs, so the load peak cannot be measured; "
                    "the resident set after load was checked")
    assert peak < 2.4 * weights, f"{peak:.1f} MiB at the peak of loading {weights:.0f} MiB of weights"


def test_integer_inputs_keep_their_dtype_in_the_manifest(tmp_path):
    """An embedding lookup's int64 ids: the manifest said float32 for every input, so running the artifact
    failed inside TVM ("expect Tensor with dtype int64") instead of taking the ids."""
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"]), helper.make_node("Relu", ["rows"], ["out"])], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 3])],
        [onnx.numpy_helper.from_array(table, "table")])
    path = tmp_path / "embed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    artifact = compile_model(path, "host", tmp_path / "art")
    assert artifact.manifest["inputs"] == [{"name": "ids", "shape": [1, 4], "dtype": "int64"}]
    ids = np.array([[3, 0, 9, 3]], np.int64)
    (got,) = load(artifact.path).run({"ids": ids}).values()
    np.testing.assert_array_equal(got, table[ids])


_WITHOUT_TORCH = """
import sys
from pathlib import Path
import numpy as np
from adntn_deploy.compiler.build import compile_model
from adntn_deploy.runtime import load
artifact = compile_model(Path(sys.argv[1]), "host", Path(sys.argv[2]))
outputs = load(artifact.path).run({"input": np.ones((1, 64), np.float32)})
print("torch imported" if "torch" in sys.modules else "torch not imported")
import torch, tvm
assert tvm.runtime.from_dlpack(torch.arange(4, dtype=torch.float32)).numpy().tolist() == [0, 1, 2, 3]
print("torch works after")
"""


def test_compile_and_run_leave_torch_unimported(tmp_path, small_onnx):
    """Compiling an ONNX file and running the artifact never need torch, and tvm_ffi no longer imports it
    on the way (it cost 1.4 s and 200 MiB per process); torch imports and hands tensors to TVM after."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, str(small_onnx), str(tmp_path / "art")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["torch not imported", "torch works after"], done.stdout


CROSS = [p.name for p in list_profiles() if p.is_cross and p.device == "cpu"]


@pytest.mark.parametrize("profile", CROSS)
def test_cross_compile_links_for_the_board(tmp_path, small_onnx, profile):
    target = resolve_target(profile)
    if shutil.which(target.cross_compiler) is None:
        pytest.skip(f"{target.cross_compiler} missing: apt-get install {target.cross_compiler_package}")
    artifact = compile_model(small_onnx, profile, tmp_path / "art")
    assert elf_machine(artifact.path / "model.so") == ELF_MACHINE[target.arch]
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["arch"] == target.arch and manifest["weights"] == "load"
    with pytest.raises(ArtifactError, match=f"built for {target.arch}"):
        load(artifact.path)


@pytest.mark.parametrize("profile", ["cuda-sm80", "cuda-sm90", "jetson-orin", "opencl-adreno"])
def test_gpu_profiles_compile_and_export(tmp_path, small_onnx, profile):
    target = resolve_target(profile)
    if target.cross_compiler and shutil.which(target.cross_compiler) is None:
        pytest.skip(f"{target.cross_compiler} missing: apt-get install {target.cross_compiler_package}")
    artifact = compile_model(small_onnx, profile, tmp_path / "art")
    host = "x86_64" if target.arch == "x86_64" else target.arch
    assert elf_machine(artifact.path / "model.so") == ELF_MACHINE[host]
    assert artifact.manifest["device"] == target.device


@pytest.mark.slow
@pytest.mark.parametrize("profile, arch", [("cuda-sm80", "sm_80"), ("jetson-orin", "sm_87"), ("cuda-sm90", "sm_90")])
def test_generated_cuda_source_compiles_with_nvcc(tmp_path, small_onnx, monkeypatch, profile, arch):
    """What ``compile --target <GPU profile>`` builds (compile_model's whole pipeline: import, lifting, kernel
    fusion, schedules, TVM's default Relax pipeline) is CUDA source that nvcc compiles for the profile's GPU."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: install the CUDA toolkit to check generated CUDA code")
    target = resolve_target(profile)
    if target.cross_compiler and shutil.which(target.cross_compiler) is None:
        pytest.skip(f"{target.cross_compiler} missing: apt-get install {target.cross_compiler_package}")
    built, real_compile = [], tvm.compile

    def keep(*args, **kwargs):  # compile_model's executable, for its CUDA module's source
        built.append(real_compile(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(tvm, "compile", keep)
    artifact = compile_model(small_onnx, profile, tmp_path / "art", input_shapes={"input": [1, 64]})
    assert artifact.manifest["device"] == "cuda" and len(built) == 1
    cuda = next(m for m in built[0].mod._collect_from_import_tree(lambda m: True) if m.kind == "cuda")
    from tvm.support import nvcc

    from adntn_deploy.compiler.target import tvm_target

    with tvm_target(target):  # nvcc helpers read the arch from the current target
        ptx = nvcc.compile_cuda(cuda.inspect_source("cuda"), target_format="ptx", arch=arch, compiler="nvcc")
    assert b".target " + arch.encode() in ptx


def test_tampered_artifact_is_refused(tmp_path, small_onnx):
    artifact = compile_model(small_onnx, "host", tmp_path / "art")
    params = artifact.path / "params.safetensors"
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF
    params.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load(artifact.path)
    (artifact.path / "params.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load(artifact.path)


def test_unreadable_parameter_file_is_one_clear_error(tmp_path, small_onnx):
    """A params file whose checksum the manifest records (a broken writer, not tampering) but which is not
    safetensors: one line naming the file and the fix, not the parser's exception."""
    import hashlib

    artifact = compile_model(small_onnx, "host", tmp_path / "art")
    params = artifact.path / "params.safetensors"
    params.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    manifest["files"]["params.safetensors"] = {"sha256": hashlib.sha256(params.read_bytes()).hexdigest(),
                                               "bytes": params.stat().st_size}
    (artifact.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a readable safetensors file.*rebuild the artifact"):
        load(artifact.path)


def test_missing_toolchain_names_the_package(tmp_path, small_onnx):
    with pytest.raises(ProfileError, match="apt-get install g\\+\\+-aarch64-linux-gnu|not found"):
        compile_model(small_onnx, "rpi4", tmp_path / "art", cross_compiler="no-such-g++")


def test_unsupported_op_is_one_clear_error(tmp_path):
    node = helper.make_node("DFT", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2])])
    path = tmp_path / "dft.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    with pytest.raises(CompileError, match="DFT"):
        compile_model(path, "host", tmp_path / "art")
    assert not (tmp_path / "art").exists()


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory, small_onnx):
    return compile_model(small_onnx, "host", tmp_path_factory.mktemp("a") / "art", input_shapes={"input": [4, 64]}).path


@pytest.mark.parametrize("asked, env, expected", [
    (None, None, len(os.sched_getaffinity(0))),  # every usable CPU (TVM's x86 default is half of them)
    (None, "1", 1),  # a TVM_NUM_THREADS the user set is kept
    (1, None, 1),  # an explicit count wins
])
def test_tvm_thread_pool_size(small_onnx, small_artifact, asked, env, expected):
    import tvm

    from adntn_deploy.compiler.target import configure_threads

    saved = os.environ.pop("TVM_NUM_THREADS", None)
    try:
        if env is not None:
            os.environ["TVM_NUM_THREADS"] = env
        predictor = load(small_artifact, intra_op_threads=asked)
        assert predictor.threads == expected and tvm.runtime.num_threads() == expected
        x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        (name, want), = load(small_onnx).run({"input": x}).items()
        assert_rel_close(predictor.run({"input": x})[name], want, RTOL["linear"])
        with pytest.raises(ValueError, match="threads must be at least 1"):
            load(small_artifact, intra_op_threads=0)
    finally:  # the pool is process-wide: give the rest of the suite its usual size back
        os.environ.pop("TVM_NUM_THREADS", None)
        if saved is not None:
            os.environ["TVM_NUM_THREADS"] = saved
        configure_threads()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 or more usable CPUs (pinning is moot on one)")
@pytest.mark.parametrize("env, bind, pinned", [(None, "0", False), ("1", "1", True)])
def test_tvm_workers_are_not_pinned_on_identical_cores(small_artifact, env, bind, pinned):
    """On a machine whose cores are alike, a predictor's process leaves TVM's workers unpinned (a pinned
    worker and the unpinned calling thread could share one core for the process's life); a
    TVM_BIND_THREADS the user set is kept. Read from the kernel: each thread's allowed CPUs."""
    import subprocess
    import sys

    code = (
        "import os, sys, numpy as np\n"
        "from adntn_deploy.runtime import load\n"
        "p = load(sys.argv[1]); x = np.zeros(p.inputs[0].shape, np.float32)\n"
        "for _ in range(20): p.run({p.inputs[0].name: x})\n"
        "usable = os.sched_getaffinity(0)\n"
        "pinned = [t for t in os.listdir('/proc/self/task') if os.sched_getaffinity(int(t)) < usable]\n"
        "print(os.environ.get('TVM_BIND_THREADS'), len(pinned))\n"
    )
    environ = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"} | ({"TVM_BIND_THREADS": env} if env else {})
    done = subprocess.run([sys.executable, "-c", code, str(small_artifact)], capture_output=True, text=True,
                          timeout=300, env=environ)
    assert done.returncode == 0, done.stderr
    seen_bind, seen_pinned = done.stdout.split()
    assert seen_bind == bind and (int(seen_pinned) > 0) == pinned


def _unaligned(array):
    """A C-contiguous copy of ``array`` whose data starts 4 bytes past a 64-byte boundary."""
    raw = np.empty(array.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + 4
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def _read_only(array):
    out = array.copy()
    out.flags.writeable = False
    return out


@pytest.mark.parametrize("layout", [
    np.ascontiguousarray,  # usually passed to TVM without a copy
    _unaligned,  # TVM refuses unaligned memory: copied into the staging buffer
    _read_only,  # DLPack refuses read-only arrays: staged
    np.asfortranarray,  # made C-contiguous by the input check
])
@pytest.mark.parametrize("staged_up_to", [0, None])  # None: the default (this small input is always staged)
def test_tvm_inputs_in_any_layout(small_onnx, small_artifact, layout, staged_up_to, monkeypatch):
    from adntn_deploy.runtime import tvm as tvm_runtime

    if staged_up_to is not None:
        monkeypatch.setattr(tvm_runtime, "ALWAYS_STAGED_BYTES", staged_up_to)
    predictor, ort = load(small_artifact), load(small_onnx)
    rng = np.random.default_rng(1)
    for _ in range(3):  # new values each call: a reused staging buffer must not serve stale ones
        x = rng.standard_normal((4, 64)).astype(np.float32)
        (name, want), = ort.run({"input": x}).items()
        assert_rel_close(predictor.run({"input": layout(x)})[name], want, RTOL["linear"])


# minutes-long with the rest: compile via the CLI is in the default suite in test_dense.py::test_cli_no_prepack
@pytest.mark.slow
def test_cli_compile_and_run(tmp_path, small_onnx):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "adntn_deploy.cli.main", *map(str, args)],
                              capture_output=True, text=True, timeout=600, env=env)

    env = {**{k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}, "TQDM_DISABLE": "1"}
    proc = cli("compile", small_onnx, "--target", "host", "-o", tmp_path / "art", "--input-shape", "input:4,64",
               "--dump-ir", tmp_path / "ir")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ir" / "02_lifted.py").exists()
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    proc = cli("run", tmp_path / "art", "--inputs", tmp_path / "x.npz", "--outputs", tmp_path / "y.npz", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "tvm" and report["threads"] == len(os.sched_getaffinity(0))
    expected = load(small_onnx).run({"input": x})
    got = np.load(tmp_path / "y.npz")
    (name,) = expected
    assert_rel_close(got[name], expected[name], RTOL["linear"])
    for args, message in [
        (("compile", small_onnx, "--target", "nope", "-o", tmp_path / "x"), "unknown target"),
        (("compile", small_onnx, "--target", "host", "-o", tmp_path / "x", "--input-shape", "wrong:1,64"), "inputs are"),
        (("run", tmp_path / "art", "--inputs", tmp_path / "bad.npz"), "cannot read inputs"),
        (("run", tmp_path / "art", "--threads", "0"), "0 is not in the range x>=1"),
    ]:
        proc = cli(*args)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    targets = json.loads(cli("targets", "--json").stdout)
    assert any(t["name"] == "rpi4" and t["tag"] == "raspberry-pi/4b-aarch64" for t in targets)


def test_recompiling_into_the_same_folder_loads_the_new_library(tmp_path):
    # dlopen caches libraries by file name: a long-lived process must still run the recompiled artifact
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(ADNTNLinear(64, 16, family="ttn", bond_dim=2, top_activation="tanh")).eval()
        path = tmp_path / f"m{seed}.onnx"
        export_onnx(model, [torch.randn(1, 64)], path, input_names=["input"])
        compile_model(path, "host", tmp_path / "art", weights="fold")  # fold: the weights live in the library
        (got,) = load(tmp_path / "art").run({"input": x}).values()
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert_rel_close(got, expected, float32_rtol(64), f"seed {seed}")
        outputs.append(got)
    assert relative_error(outputs[0], outputs[1]) > 1e-2


def test_initializers_listed_as_graph_inputs(tmp_path):
    """Old-style ONNX (IR < 4, some converters) lists every initializer among the graph inputs too: the
    artifact must take each parameter once (it took them twice and failed at load)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "old_style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 3, 3, 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    path = tmp_path / "old.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]).SerializeToString())
    artifact = compile_model(path, "host", tmp_path / "art")
    assert len(artifact.manifest["params"]) == 2 and [i["name"] for i in artifact.manifest["inputs"]] == ["x"]
    x = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    want = load(path).run(x)["y"]
    got = load(artifact.path).run(x)["y"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
