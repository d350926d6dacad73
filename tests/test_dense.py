"""Packed dense kernels: which matmuls are rewritten, panel and block choices, and results equal ORT's."""

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from tolerance import float32_rtol, relative_error  # noqa: E402
from adntn_deploy.compiler.build import compile_model  # noqa: E402
from adntn_deploy.compiler.frontend import import_model  # noqa: E402
from adntn_deploy.compiler.schedules import common, fuse_kernels, is_scheduled, schedule_untuned  # noqa: E402
from adntn_deploy.compiler.target import vector_shape  # noqa: E402
from adntn_deploy.nn import ADNTNLinear  # noqa: E402
from adntn_deploy.onnx_export import export_onnx  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402

AVX512 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 4}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}
CUDA = {"kind": "cuda", "arch": "sm_80"}


@pytest.mark.parametrize("target, lanes, registers", [(AVX512, 16, 32), (AVX2, 8, 16), (AARCH64, 4, 32)])
def test_vector_shape(target, lanes, registers):
    assert vector_shape(tvm.target.Target(target)) == (lanes, registers)


@pytest.mark.parametrize("target, out_dim, width", [
    (AVX512, 4096, 32), (AVX512, 1000, 8), (AVX512, 100, 4), (AVX512, 10, 16), (AVX512, 20, 4), (AVX512, 6, 16), (AVX512, 70, None),
    (AVX2, 4096, 16), (AVX2, 10, 16), (AARCH64, 1024, 8), (AARCH64, 6, 8),
])
def test_panel_width(target, out_dim, width):
    assert common.panel_width(tvm.target.Target(target), out_dim) == width


@pytest.mark.parametrize("target, rows, panels, width, blocks", [
    (AVX512, 32, 128, 32, (4, 2)),   # 4 rows x 2 panels x 2 vectors = half the 32 registers, 2 FMAs per load
    (AVX512, 1, 128, 32, (1, 8)),    # one row: more panels instead
    (AVX512, 1, 4, 32, (1, 1)),      # too few panels to block and still keep both threads busy
    (AVX512, 3, 64, 32, (3, 2)),
    (AVX2, 32, 64, 16, (4, 1)),      # 16 registers
    (AARCH64, 32, 128, 8, (4, 2)),
])
def test_default_blocks(target, rows, panels, width, blocks):
    assert common.default_blocks(tvm.target.Target(target), rows, panels, width, threads=2) == blocks


def _onnx(tmp_path, nodes, inputs, inits, name, out_shape):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def _gemm(tmp_path, batch, in_dim, out_dim):
    w = np.random.default_rng(0).standard_normal((out_dim, in_dim)).astype(np.float32)
    return _onnx(tmp_path, [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], [("x", [batch, in_dim])], {"w": w},
                 f"gemm{out_dim}", [batch, out_dim])


CASES = {
    # name: (builder, target, matmuls rewritten)
    "gemm": (lambda p: _gemm(p, 4, 64, 128), AVX512, 1),
    "gemm-narrow-padded": (lambda p: _gemm(p, 4, 64, 10), AVX512, 1),
    "gemm-width-8": (lambda p: _gemm(p, 4, 64, 40), AVX512, 1),
    "gemm-no-panel-fits": (lambda p: _gemm(p, 4, 64, 70), AVX512, 0),
    "gemm-cuda": (lambda p: _gemm(p, 4, 64, 128), CUDA, 0),
    "activation-times-activation": (lambda p: _onnx(p, [helper.make_node("Transpose", ["x"], ["t"]),
                                                        helper.make_node("MatMul", ["x", "t"], ["y"])],
                                                    [("x", [32, 16])], {}, "xxt", [32, 32]), AVX512, 0),
    "3d-input": (lambda p: _onnx(p, [helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [2, 3, 16])],
                                 {"w": np.ones((16, 32), np.float32)}, "nd", [2, 3, 32]), AVX512, 0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weights", ["load", "fold"])
def test_which_matmuls_are_packed(tmp_path, case, weights):
    build, target, expected = CASES[case]
    imported = import_model(build(tmp_path), weights, prepack_target=tvm.target.Target(target))
    assert imported.prepacked["adntn_packed_dense"] == expected
    if expected and weights == "load":  # the packing is load-time work, not per call
        assert "layout_transform" in imported.mod["main_transform_params"].script()
        assert "layout_transform" not in imported.mod["main"].script()


def _mixed_model():
    torch.manual_seed(0)
    # gelu reads its input twice: an epilogue that forks (only the bias is fused), tanh: one that chains
    return nn.Sequential(nn.Linear(48, 64), nn.GELU(), ADNTNLinear(64, 32, family="ttn", bond_dim=3), nn.Tanh(),
                         nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("weights", ["load", "fold"])
def test_packed_equals_ort_and_generic(tmp_path, batch, weights):
    path = tmp_path / "mixed.onnx"
    export_onnx(_mixed_model(), [torch.randn(batch, 48)], path, input_names=["input"])
    x = {"input": np.random.default_rng(1).standard_normal((batch, 48)).astype(np.float32)}
    expected = load(path).run(x)
    (name,) = expected
    packed = compile_model(path, "host", tmp_path / "packed", weights=weights)
    generic = compile_model(path, "host", tmp_path / "generic", weights=weights, prepack=False)
    assert packed.manifest["tuning"]["packed_dense"] == 3 and generic.manifest["tuning"]["packed_dense"] == 0
    for artifact in (packed, generic):
        got = load(artifact.path).run(x)[name]
        assert relative_error(got, expected[name]) < float32_rtol(48, 64, 32)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, nn.GELU])  # chains, and gelu's fork
def test_epilogue_runs_in_the_parallel_loop(tmp_path, activation):
    from tvm import s_tir, tirx

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export_onnx(nn.Sequential(nn.Linear(48, 64), activation()).eval(), [torch.randn(8, 48)], path, input_names=["input"])
    target = tvm.target.Target(AVX512)
    mod, scheduled = schedule_untuned(fuse_kernels(import_model(path, "load", prepack_target=target).mod, target), target)
    assert scheduled["adntn_packed_dense"] == 1
    (func,) = [f for _, f in mod.functions_items()
               if type(f).__name__ == "PrimFunc" and is_scheduled(f) and "packed_dense" in f.script()]
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    assert len(blocks) >= 3  # init, product, write-back (+ the epilogue)
    for block in blocks:  # every block, the epilogue's included, is inside the parallel loop over tiles
        assert sch.get(sch.get_loops(block)[0]).kind == tirx.ForKind.PARALLEL, sch.get(block).name_hint
    x = np.random.default_rng(0).standard_normal((8, 48)).astype(np.float32)
    (name, want), = load(path).run({"input": x}).items()
    got = load(compile_model(path, "host", tmp_path / "art").path).run({"input": x})[name]
    assert relative_error(got, want) < float32_rtol(48)


def test_stream_factors_are_packed(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ADNTNLinear(256, 128, family="ttn", bond_dim=4), nn.ReLU()).eval()
    path = tmp_path / "s.onnx"
    export_onnx(model, [torch.randn(2, 256)], path, input_names=["input"])
    artifact = compile_model(path, "host", tmp_path / "s", weights="stream")
    assert artifact.manifest["streamed"] and artifact.manifest["tuning"]["packed_dense"] >= 1
    x = {"input": np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)}
    expected = load(path).run(x)
    (name,) = expected
    got = load(artifact.path).run(x)[name]
    assert relative_error(got, expected[name]) < float32_rtol(256)


def test_cli_no_prepack(tmp_path, cli_runner):
    path = _gemm(tmp_path, 2, 32, 64)
    outputs = {}
    for flag in ("--prepack", "--no-prepack"):
        proc = cli_runner("compile", path, "--target", "host", "-o", tmp_path / flag, flag, "--json")
        assert proc.returncode == 0, proc.stderr
        outputs[flag] = json.loads(proc.stdout)["tuning"]["packed_dense"]
    assert outputs == {"--prepack": 1, "--no-prepack": 0}
