"""The generic CPU schedule: kernels no rule of ours covers (depthwise and odd grouped convolutions, pools,
pads, channel shuffles) run parallel and vectorised, give ORT's results, and never break a compile."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

from torch import nn  # noqa: E402

from exporting import export_seeded  # noqa: E402
from tolerance import float32_rtol, relative_error  # noqa: E402
from adntn_deploy.compiler.build import compile_model  # noqa: E402
from adntn_deploy.compiler.frontend import import_model  # noqa: E402
from adntn_deploy.compiler.schedules import GENERIC, fuse_kernels, generic_cpu, is_scheduled, schedule_untuned  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402

AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class StridedSlice(nn.Module):
    def forward(self, x):
        return x[:, :, ::2, 1::2]


CASES = {
    # name: (module, input shape)
    "depthwise-3x3-bn-relu": (lambda: nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24).eval(),
                                                    nn.ReLU()), (1, 24, 14, 14)),
    "depthwise-5x5-bn-relu": (lambda: nn.Sequential(nn.Conv2d(24, 24, 5, padding=2, groups=24), nn.BatchNorm2d(24).eval(),
                                                    nn.ReLU()), (1, 24, 14, 14)),
    "depthwise-stride2": (lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), (2, 16, 28, 28)),
    "depthwise-stride2-unpadded": (lambda: nn.Conv2d(16, 16, 3, stride=2, groups=16), (2, 16, 29, 29)),
    "odd-grouped-1x1": (lambda: nn.Conv2d(102, 102, 1, groups=3), (1, 102, 7, 7)),
    "maxpool-pad-shuffle": (lambda: nn.Sequential(nn.MaxPool2d(3, 2, padding=1), ChannelShuffle(3)), (1, 12, 58, 58)),
    "maxpool-stride2": (lambda: nn.MaxPool2d(3, 2), (1, 16, 27, 27)),
    # padded pools: the pad is inlined and only the border rows and columns test bounds
    "avgpool-pad-exclusive": (lambda: nn.AvgPool2d(3, 1, padding=1, count_include_pad=False), (1, 16, 14, 14)),
    "avgpool-5x5-pad-inclusive": (lambda: nn.AvgPool2d(5, 2, padding=2), (2, 6, 17, 17)),
    "maxpool-ceil-mode": (lambda: nn.MaxPool2d(3, 2, ceil_mode=True), (1, 8, 56, 56)),  # padded at the end only
    "maxpool-2x2-pad": (lambda: nn.MaxPool2d(2, 2, padding=1), (1, 4, 9, 12)),
    "maxpool-pad-no-interior": (lambda: nn.MaxPool2d(3, 1, padding=1), (1, 4, 1, 1)),  # every window is padded
    # rows of 229 (prime: left to LLVM) padded to 231 (vectorised by its divisor 77)
    "long-unsplit-rows": (lambda: nn.Sequential(nn.AvgPool2d(3, 1, padding=1), nn.Tanh()), (1, 4, 9, 229)),
    "strided-slice": (lambda: nn.Sequential(StridedSlice(), nn.ReLU()), (1, 8, 80, 120)),
    # a 9x9 window (81 taps): too big to unroll, its loops stay
    "big-window-avgpool-stride2": (lambda: nn.AvgPool2d(9, 2), (1, 4, 25, 25)),
    "global-pool-softmax": (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Softmax(-1)), (2, 40, 7, 7)),
}


def _export(tmp_path, name):
    make, shape = CASES[name]
    return export_seeded(make, shape, tmp_path / f"{name}.onnx"), shape


@pytest.mark.parametrize("case", list(CASES))
def test_generic_kernels_equal_ort(tmp_path, case):
    path, shape = _export(tmp_path, case)
    artifact = compile_model(path, "host", tmp_path / "art")
    assert artifact.manifest["tuning"]["default_schedules"][GENERIC] >= 1
    x = {"input": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    (name, want), = load(path).run(x).items()
    got = load(artifact.path).run(x)[name]
    assert relative_error(got, want) < float32_rtol(102, 102)


def _loops(func_or_stmt):
    import tvm_ffi
    from tvm import tirx

    found = []
    body = func_or_stmt.body if isinstance(func_or_stmt, tirx.PrimFunc) else func_or_stmt
    tvm_ffi.structural_walk(body, [(tirx.For, found.append)], order="post")
    return found


def _scheduled_kernel(tmp_path, case, kernel):
    """The one PrimFunc whose name holds ``kernel`` in CASES[``case``] imported and scheduled untuned for AVX2
    code, asserted scheduled, and the counts of kernels per schedule."""
    path, _ = _export(tmp_path, case)
    target = tvm.target.Target(AVX2)
    imported = import_model(path, "load", prepack_target=target)
    mod, counts = schedule_untuned(fuse_kernels(imported.mod, target), target)
    (func,) = [f for gv, f in mod.functions_items() if kernel in gv.name_hint and type(f).__name__ == "PrimFunc"]
    assert is_scheduled(func)
    return func, counts


def test_depthwise_runs_parallel_with_vector_lanes_under_the_taps(tmp_path):
    """Each tap of a depthwise convolution is one vector multiply-add over a row's output columns (a 5x5
    filter: 3x3 ones read their input in place, test_padded_windows_test_bounds_only_at_the_border)."""
    from tvm import tirx

    conv, counts = _scheduled_kernel(tmp_path, "depthwise-5x5-bn-relu", "conv2d")
    assert counts[GENERIC] >= 1
    kinds = [loop.kind for loop in _loops(conv)]
    assert tirx.ForKind.PARALLEL in kinds
    vectors = [loop for loop in _loops(conv) if loop.kind == tirx.ForKind.VECTORIZED]
    # the padded input row (18 wide) and a 14-wide output row each as one vector (no gathers), under the taps
    assert sorted({int(loop.extent) for loop in vectors}) == [14, 18]
    update = [loop for loop in vectors if int(loop.extent) == 14 and "update" in str(loop.body)]
    assert update, "the taps' update is not vectorised over the output row"


@pytest.mark.parametrize("case, kernel, block, unrolled", [
    ("maxpool-stride2", "max_pool2d", "pool_max", 2),  # 3x3 window, stride 2: both tap loops unrolled
    ("depthwise-stride2-unpadded", "conv2d", "group_conv2d", 2),
    ("big-window-avgpool-stride2", "avg_pool2d", "pool_sum", 0),
    ("strided-slice", "strided_slice", "compute", 0),  # no reduction; the slice is inlined into the ReLU
])
def test_strided_reads_are_left_to_llvm(tmp_path, case, kernel, block, unrolled):
    """A kernel reading along its innermost loop at a stride is not vectorised by TVM (which would build each
    vector lane by lane): its outer loops run in parallel, a short window's taps are unrolled."""
    from tvm import s_tir, tirx

    func, _ = _scheduled_kernel(tmp_path, case, kernel)
    sch = s_tir.Schedule(func)
    (strided,) = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if block in sch.get(b).name_hint]
    kinds = [sch.get(loop).kind for loop in sch.get_loops(strided)]
    assert kinds[0] == tirx.ForKind.PARALLEL
    assert tirx.ForKind.VECTORIZED not in kinds
    assert kinds.count(tirx.ForKind.UNROLLED) == unrolled


@pytest.mark.parametrize("inner, lanes, length", [
    (64, 8, 8), (56, 16, 56), (56, 8, 8), (96, 16, 16), (100, 16, 100), (14, 8, 14), (28, 16, 28), (7, 4, 7), (114, 8, 114),
    (36, 8, 36), (228, 8, 114), (231, 8, 77), (229, 8, 0), (3, 8, 0), (None, 8, 0),
])
def test_vector_length(inner, lanes, length):
    assert generic_cpu._vector_length(inner, lanes) == length


def test_a_form_the_schedule_refuses_keeps_tvm_loops(tmp_path, monkeypatch):
    """A kernel whose generic schedule fails is left unscheduled (TVM's loops), and the compile still works."""
    from adntn_deploy.compiler import schedules

    def refuse(sch, target):
        raise RuntimeError("ScheduleError: a form this schedule does not take")

    monkeypatch.setattr(schedules, "schedule_generic", refuse)
    path, shape = _export(tmp_path, "depthwise-stride2")
    artifact = compile_model(path, "host", tmp_path / "art")
    assert artifact.manifest["tuning"]["default_schedules"][GENERIC] == 0
    x = {"input": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    (name, want), = load(path).run(x).items()
    assert relative_error(load(artifact.path).run(x)[name], want) < float32_rtol(9, 9)


@pytest.mark.parametrize("case, kernel, blocks", [
    # (kernel name, pool blocks: rows split in border / interior (/ border), the interior's columns too)
    ("maxpool-pad-shuffle", "max_pool2d", 3),  # 3x3 / 2, pad 1 on 58: a first row and column border, no last
    ("avgpool-pad-exclusive", "avg_pool2d", 5),  # 3x3 / 1, pad 1: a border on both sides of each axis
    ("maxpool-ceil-mode", "max_pool2d", 3),  # padded after only: a last border row and column
    ("maxpool-pad-no-interior", "max_pool2d", 0),  # no window fits: the pad stays a kernel stage of its own
    ("depthwise-3x3-bn-relu", "conv2d", 5),  # a 3x3 depthwise convolution, padding 1 at stride 1
    ("depthwise-stride2", "conv2d", 3),
    ("depthwise-5x5-bn-relu", "conv2d", 0),  # 25 taps: keeps its pad (faster so, MAX_BORDERED_CONV_TAPS)
])
def test_padded_windows_test_bounds_only_at_the_border(tmp_path, case, kernel, blocks):
    """A padded pool reads its input directly (no padded copy first): its rows and columns are split into
    border and interior loops, and only the border blocks keep the bounds test. ResNet-50's max pool, 3x3 / 2
    over 64 x 112 x 112: 170 -> 64 us on AVX-512 (the equality with ORT is test_generic_kernels_equal_ort)."""
    from tvm import s_tir

    import tvm_ffi

    func, _ = _scheduled_kernel(tmp_path, case, kernel)
    found = []
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, found.append)], order="post")
    names = [str(b.name_hint) for b in found]
    pools = [n for n in names if n.startswith(("pool_", "group_conv2d")) and not n.endswith(("_common", "_partition", "_avg"))]
    assert any("pad" in n for n in names) == (blocks == 0), names
    if blocks:
        assert len(pools) == blocks, names
        # lowered, the interior reads the input with no bounds test left: the loop bounds prove it inside
        lowered = tvm.ir.transform.Sequential([
            s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(),
            s_tir.transform.LowerOpaqueBlock(), tvm.tirx.transform.StmtSimplify()])(tvm.IRModule({"main": func}))
        updates = [str(loop.body) for loop in _loops(lowered["main"])
                   if not _loops(loop.body) and any(out in str(loop.body) for out in ("pool_max", "pool_sum", "group_conv2d"))]
        assert updates and any("if_then_else" not in text for text in updates), "every window loop tests bounds"

