"""Packed convolutions: which convs are rewritten, their results equal ORT's, the epilogue is fused, NEON code."""

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

from torch import nn  # noqa: E402

from exporting import export_seeded  # noqa: E402
from tolerance import float32_rtol, relative_error  # noqa: E402
from adntn_deploy.compiler.build import compile_model  # noqa: E402
from adntn_deploy.compiler.frontend import import_model  # noqa: E402
from adntn_deploy.compiler.schedules import fuse_kernels, is_scheduled, packed_conv2d, schedule_untuned  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402

AVX512 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}

CASES = {
    # name: (module, input shape (N, C, H, W), convs on the packed kernel, note expected for the others)
    "3x3-pad1-relu": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()), (1, 3, 12, 12), 1, None),
    "5x5-stride2-batch2": (lambda: nn.Conv2d(4, 32, 5, stride=2, padding=2), (2, 4, 15, 15), 1, None),
    "dilated-no-bias": (lambda: nn.Conv2d(8, 16, 3, dilation=2, padding=2, bias=False), (1, 8, 10, 10), 1, None),
    "asymmetric-kernel": (lambda: nn.Conv2d(3, 8, (1, 3), padding=(0, 1)), (1, 3, 6, 9), 1, None),
    "grouped": (lambda: nn.Conv2d(8, 32, 3, groups=2, padding=1), (1, 8, 8, 8), 1, None),
    "narrow-padded-panel": (lambda: nn.Conv2d(3, 6, 1), (1, 3, 5, 5), 1, None),
    "conv-bn-relu-pool": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16).eval(), nn.ReLU(),
                                                nn.MaxPool2d(2), nn.Conv2d(16, 32, 3)), (1, 3, 12, 12), 2, None),
    # groups whose width is not whole vectors are padded to them in the kernel and cropped after it
    "groups-of-20-padded": (lambda: nn.Sequential(nn.Conv2d(40, 40, 3, groups=2, padding=1), nn.ReLU()), (1, 40, 6, 6), 1, None),
    "groups-of-34-padded": (lambda: nn.Conv2d(68, 68, 1, groups=2), (2, 68, 5, 5), 1, None),
    "1x1-stride2-grouped-batch2": (lambda: nn.Conv2d(16, 32, 1, stride=(2, 1), groups=2), (2, 16, 9, 7), 1, None),
    "depthwise": (lambda: nn.Conv2d(16, 16, 3, groups=16, padding=1), (1, 16, 6, 6), 0, "depthwise"),
    # and so are output channels that are not whole vectors (70 -> 72 on AVX2, 80 on AVX-512)
    "channels-padded": (lambda: nn.Sequential(nn.Conv2d(3, 70, 3), nn.ReLU()), (1, 3, 6, 6), 1, None),
}


@pytest.mark.parametrize("target, groups, per_group, computed", [
    (AVX2, 1, 1000, 1000), (AVX512, 1, 1000, 1024), (AVX512, 1, 1100, 1120), (AVX2, 1, 70, 72), (AVX512, 1, 70, 80), (AARCH64, 1, 70, 72),
    (AVX2, 2, 34, 40), (AVX2, 3, 68, 72), (AVX512, 4, 20, 32),
    (AVX2, 1, 6, 6), (AVX512, 2, 12, 12),  # narrower than a vector: one narrow panel
    (AVX2, 1, 64, 64), (AVX512, 1, 64, 64),
])
def test_output_channels_are_padded_to_whole_vectors(target, groups, per_group, computed):
    assert packed_conv2d.padded_group_width(tvm.target.Target(target), groups, per_group) == computed


@pytest.mark.parametrize("kernel, strides, padding, subsampled", [
    ((1, 1), (2, 2), (0, 0, 0, 0), True), ((1, 1), (2, 1), (0, 0, 0, 0), True),
    ((1, 1), (1, 1), (0, 0, 0, 0), False),  # nothing to skip
    ((1, 1), (2, 2), (1, 1, 1, 1), False),  # the padding would have to be subsampled too
    ((3, 3), (2, 2), (1, 1, 1, 1), False),  # neighbouring taps read the skipped pixels
])
def test_which_convolutions_subsample_first(kernel, strides, padding, subsampled):
    assert packed_conv2d.subsampled_first(kernel, strides, padding) == subsampled


def test_strided_pointwise_convolution_runs_stride_1_on_a_subsampled_input(tmp_path):
    """A 1x1 stride-2 conv becomes a subsampling kernel and a stride-1 conv kernel; results equal ORT's."""
    path = export_seeded(lambda: nn.Sequential(nn.Conv2d(16, 32, 1, stride=2), nn.ReLU()), (1, 16, 14, 14),
                         tmp_path / "strided.onnx")
    target = tvm.target.Target(AVX512)
    mod = fuse_kernels(import_model(path, "load", prepack_target=target).mod, target)
    kernels = [gv.name_hint for gv, f in mod.functions_items() if type(f).__name__ == "PrimFunc"]
    assert any("adntn_subsample" in name for name in kernels), kernels
    (conv,) = [f for gv, f in mod.functions_items() if "packed_conv2d" in gv.name_hint]
    assert not re.search(r"\* T\.int64\(2\) \+ v_r", conv.script())  # its input read at stride 1 (h + rh)
    artifact, error = _compile_against_ort(tmp_path, path, (1, 16, 14, 14))
    assert artifact.manifest["tuning"]["packed_conv2d"] == 1
    assert error < float32_rtol(16, 16)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(8, 1100, 1), (1, 8, 2, 2)),            # padded to 1,120 for two-vector panels...
    (lambda: nn.Conv2d(4, 1000, 3, padding=1), (1, 4, 13, 13)),  # ...or to 1,024; both packed in one-vector panels
])
def test_channels_padded_for_two_vector_panels_but_packed_in_one_vector_panels(tmp_path, make, shape):
    """AVX-512: the output channels are rounded up to whole two-vector panels (1,000 -> 1,024), but the
    untuned kernel's panel width can then be one vector: the packed weight and the kernel must agree on
    the panels (63 of 16 channels, not 64). Compiling failed with a Relax type mismatch."""
    from adntn_deploy.compiler.profiles import host_arch
    from test_records import host_isa

    if host_arch() != "x86_64":
        pytest.skip("x86-64 targets compile only on an x86-64 host here")
    path = export_seeded(make, shape, tmp_path / "wide.onnx")
    artifact = compile_model(path, "x86-64-avx512", tmp_path / "art")
    assert artifact.manifest["tuning"]["packed_conv2d"] == 1
    if host_isa() != "x86-64-avx512":
        pytest.skip("running AVX-512 code needs an AVX-512 CPU (compiled only)")
    x = {"input": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    (name, want), = load(path).run(x).items()
    assert relative_error(load(artifact.path).run(x)[name], want) < float32_rtol(36, 36)


def _export(tmp_path, name):
    make, shape, _, _ = CASES[name]
    return export_seeded(make, shape, tmp_path / f"{name}.onnx"), shape


@pytest.mark.parametrize("case", list(CASES))
def test_conv_forms_equal_ort(tmp_path, case):
    path, shape = _export(tmp_path, case)
    _, _, packed, note = CASES[case]
    notes: list[str] = []
    artifact, error = _compile_against_ort(tmp_path, path, shape, notes.append)
    assert artifact.manifest["tuning"]["packed_conv2d"] == packed
    if note:  # a conv the kernel does not cover runs on the generic schedule, named in a note (compile -v)
        assert any("conv2d" in line and note in line for line in notes), notes
    assert error < float32_rtol(16 * 9, 16 * 9)


def _compile_against_ort(tmp_path, path, shape, notes=None):
    """(artifact, relative error against ONNX Runtime) of ``path`` compiled for the host, on random input."""
    artifact = compile_model(path, "host", tmp_path / "art", notes=notes)
    x = {"input": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    (name, want), = load(path).run(x).items()
    return artifact, relative_error(load(artifact.path).run(x)[name], want)


@pytest.mark.parametrize("weights", ["load", "fold"])
def test_packing_is_load_time_work_and_the_epilogue_runs_in_the_parallel_loop(tmp_path, weights):
    from tvm import s_tir, tirx

    path, _ = _export(tmp_path, "3x3-pad1-relu")
    target = tvm.target.Target(AVX512)
    imported = import_model(path, weights, prepack_target=target)
    assert imported.prepacked["adntn_packed_conv2d"] == 1
    if weights == "load":
        assert "layout_transform" in imported.mod["main_transform_params"].script()
        assert "layout_transform" not in imported.mod["main"].script()
    mod, scheduled = schedule_untuned(fuse_kernels(imported.mod, target), target)
    assert scheduled["adntn_packed_conv2d"] == 1
    (func,) = [f for _, f in mod.functions_items()
               if type(f).__name__ == "PrimFunc" and is_scheduled(f) and packed_conv2d.BLOCK_NAME in f.script()]
    assert "T.max" in func.script()  # relu fused into the conv kernel...
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):  # ...and every block inside the parallel loop
        assert sch.get(sch.get_loops(block)[0]).kind == tirx.ForKind.PARALLEL, sch.get(block).name_hint


def _conv_kernel(target, out_channels=32, in_channels=16, out_hw=7):
    """A standalone packed 3x3 conv kernel (stride 1, input already padded) and its panel width."""
    from tvm import te

    from adntn_deploy.compiler.schedules.common import int64_placeholder, panel_width

    width = panel_width(target, out_channels)
    xp = int64_placeholder((1, in_channels, out_hw + 2, out_hw + 2), "xp")
    wp = int64_placeholder((out_channels // width, in_channels, 3, 3, width), "wp")
    out = packed_conv2d.packed_conv2d_te(xp, wp, out_channels, 1, (out_hw, out_hw), (1, 1), (1, 1))
    return te.create_prim_func([xp, wp, out]), width


def _run_kernel(mod, target, seed=0, width=32, in_channels=16, out_hw=7):
    """(got, want) of a standalone packed conv kernel (32 output channels in panels of ``width``) on random
    data, checked against numpy."""
    ex = tvm.compile(mod, target=target)
    rng = np.random.default_rng(seed)
    xp = rng.standard_normal((1, in_channels, out_hw + 2, out_hw + 2)).astype(np.float32)
    wp = rng.standard_normal((32 // width, in_channels, 3, 3, width)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 32, out_hw, out_hw), np.float32))
    ex.mod["main"](tvm.runtime.tensor(xp), tvm.runtime.tensor(wp), out)
    windows = np.lib.stride_tricks.sliding_window_view(xp[0], (3, 3), axis=(1, 2))  # (C, H, W, 3, 3)
    want = np.einsum("chwrs,pcrsj->pjhw", windows, wp).reshape(1, 32, out_hw, out_hw)  # channel = panel * width + lane
    return out.numpy(), want


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_searchable_schedule_gives_correct_kernels(seed):
    """The rule's sampled decisions (what tuning searches) all give correct kernels."""
    from tvm import s_tir

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target

    target = tvm_target(resolve_target("host"))  # the kernel runs here: this CPU's vector width (AVX2 or AVX-512)
    func, width = _conv_kernel(target)
    sch = s_tir.Schedule(func, seed=seed)
    packed_conv2d.schedule(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME))
    got, want = _run_kernel(sch.mod, target, seed, width)
    assert relative_error(got, want) < float32_rtol(16 * 9)


@pytest.mark.parametrize("batch, panel_blocks, out_hw, tile_channels, plane", [
    (1, 8, (14, 14), 32, True),      # ResNet's 14x14 stage: a 25 KiB plane buffer, 8 tasks
    (1, 16, (7, 7), 32, True),
    (32, 1, (16, 16), 16, True),     # the zoo at batch 32: the batch gives the tasks
    (1, 4, (14, 14), 32, False),     # 4 tasks: too few to leave the rows serial
    (1, 8, (28, 28), 32, False),     # a 100 KiB buffer
    (8, 8, (1, 1), 32, False),       # one output row: nothing to sweep
])
def test_plane_buffered(batch, panel_blocks, out_hw, tile_channels, plane):
    assert packed_conv2d.plane_buffered(batch, panel_blocks, out_hw, tile_channels) == plane


def test_a_plane_buffered_kernel_is_correct():
    """A batch of 8 small planes: the parallel loop runs over (batch, panel blocks) only, every output row
    inside it, and the kernel equals numpy."""
    from tvm import s_tir, te

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.schedules.common import int64_placeholder, panel_width
    from adntn_deploy.compiler.target import tvm_target

    target = tvm_target(resolve_target("host"))
    width = panel_width(target, 32)
    xp = int64_placeholder((8, 16, 9, 9), "xp")
    wp = int64_placeholder((32 // width, 16, 3, 3, width), "wp")
    func = te.create_prim_func([xp, wp, packed_conv2d.packed_conv2d_te(xp, wp, 32, 1, (7, 7), (1, 1), (1, 1))])
    sch = s_tir.Schedule(func)
    packed_conv2d.schedule_default(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME), target)
    loops = sch.get_loops(sch.get_sblock(packed_conv2d.BLOCK_NAME + "_update"))
    parallel = [loop for loop in loops if sch.get(loop).kind == tvm.tirx.ForKind.PARALLEL]
    _, panel_block = packed_conv2d.default_conv_blocks(target, 8, (7, 7), 32 // width, width)
    assert [int(sch.get(loop).extent) for loop in parallel] == [8 * (32 // width // panel_block)]
    ex = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 9, 9)).astype(np.float32)
    w = rng.standard_normal((32 // width, 16, 3, 3, width)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((8, 32, 7, 7), np.float32))
    ex.mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))  # (N, C, H, W, 3, 3)
    want = np.einsum("nchwrs,pcrsj->npjhw", windows, w).reshape(8, 32, 7, 7)
    assert relative_error(out.numpy(), want) < float32_rtol(16 * 9)


@pytest.mark.parametrize("batch, blocks", [
    (8, None),     # 8 images: the plane-buffered order, each chunk of channel planes padded whole
    (1, (7, 1)),   # one tile spans an output row, no K-blocking: each tile pads its own input lines
    (1, (1, 1)),   # tiles narrower than the row (a row buffer, one chunk): each output row pads its lines
])
def test_padding_runs_inside_the_kernel_per_task(batch, blocks):
    """A padded convolution pads in a stage of its own kernel, into a task-local buffer under the parallel
    loop (no padded copy of the whole input), with asymmetric padding, and equals numpy in each schedule."""
    from tvm import s_tir, te

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.schedules.common import int64_placeholder, panel_width
    from adntn_deploy.compiler.target import tvm_target

    target = tvm_target(resolve_target("host"))
    width = panel_width(target, 32)
    top, left, bottom, right = 1, 2, 0, 1
    x_ph = int64_placeholder((batch, 16, 7, 6), "x")  # padded to 8 x 9: a 3x3 output of 6 x 7
    wp_ph = int64_placeholder((32 // width, 16, 3, 3, width), "wp")
    out = packed_conv2d.packed_conv2d_te(x_ph, wp_ph, 32, 1, (6, 7), (1, 1), (1, 1), (top, left, bottom, right))
    sch = s_tir.Schedule(te.create_prim_func([x_ph, wp_ph, out]))
    block = sch.get_sblock(packed_conv2d.BLOCK_NAME)
    if blocks is None:
        packed_conv2d.schedule_default(sch, block, target)
    else:
        packed_conv2d.schedule(sch, block, *blocks)
    pad = sch.get_sblock(packed_conv2d.PAD_BLOCK_NAME)
    assert sch.get(pad).writes[0].source.scope() == "local"
    assert sch.get(sch.get_loops(pad)[0]).kind == tvm.tirx.ForKind.PARALLEL
    ex = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 16, 7, 6)).astype(np.float32)
    w = rng.standard_normal((32 // width, 16, 3, 3, width)).astype(np.float32)
    got = tvm.runtime.tensor(np.zeros((batch, 32, 6, 7), np.float32))
    ex.mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), got)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # (N, C, H, W, 3, 3)
    want = np.einsum("nchwrs,pcrsj->npjhw", windows, w).reshape(batch, 32, 6, 7)
    assert relative_error(got.numpy(), want) < float32_rtol(16 * 9)


def test_a_padded_conv_compiles_to_one_kernel(tmp_path):
    """The model's padded conv, bias and ReLU are one kernel: no pad kernel before it."""
    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target

    path, _ = _export(tmp_path, "3x3-pad1-relu")
    target = tvm_target(resolve_target("host"))
    mod = fuse_kernels(import_model(path, "load", prepack_target=target).mod, target)
    kernels = [str(gvar.name_hint) for gvar, f in mod.functions_items() if type(f).__name__ == "PrimFunc"]
    assert len([k for k in kernels if "packed_conv2d" in k]) == 1 and not [k for k in kernels if "pad" in k], kernels


@pytest.mark.parametrize("target, batch, out_hw, panels, width, blocks", [
    (AVX512, 1, (7, 7), 2, 32, (7, 1)),     # a whole output row of 7 x 2 vectors
    (AVX512, 32, (4, 4), 2, 32, (4, 2)),    # 4 columns x 2 panels x 2 vectors
    (AVX512, 1, (28, 28), 1, 16, (14, 1)),  # 16 channels: one vector per panel, 14 of 16 accumulators
    # columns before panels: the columns' broadcasts share an input line, each panel vector is a weight line
    (AVX512, 1, (14, 14), 8, 32, (7, 1)),   # 2 x 4 by a count of one load per broadcast
    (AVX512, 1, (28, 28), 4, 32, (7, 1)),   # 4 x 2 by that count
    (AVX512, 1, (56, 56), 2, 32, (8, 1)),
    (AARCH64, 1, (7, 7), 8, 8, (7, 1)),
])
def test_default_conv_blocks(target, batch, out_hw, panels, width, blocks):
    assert packed_conv2d.default_conv_blocks(tvm.target.Target(target), batch, out_hw, panels, width) == blocks


@pytest.mark.parametrize("target, out_hw, panels, width, blocks", [
    (AVX512, (14, 14), 8, 32, (14, 1)),   # 28 of 32 registers: one panel, more columns
    (AVX512, (13, 13), 8, 32, (13, 1)),
    (AVX512, (7, 7), 64, 32, (7, 1)),     # the row is the limit
    (AVX512, (28, 28), 4, 32, (14, 1)),
    (AVX2, (14, 14), 16, 16, (2, 2)),     # 16 registers: the half-register rule stays
])
def test_pointwise_blocks_widen_their_rows(target, out_hw, panels, width, blocks):
    target = tvm.target.Target(target)
    assert packed_conv2d.default_conv_blocks(target, 1, out_hw, panels, width, pointwise=True) == blocks


@pytest.mark.parametrize("target, batch, out_hw, per_group, width", [
    (AVX2, 32, (7, 7), 64, 8),       # 7 columns x one vector beats 1 column x 4 panels of two vectors
    (AVX2, 1, (7, 7), 512, 8),
    (AVX2, 32, (14, 14), 32, 16),    # 2 columns x 2 panels of two vectors fit: the wider panel
    (AVX2, 1, (56, 56), 64, 16),
    (AVX2, 1, (7, 7), 12, 4),        # no vector-wide panel divides 12
    (AVX512, 32, (7, 7), 64, 32),    # 7 x 2 vectors fit in 32 registers
    (AARCH64, 1, (28, 28), 16, 8),
])
def test_default_conv_width(target, batch, out_hw, per_group, width):
    assert packed_conv2d.default_conv_width(tvm.target.Target(target), batch, out_hw, per_group) == width


@pytest.mark.parametrize("out_hw", [16, 4])
def test_rows_wider_than_a_block_write_back_from_a_row_buffer(out_hw):
    """A row of several register blocks keeps the whole row's accumulators (the parallel loop runs over
    rows, not tiles) and writes each channel's row at once; a row that one block covers keeps its tiles."""
    from tvm import s_tir

    target = tvm.target.Target(AVX2)
    func, width = _conv_kernel(target, out_hw=out_hw)
    sch = s_tir.Schedule(func)
    packed_conv2d.schedule_default(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME), target)
    columns, panels = packed_conv2d.default_conv_blocks(target, 1, (out_hw, out_hw), 32 // width, width)
    parallel = [int(extent) for extent in re.findall(r"T\.parallel\(T\.int64\((\d+)\)", sch.mod["main"].script())]
    assert columns <= out_hw // 4 or columns == out_hw
    # one parallel task per output row and tile of panels: a tile-by-tile write-back had one per block
    assert parallel == [32 // width // panels * out_hw]


def test_neon_conv_loop_is_vectorised():
    """Instruction-level evidence for ARM (timing under qemu means nothing): the aarch64 conv kernel's
    inner loop is NEON vector FMAs (fmla on 4 x float32), one per accumulator vector of the register block."""
    from tvm import s_tir

    target = tvm.target.Target(AARCH64)
    func, width = _conv_kernel(target)
    sch = s_tir.Schedule(func)
    packed_conv2d.schedule_default(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME), target)
    assembly = tvm.compile(sch.mod, target=target).mod.inspect_source("s")
    vector_fmas = re.findall(r"\bfmla\s+v\d+\.4s", assembly)
    row_block, panel_block = packed_conv2d.default_conv_blocks(target, 1, (7, 7), 32 // width, width)
    assert len(vector_fmas) >= row_block * panel_block * width // 4


def test_rvv_conv_loop_uses_vector_fmas():
    """RISC-V with the vector extension (the riscv64-rvv profile, VLEN 256): the conv kernel's FMAs are
    RVV vector instructions (vfmacc), one per filter tap and panel of the register block. TVM turns each
    fixed-length vector loop into a predicated scalable one on RVV (docs/tvm.md), so this checks the
    instructions only, not a register-blocked loop."""
    from tvm import s_tir

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target

    target = tvm_target(resolve_target("riscv64-rvv"))
    func, width = _conv_kernel(target)
    sch = s_tir.Schedule(func)
    packed_conv2d.schedule_default(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME), target)
    assembly = tvm.compile(sch.mod, target=target).mod.inspect_source("s")
    assert len(re.findall(r"\bvfmacc\.v[vf]\s", assembly)) >= 9 * 32 // width  # 3x3 taps x panels


@pytest.mark.parametrize("module, shape", [
    (lambda: nn.Sequential(nn.Conv2d(128, 32, 3, padding=1), nn.ReLU()), (1, 128, 6, 6)),  # 3x3 over 128 channels
    (lambda: nn.Conv2d(2048, 16, 1), (1, 2048, 3, 3)),                                    # 1x1 over 2048 channels
])
def test_long_reductions_are_k_blocked_and_equal_ort(tmp_path, module, shape):
    """A weight panel over REDUCE_SPLIT_BYTES is reduced in chunks of input channels (the row's accumulators
    stay in a row buffer between chunks); the result still equals ORT's."""
    path = export_seeded(module, shape, tmp_path / "long.onnx")
    artifact, error = _compile_against_ort(tmp_path, path, shape)
    assert artifact.manifest["tuning"]["packed_conv2d"] == 1
    assert error < float32_rtol(shape[1] * 9)


@pytest.mark.parametrize("group_in, kh, width, panels, chunk", [
    (16, 3, 32, 1, None),     # 18 KiB panel: stays whole
    (64, 3, 16, 1, None),     # 36 KiB (the zoo's widest AVX2 conv) in a single-panel tile: stays whole
    (64, 3, 16, 4, 4),        # ... in a tile of 4 panels (144 KiB): chunks of 4 channels (9 KiB x 4)
    (16, 5, 16, 2, 4),        # 5x5 over 16 channels, 2 panels of 25 KiB: over the 32 KiB L1, split
    (8, 3, 16, 2, None),      # 2 panels of 4.5 KiB: whole
    (256, 1, 16, 2, 128),     # 2 panels of 16 KiB and 16 KiB of input lines: over the L1, split
    (128, 3, 16, 1, 16),      # 72 KiB: chunks of 16 channels (9 KiB)
    (2048, 1, 16, 1, 256),    # 128 KiB 1x1: chunks of 256 channels (16 KiB)
    (2048, 1, 32, 1, 128),
    (2048, 1, 16, 4, 64),     # a tile of 4 panels: a quarter of the channels per chunk
    (200, 3, 16, 1, 25),      # the largest divisor of 200 that fits (28 would)
])
def test_reduce_chunk(group_in, kh, width, panels, chunk):
    assert packed_conv2d.reduce_chunk(group_in, kh, kh, width, panels) == chunk


@pytest.mark.parametrize("seed", [1, 2])
def test_searchable_schedule_of_a_k_blocked_kernel_is_correct(seed):
    """The sampled register blocks of a K-blocked kernel (128 input channels) give correct results."""
    from tvm import s_tir

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target

    target = tvm_target(resolve_target("host"))
    func, width = _conv_kernel(target, in_channels=128, out_hw=4)
    assert packed_conv2d.reduce_chunk(128, 3, 3, width) is not None
    sch = s_tir.Schedule(func, seed=seed)
    packed_conv2d.schedule(sch, sch.get_sblock(packed_conv2d.BLOCK_NAME))
    got, want = _run_kernel(sch.mod, target, seed, width, in_channels=128, out_hw=4)
    assert relative_error(got, want) < float32_rtol(128 * 9)


@pytest.mark.parametrize("kh, kw, tile_floats, unrolled", [
    (3, 3, 56, 2),    # 7 columns x one AVX2 vector: all 9 taps (504 floats)
    (3, 3, 64, 2),
    (5, 5, 112, 1),   # 7 columns x two vectors: the 5 KW taps (560), not all 25 (2,800)
    (5, 5, 64, 1),    # 25 taps would be 1,600
    (5, 5, 16, 2),    # a small tile: all 25 taps (400)
    (3, 3, 224, 1),   # AVX-512, 7 columns x 32 lanes: KW only (672; all 9 would be 2,016)
    (7, 7, 256, 0),   # even the KW loop would be 1,792
    (1, 1, 128, 2),   # a 1x1 convolution: its one-tap loops (a no-op)
    (1, 3, 64, 2),    # a 1x3 filter: its KW loop and the one-tap KH loop
    (3, 1, 64, 2),    # a 3x1 filter: its KH loop after the one-tap KW loop
    (1, 1, 2048, 0),  # too big a tile even for one tap: stays as written
])
def test_unrolled_taps(kh, kw, tile_floats, unrolled):
    assert packed_conv2d.unrolled_taps(kh, kw, tile_floats) == unrolled


@pytest.mark.parametrize("out_hw, unrolled_loops", [(7, {"rh", "rw"}), (14, {"rh", "rw"})])
def test_default_kernel_unrolls_its_filter_taps(out_hw, unrolled_loops):
    """The untuned 3x3 kernel runs its taps unrolled (a tile of 8 vector accumulators x 9 taps)."""
    from tvm import s_tir
    from tvm.tirx import ForKind

    target = tvm.target.Target(AVX2)
    func, _ = _conv_kernel(target, out_hw=out_hw)
    sch = s_tir.Schedule(func)
    block = sch.get_sblock(packed_conv2d.BLOCK_NAME)
    packed_conv2d.schedule_default(sch, block, target)
    loops = {sch.get(loop).loop_var.name: sch.get(loop).kind for loop in sch.get_loops(block)}
    assert {name for name, kind in loops.items() if kind == ForKind.UNROLLED} >= unrolled_loops
