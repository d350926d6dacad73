"""adntn-runner, the native C++ runner for compiled artifacts: natively on x86 and under qemu-aarch64.

Each test makes a tiny artifact (a two-output MLP) with plain TVM following the artifact contract
(manifest.json + model.so + params.safetensors, weights "load"), runs the runner on it and compares the
outputs with TVM's Python Relax VM on x86.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# Checked without importing (importing tvm takes seconds): tvm is imported lazily inside the tests.
if importlib.util.find_spec("tvm") is None or importlib.util.find_spec("onnx") is None:
    pytest.skip("needs TVM and onnx: pip install -e '.[tvm,onnx]'", allow_module_level=True)
from safetensors.numpy import load_file, save_file  # noqa: E402

from tolerance import float32_rtol, relative_error
from adntn_deploy.compiler.runner import build_runner, run_with_qemu, runtime_libs_dir  # noqa: E402
from adntn_deploy.errors import CompileError  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402

AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
IN_DIM, HIDDEN, OUT_DIM = 16, 32, 10


def _mlp_onnx(rng):
    """input [1,16] -> Gemm(transB) -> Relu ("hidden") -> Gemm(transB) -> "logits"; two outputs."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(rng.standard_normal((HIDDEN, IN_DIM)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((OUT_DIM, HIDDEN)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(OUT_DIM).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, IN_DIM])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, OUT_DIM]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, HIDDEN]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _make_artifact(folder: Path, target: dict, rng) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Compile the MLP for ``target`` into an artifact folder; return (params, input, x86 reference outputs)."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(_mlp_onnx(rng), shape_dict={"input": [1, IN_DIM]}, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    mod = relax.transform.LiftTransformParams()(mod)
    params = [p.numpy() for p in params["main"]]
    x = rng.standard_normal((1, IN_DIM)).astype(np.float32)

    folder.mkdir(parents=True)
    tgt = tvm.target.Target(target)
    ex = tvm.compile(mod, tgt, relax_pipeline=relax.get_default_pipeline(tgt))
    if target.get("mtriple", "").startswith("aarch64"):
        ex.export_library(str(folder / "model.so"), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    else:
        ex.export_library(str(folder / "model.so"))
    names = [f"p{i:04d}" for i in range(len(params))]
    save_file(dict(zip(names, params)), str(folder / "params.safetensors"))
    manifest = {
        "format": "adntn-artifact",
        "version": 1,
        "library": "model.so",
        "params_file": "params.safetensors",
        "weights": "load",
        "params": names,
        "inputs": [{"name": "input", "shape": [1, IN_DIM], "dtype": "float32"}],
        "outputs": [
            {"name": "output0", "shape": [1, OUT_DIM], "dtype": "float32"},
            {"name": "output1", "shape": [1, HIDDEN], "dtype": "float32"},
        ],
        # the runner loads only files listed here and checks their hashes
        "files": {name: {"sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
                         "bytes": (folder / name).stat().st_size} for name in ("model.so", "params.safetensors")},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return params, x, _x86_reference(mod, params, x)


def _x86_reference(mod, params: list[np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """Outputs of TVM's Python Relax VM on x86 for the same module, params and input."""
    import tvm
    from tvm import relax

    tgt = tvm.target.Target({"kind": "llvm"})
    vm = relax.VirtualMachine(tvm.compile(mod, tgt, relax_pipeline=relax.get_default_pipeline(tgt)), tvm.cpu())
    t = vm["main_transform_params"]([tvm.runtime.tensor(p) for p in params])
    out = vm["main"](tvm.runtime.tensor(x), *t)
    outs = [out] if hasattr(out, "numpy") else list(out)
    return [o.numpy() for o in outs]


def _check_outputs(path: Path, ref: list[np.ndarray]) -> None:
    got = load_file(str(path))
    assert sorted(got) == ["output0", "output1"]
    for name, want in zip(["output0", "output1"], ref):
        assert got[name].shape == want.shape and got[name].dtype == want.dtype
        assert relative_error(got[name], want) < float32_rtol(IN_DIM, HIDDEN), name  # NEON or x86 vs x86


@pytest.fixture(scope="module")
def x86_runner(tmp_path_factory) -> Path:
    """The runner built natively for x86 (host g++), once per module."""
    if shutil.which("g++") is None:
        pytest.skip("needs a host C++ compiler: apt-get install g++")
    return build_runner("x86_64", tmp_path_factory.mktemp("bin"))


def test_runner_x86_native(tmp_path, x86_runner):
    rng = np.random.default_rng(0)
    art = tmp_path / "artifact"
    _, x, ref = _make_artifact(art, {"kind": "llvm"}, rng)
    binary = x86_runner
    save_file({"input": x}, str(tmp_path / "in.safetensors"))

    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    proc = subprocess.run(
        [str(binary), str(art), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), "--repeat", "3"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mean latency of main" in proc.stdout and "3 run" in proc.stdout
    # the pool gets every usable CPU, not TVM's x86 default of half of them
    assert f"on {len(os.sched_getaffinity(0))} thread(s)" in proc.stdout, proc.stdout
    _check_outputs(tmp_path / "out.safetensors", ref)
    proc = subprocess.run([str(binary), str(art), str(tmp_path / "in.safetensors"), str(tmp_path / "o1.safetensors"),
                           "--threads", "1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "on 1 thread(s)" in proc.stdout, proc.stdout + proc.stderr
    _check_outputs(tmp_path / "o1.safetensors", ref)

    # Errors: one line on stderr, exit code 1.
    def fails(args, needle):
        p = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 1 and needle in p.stderr and p.stderr.count("\n") == 1, p.stderr

    fails([art, tmp_path / "in.safetensors"], "usage")
    fails([art, tmp_path / "in.safetensors", tmp_path / "o.safetensors", "--threads", "0"], "--threads must be a positive")
    fails([tmp_path / "nowhere", tmp_path / "in.safetensors", tmp_path / "o.safetensors"], "manifest.json")
    fails([art, tmp_path / "missing.safetensors", tmp_path / "o.safetensors"], "missing.safetensors")
    save_file({"input": np.zeros((1, IN_DIM + 1), np.float32)}, str(tmp_path / "bad_shape.safetensors"))
    fails([art, tmp_path / "bad_shape.safetensors", tmp_path / "o.safetensors"], "shape [1, 17]")
    save_file({"input": np.zeros((1, IN_DIM), np.float64)}, str(tmp_path / "bad_dtype.safetensors"))
    fails([art, tmp_path / "bad_dtype.safetensors", tmp_path / "o.safetensors"], "dtype float64")
    save_file({"x": x}, str(tmp_path / "bad_name.safetensors"))
    fails([art, tmp_path / "bad_name.safetensors", tmp_path / "o.safetensors"], "no tensor 'input'")
    bad = tmp_path / "bad_manifest"
    shutil.copytree(art, bad)
    (bad / "manifest.json").write_text('{"format": "adntn-artifact", "inputs": [')
    fails([bad, tmp_path / "in.safetensors", tmp_path / "o.safetensors"], "invalid JSON")


@pytest.mark.parametrize("bind_env", [None, "1", "0"])
def test_runner_leaves_workers_unpinned_on_identical_cores(tmp_path, x86_runner, bind_env):
    """As the Python predictor does (compiler/target.py configure_threads): TVM's workers are not pinned where
    every usable core is alike, and a TVM_BIND_THREADS the user set is kept. The runner says which."""
    from adntn_deploy.compiler.target import _identical_cores

    art = tmp_path / "artifact"
    _, x, _ = _make_artifact(art, {"kind": "llvm"}, np.random.default_rng(0))
    save_file({"input": x}, str(tmp_path / "in.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"} | ({"TVM_BIND_THREADS": bind_env} if bind_env else {})
    proc = subprocess.run([str(x86_runner), str(art), str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    pinned = bind_env == "1" or (bind_env is None and not _identical_cores())
    assert ("workers pinned to cores" if pinned else "workers not pinned") in proc.stdout, proc.stdout


@pytest.mark.parametrize("generated", [True, False], ids=["generated", "dense"])
def test_runner_holds_the_weights_once_after_load(tmp_path, x86_runner, generated):
    """On a board the runner is the whole process: after load it holds the weights once (the params and the
    generators' and packing's intermediates are released), and loading peaks at twice the weights (the params
    file was held whole, then hashed from a copy: 3x for stored weights)."""
    import re

    import torch
    from torch import nn

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.nn import ADNTNLinear
    from adntn_deploy.onnx_export import export_onnx

    torch.manual_seed(0)
    layer = ADNTNLinear(2048, 2048, family="ttn", layout="operator", bond_dim=2, max_mode=4, bias=False).eval()
    export_onnx(nn.Sequential(layer if generated else layer.to_dense()).eval(), [torch.randn(1, 2048)],
                tmp_path / "m.onnx", input_names=["input"])
    artifact = compile_model(tmp_path / "m.onnx", "host", tmp_path / "art", weights="load")
    x = np.random.default_rng(0).standard_normal((1, 2048)).astype(np.float32)
    save_file({"input": x}, str(tmp_path / "in.safetensors"))
    proc = subprocess.run([str(x86_runner), str(artifact.path), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = re.search(r"memory: params ([\d.]+) MiB; resident after load \+([\d.]+) MiB, "
                       r"peak while loading \+([\d.]+) MiB", proc.stdout)
    assert report, proc.stdout
    params, resident, peak = (float(v) for v in report.groups())
    weights = 16.0  # 2048 x 2048 float32, packed
    assert params == (0.0 if generated else weights)
    assert resident < 1.4 * weights, proc.stdout
    assert peak < 2.4 * weights, proc.stdout
    got = load_file(str(tmp_path / "out.safetensors"))
    want = load(artifact.path).run({"input": x})
    (name,) = got
    assert relative_error(got[name], next(iter(want.values()))) < float32_rtol(2048)


def _require_aarch64_tools() -> None:
    """Skip (saying how to get them) unless the cross g++, qemu-aarch64 and the aarch64 libs are here."""
    missing = [tool for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: apt-get install qemu-user g++-aarch64-linux-gnu")
    try:
        runtime_libs_dir("aarch64")
    except CompileError as err:
        pytest.skip(str(err))


def _run_bundled_under_qemu(artifact: Path, x: np.ndarray, tmp_path: Path) -> dict[str, np.ndarray]:
    """The outputs of an aarch64 ``artifact``, bundled with its runner and run under qemu on ``{"input": x}``."""
    from adntn_deploy.compiler.bundle import make_bundle

    bundle = make_bundle(artifact, tmp_path / "bundle")
    save_file({"input": x}, str(tmp_path / "in.safetensors"))
    proc = run_with_qemu(bundle / "adntn-runner", [bundle / "artifact", tmp_path / "in.safetensors", tmp_path / "out.safetensors"])
    assert proc.returncode == 0, proc.stderr
    return load_file(str(tmp_path / "out.safetensors"))


def test_runner_aarch64_qemu(tmp_path):
    _require_aarch64_tools()
    rng = np.random.default_rng(0)
    art = tmp_path / "artifact"
    _, x, ref = _make_artifact(art, AARCH64_TARGET, rng)
    binary = build_runner("aarch64", tmp_path / "bin")
    save_file({"input": x}, str(tmp_path / "in.safetensors"))

    proc = run_with_qemu(binary, [art, tmp_path / "in.safetensors", tmp_path / "out.safetensors"])
    assert proc.returncode == 0, proc.stderr
    assert "mean latency of main" in proc.stdout
    _check_outputs(tmp_path / "out.safetensors", ref)


def test_runtime_libs_dir_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ADNTN_EDGE_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(CompileError, match="scripts/fetch_edge_runtime.sh aarch64"):
        runtime_libs_dir("aarch64")


@pytest.mark.parametrize("weights, layout", [("load", "split"), ("stream", "split"), ("load", "operator"), ("fold", "operator"),
                                             ("stream", "operator")])
def test_adntn_model_compiled_for_rpi4_runs_under_qemu_like_on_x86(tmp_path, weights, layout):
    """The whole edge path: an ADNTN model -> ONNX -> compile for rpi4 -> bundle -> qemu, equal to x86.

    With ``stream`` (split layout) the Conv and the last Linear run factored and the tanh-topped Linear
    through the fused kernel, built for aarch64 (NEON). With ``stream`` (operator layout) the middle Linear has
    an identity top and runs from its Kronecker halves; the others are split layout, factored.
    """
    _require_aarch64_tools()
    import torch
    from torch import nn

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear
    from adntn_deploy.onnx_export import export_onnx
    from adntn_deploy.runtime import load

    torch.manual_seed(0)
    kronecker = (weights, layout) == ("stream", "operator")
    model = nn.Sequential(ADNTNConv2d(1, 4, 3, padding=1, family="attn", bond_dim=2, layout="split" if kronecker else layout),
                          nn.ReLU(), nn.Flatten(),
                          ADNTNLinear(4 * 6 * 6, 8, family="mera", top_activation="identity" if kronecker else "tanh",
                                      layout=layout), nn.Tanh(),
                          ADNTNLinear(8, 3, family="ttn", layout="split")).eval()  # 8 -> 3: too small to pair
    onnx_path = tmp_path / "m.onnx"
    export_onnx(model, [torch.randn(1, 1, 6, 6)], onnx_path, input_names=["input"], output_names=["logits"])
    host = compile_model(onnx_path, "host", tmp_path / "host", weights=weights)
    board = compile_model(onnx_path, "rpi4", tmp_path / "rpi4", weights=weights)
    x = np.random.default_rng(3).standard_normal((1, 1, 6, 6)).astype(np.float32)
    on_board = _run_bundled_under_qemu(board.path, x, tmp_path)["logits"]
    on_x86 = load(host.path).run({"input": x})["logits"]
    assert relative_error(on_board, on_x86) < float32_rtol(9, 144, 8)  # NEON vs x86 kernels
    if weights == "stream":
        kernels = {"factored", "kronecker"} if kronecker else {"factored", "fused"}
        assert {layer["kernel"] for layer in board.manifest["streamed"]} == kernels
    else:  # the generated conv runs on the packed NEON conv kernel on the board
        assert board.manifest["tuning"]["packed_conv2d"] == 1 == host.manifest["tuning"]["packed_conv2d"]


def test_pointwise_convs_compiled_for_rpi4_run_under_qemu_like_on_x86(tmp_path):
    """The NEON build of the pointwise (1x1) conv kernel, expanding and reducing channels with a fused bias,
    residual add and ReLU, gives what ONNX Runtime gives on x86."""
    _require_aarch64_tools()
    import torch
    from torch import nn

    from adntn_deploy.compiler.build import compile_model
    from adntn_deploy.onnx_export import export_onnx
    from adntn_deploy.runtime import load

    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand, self.reduce = nn.Conv2d(8, 32, 1), nn.Conv2d(32, 8, 1)

        def forward(self, x):
            return (self.reduce(self.expand(x).relu()) + x).relu()

    torch.manual_seed(0)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(Bottleneck().eval(), [torch.randn(1, 8, 8, 8)], onnx_path, input_names=["input"], output_names=["out"])
    board = compile_model(onnx_path, "rpi4", tmp_path / "rpi4")
    assert board.manifest["tuning"]["default_schedules"]["adntn_pointwise_conv2d"] == 2
    x = np.random.default_rng(3).standard_normal((1, 8, 8, 8)).astype(np.float32)
    on_board = _run_bundled_under_qemu(board.path, x, tmp_path)["out"]
    assert relative_error(on_board, load(onnx_path).run({"input": x})["out"]) < float32_rtol(32, 8)
