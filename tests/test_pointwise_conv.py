"""Pointwise (1x1) convolutions: the NCHW matrix-product kernel takes the ones it covers, gives ORT's results
with the bias, residual add and activation fused into it, and its searchable schedule stays correct."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

from torch import nn  # noqa: E402

from exporting import export_seeded  # noqa: E402
from tolerance import float32_rtol, relative_error  # noqa: E402
from adntn_deploy.compiler.build import compile_model  # noqa: E402
from adntn_deploy.compiler.frontend import import_model  # noqa: E402
from adntn_deploy.compiler.schedules import fuse_kernels, pointwise_conv2d  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402

AVX512 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}


class Residual(nn.Module):
    """relu(conv1x1(x) + x): a ResNet bottleneck's last convolution and its shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return (self.conv(x) + x).relu()


CASES = {
    # name: (module, input shape, kernels on the pointwise kernel)
    "expand-bias-relu": (lambda: nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU()), (1, 16, 8, 8), 1),
    "reduce-batch2": (lambda: nn.Conv2d(64, 16, 1, bias=False), (2, 64, 8, 8), 1),  # C > O: channel blocks inside
    "residual": (lambda: Residual(32), (1, 32, 4, 16), 1),                        # rows of 16, a 64-pixel plane
    "six-output-channels": (lambda: nn.Conv2d(16, 6, 1), (1, 16, 8, 8), 1),
    # forms the packed conv kernel keeps
    # strided: subsampled first, then stride 1 (an 8x8 plane here, one of 7x7 in the next case)
    "stride-2": (lambda: nn.Conv2d(16, 32, 1, stride=2), (1, 16, 16, 16), 1),
    "plane-of-49": (lambda: nn.Conv2d(16, 32, 1), (1, 16, 7, 7), 0),
    "stride-2-to-7x7": (lambda: nn.Conv2d(16, 32, 1, stride=2), (1, 16, 13, 13), 0),
    "three-output-channels": (lambda: nn.Conv2d(16, 3, 1), (1, 16, 8, 8), 0),
    "3x3": (lambda: nn.Conv2d(16, 32, 3, padding=1), (1, 16, 8, 8), 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pointwise_forms_equal_ort(tmp_path, case):
    make, shape, pointwise = CASES[case]
    path = export_seeded(make, shape, tmp_path / f"{case}.onnx")
    artifact = compile_model(path, "host", tmp_path / "art")
    tuning = artifact.manifest["tuning"]
    assert tuning["default_schedules"][pointwise_conv2d.RULE_NAME] == pointwise
    assert tuning["packed_conv2d"] == 1  # the conv rule's rewrite counts both kernels
    x = {"input": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    (name, want), = load(path).run(x).items()
    assert relative_error(load(artifact.path).run(x)[name], want) < float32_rtol(64, 64)


def test_bias_residual_and_activation_fuse_into_the_kernel(tmp_path):
    make, shape, _ = CASES["residual"]
    path = export_seeded(make, shape, tmp_path / "residual.onnx")
    target = tvm.target.Target(AVX512)
    mod = fuse_kernels(import_model(path, "load", prepack_target=target).mod, target)
    kernels = [gv.name_hint for gv, f in mod.functions_items() if type(f).__name__ == "PrimFunc"]
    (kernel,) = [name for name in kernels if "pointwise" in name]
    assert "add" in kernel and "relu" in kernel, kernels


def _kernel(lanes: int, channels=24, out_channels=16, hw=(4, 8)):
    """A standalone pointwise kernel (batch 1, 8 output channels per weight panel) for ``lanes``-wide vectors."""
    from tvm import te

    from adntn_deploy.compiler.schedules.common import int64_placeholder

    rows = 8
    x = int64_placeholder((1, channels, hw[0] * hw[1]), "x")
    wp = int64_placeholder((out_channels // rows, channels, rows), "wp")
    out = pointwise_conv2d.pointwise_conv2d_te(x, wp, out_channels, hw, lanes)
    return te.create_prim_func([x, wp, out]).with_attr("global_symbol", "main")


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_searchable_schedule_gives_correct_kernels(seed):
    """The rule's sampled decisions (pixel vectors per block, channel blocks inside or outside the pixel
    tile: what tuning searches) all give correct kernels."""
    from tvm import s_tir

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target, vector_shape

    target = tvm_target(resolve_target("host"))
    func = _kernel(vector_shape(target)[0])
    sch = s_tir.Schedule(func, seed=seed)
    pointwise_conv2d.schedule(sch, sch.get_sblock(pointwise_conv2d.BLOCK_NAME))
    ex = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 24, 32)).astype(np.float32)
    wp = rng.standard_normal((2, 24, 8)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 16, 4, 8), np.float32))
    ex.mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wp), out)
    weight = wp.transpose(0, 2, 1).reshape(16, 24)  # channel = panel * 8 + row
    want = (weight @ x[0]).reshape(1, 16, 4, 8)
    assert relative_error(out.numpy(), want) < float32_rtol(24)


@pytest.mark.parametrize("vectors, channels_inside", [(2, False), (2, True), (3, True)])
def test_blocks_that_do_not_divide_the_plane_give_correct_kernels(vectors, channels_inside):
    """A plane of 5 vectors in blocks of 2 or 3 (the untuned kernel's blocks need not divide the plane):
    the last, short block computes its pixels: every output element is written, with the right value."""
    from tvm import s_tir

    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target, vector_shape

    target = tvm_target(resolve_target("host"))
    lanes = vector_shape(target)[0]
    func = _kernel(lanes, hw=(5, lanes))
    sch = s_tir.Schedule(func)
    pointwise_conv2d.schedule(sch, sch.get_sblock(pointwise_conv2d.BLOCK_NAME), vectors, channels_inside)
    ex = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(vectors)
    x = rng.standard_normal((1, 24, 5 * lanes)).astype(np.float32)
    wp = rng.standard_normal((2, 24, 8)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((1, 16, 5, lanes), np.nan, np.float32))
    ex.mod["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wp), out)
    want = (wp.transpose(0, 2, 1).reshape(16, 24) @ x[0]).reshape(1, 16, 5, lanes)
    assert relative_error(out.numpy(), want) < float32_rtol(24)


@pytest.mark.parametrize("pixel_vectors, registers, rows, vectors", [
    (196, 32, 8, 2), (49, 32, 8, 2), (15, 32, 8, 2), (2, 32, 8, 2), (1, 32, 8, 1),  # AVX-512, NEON: 16 accumulators
    (196, 16, 8, 1), (196, 16, 4, 2),                                               # AVX2: 8 accumulators
    (196, 32, 4, 4), (15, 32, 4, 4), (3, 32, 4, 3), (64, 32, 5, 3),  # blocks that do not divide the plane too
])
def test_default_vectors(pixel_vectors, registers, rows, vectors):
    assert pointwise_conv2d.default_vectors(pixel_vectors, registers, rows) == vectors


def test_neon_pointwise_loop_is_vectorised():
    """Instruction-level evidence for ARM (timing under qemu means nothing): the aarch64 pointwise kernel's
    reduction loop is NEON vector FMAs, one per accumulator vector of the register block (8 x 2 x 4 lanes)."""
    import re

    from tvm import s_tir

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4})
    func = _kernel(4, hw=(8, 8))
    sch = s_tir.Schedule(func)
    pointwise_conv2d.schedule_default(sch, sch.get_sblock(pointwise_conv2d.BLOCK_NAME), target)
    assembly = tvm.compile(sch.mod, target=target).mod.inspect_source("s")
    assert len(re.findall(r"\bfmla\s+v\d+\.4s", assembly)) >= 8 * 2
