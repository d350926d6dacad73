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


RISCV = {"kind": "llvm", "mtriple": "riscv64-unknown-linux-gnu", "mabi": "lp64d"}


@pytest.mark.parametrize("target, lanes, registers", [
    (AVX512, 16, 32), (AVX2, 8, 16), (AARCH64, 4, 32),
    ({**RISCV, "mcpu": "sifive-u74"}, 4, 16),                           # rv64gc: no vector unit (scalar code)
    ({**RISCV, "mattr": ["+64bit", "+m", "+a", "+f", "+d", "+c", "+v"]}, 4, 32),  # RVV: VLEN >= 128
    ({**RISCV, "mcpu": "spacemit-x60"}, 8, 32),                         # zvl256b
    ({**RISCV, "mcpu": "sifive-x280"}, 16, 32),                         # zvl512b
])
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


@pytest.mark.parametrize("rows, depth, row_block, panel_block, panels, width, chunk", [
    (32, 2048, 4, 2, 64, 32, 128),    # AVX-512's 4 x 2 block: a 32 KiB chunk of its two panels
    (32, 1000, 4, 2, 64, 32, 125),    # the largest divisor of the depth within a chunk
    (32, 2048, 4, 1, 128, 16, 512),   # AVX2's 4 x 1 block of 16-wide panels
    (4, 2048, 4, 2, 64, 32, None),    # one row block: nothing re-reads the panels
    (32, 2048, 4, 2, 8, 32, None),    # 4 panel blocks: too few to run in parallel without the rows
    (32, 128, 4, 2, 64, 32, None),    # a single chunk
    (512, 2048, 4, 2, 64, 32, None),  # a 128 KiB row buffer
])
def test_reduce_chunk(rows, depth, row_block, panel_block, panels, width, chunk):
    from adntn_deploy.compiler.schedules import packed_dense

    assert packed_dense.reduce_chunk(rows, depth, row_block, panel_block, panels, width) == chunk


def _dense_kernel(target, rows, depth, out_dim):
    from tvm import te

    from adntn_deploy.compiler.schedules import packed_dense
    from adntn_deploy.compiler.schedules.common import int64_placeholder, panel_width

    width = panel_width(target, out_dim)
    x = int64_placeholder((rows, depth), "x")
    wp = int64_placeholder((out_dim // width, depth, width), "wp")
    return te.create_prim_func([x, wp, packed_dense.packed_dense_te(x, wp, out_dim)]), width


@pytest.mark.parametrize("seed", [None, 1, 2, 3])  # None: the untuned default; else sampled decisions
def test_k_blocked_kernels_are_correct(seed):
    """Kernels over several row blocks of a long reduction are K-blocked (the parallel loop runs over panel
    blocks only) and equal numpy, with the default block and with what tuning samples."""
    from tvm import s_tir

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.schedules import packed_dense
    from adntn_deploy.compiler.target import tvm_target

    target = tvm_target(resolve_target("host"))  # runs here: AVX2 or AVX-512
    rows, depth, out_dim = 16, 1024, 512
    func, width = _dense_kernel(target, rows, depth, out_dim)
    sch = s_tir.Schedule(func, seed=seed)
    block = sch.get_sblock(packed_dense.BLOCK_NAME)
    if seed is None:
        packed_dense.schedule_default(sch, block, target)
        row_block, panel_block = common.default_blocks(target, rows, out_dim // width, width)
        chunk = packed_dense.reduce_chunk(rows, depth, row_block, panel_block, out_dim // width, width)
        assert chunk is not None
        parallel = [loop for loop in sch.get_loops(sch.get_sblock(packed_dense.BLOCK_NAME + "_update"))
                    if sch.get(loop).kind == tvm.tirx.ForKind.PARALLEL]
        assert [int(sch.get(loop).extent) for loop in parallel] == [out_dim // width // panel_block]
    else:
        packed_dense.schedule(sch, block)
    rng = np.random.default_rng(seed or 0)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    wp = rng.standard_normal((out_dim // width, depth, width)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((rows, out_dim), np.float32))
    tvm.compile(sch.mod, target=target).mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wp), out)
    want = x @ wp.transpose(1, 0, 2).reshape(depth, out_dim)
    assert relative_error(out.numpy(), want) < float32_rtol(depth)


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
    "matmul-stored-k-by-n": (lambda p: _onnx(p, [helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [4, 16])],
                                             {"w": np.ones((16, 32), np.float32)}, "kn", [4, 32]), AVX512, 1),
    "matmul-of-transposed-weight": (lambda p: _onnx(p, [helper.make_node("Transpose", ["w"], ["t"], perm=[1, 0]),
                                                        helper.make_node("MatMul", ["x", "t"], ["y"])], [("x", [4, 16])],
                                                    {"w": np.ones((32, 16), np.float32)}, "nk", [4, 32]), AVX512, 1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("weights", ["load", "fold"])
def test_which_matmuls_are_packed(tmp_path, case, weights):
    build, target, expected = CASES[case]
    imported = import_model(build(tmp_path), weights, prepack_target=tvm.target.Target(target))
    assert imported.prepacked["adntn_packed_dense"] == expected
    if expected and weights == "load":  # the packing is load-time work, not per call
        load_time = imported.mod["main_transform_params"].script()
        assert "layout_transform" in load_time
        assert "layout_transform" not in imported.mod["main"].script()
        # a transposed weight (Gemm transB=1, Transpose) is packed from the stored layout: no transposed copy
        assert "permute_dims" not in load_time


@pytest.mark.parametrize("out_dim", [32, 10, 40])  # whole panels, one padded panel, 8-wide panels
def test_transposed_weight_packed_from_its_stored_layout_equals_ort(tmp_path, out_dim):
    w = np.random.default_rng(2).standard_normal((out_dim, 16)).astype(np.float32)
    path = _onnx(tmp_path, [helper.make_node("Transpose", ["w"], ["t"], perm=[1, 0]), helper.make_node("MatMul", ["x", "t"], ["y"])],
                 [("x", [4, 16])], {"w": w}, f"nk{out_dim}", [4, out_dim])
    x = {"x": np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)}
    artifact = compile_model(path, "host", tmp_path / "art")
    assert artifact.manifest["tuning"]["packed_dense"] == 1
    assert relative_error(load(artifact.path).run(x)["y"], load(path).run(x)["y"]) < float32_rtol(16)


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
