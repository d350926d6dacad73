"""Our CPU kernels compiled for RISC-V with the vector extension (the riscv64-rvv profile, VLEN 256) run
under qemu-riscv64 and equal numpy.

There is no TVM runtime for riscv64 here (no wheels), so each kernel library runs in a small C harness
(tests/kernel_harness.c) that calls its ``main`` directly. Timing under qemu means nothing; this checks
that the vector code computes the right values: TVM turns our fixed-length vector loops into predicated
scalable ones on RVV (docs/tvm.md), a path the x86 and NEON tests do not exercise. Without the vector
extension the same libraries stop on an illegal instruction, so the vector unit is what runs them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

from tolerance import float32_rtol, relative_error  # noqa: E402

GCC, QEMU = "riscv64-linux-gnu-gcc", "qemu-riscv64"
SYSROOT = "/usr/riscv64-linux-gnu"
RVV_CPU = "rv64,v=true,vlen=256"  # the profile's spacemit-x60: RVV 1.0, VLEN 256


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    """The kernel harness cross-compiled for riscv64 (skips, saying how to get them, without the tools)."""
    import tvm_ffi

    missing = [tool for tool in (GCC, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: apt-get install g++-riscv64-linux-gnu qemu-user")
    binary = tmp_path_factory.mktemp("harness") / "kernel_harness"
    include = Path(tvm_ffi.__file__).parent / "include"
    subprocess.run([GCC, "-O1", "-rdynamic", f"-I{include}", str(Path(__file__).with_name("kernel_harness.c")),
                    "-o", str(binary), "-ldl"], check=True, capture_output=True, timeout=120)
    return binary


def _rvv_target():
    from adntn_deploy.compiler.profiles import resolve_target
    from adntn_deploy.compiler.target import tvm_target

    return tvm_target(resolve_target("riscv64-rvv"))


def _run(harness: Path, tmp_path: Path, func, inputs: list[np.ndarray], out_shape, cpu: str = RVV_CPU):
    """``func`` (a scheduled PrimFunc) built for riscv64-rvv and run on ``inputs`` under qemu: the output."""
    library = tmp_path / "kernel.so"
    tvm.compile(tvm.IRModule({"main": func}), target=_rvv_target()).export_library(str(library), cc="riscv64-linux-gnu-g++")
    specs = []
    for k, array in enumerate(inputs):
        array.astype(np.float32).tofile(tmp_path / f"in{k}.bin")
        specs.append(f"{tmp_path / f'in{k}.bin'}:{','.join(map(str, array.shape))}")
    specs.append(f"{tmp_path / 'out.bin'}:{','.join(map(str, out_shape))}")
    done = subprocess.run([QEMU, "-cpu", cpu, "-L", SYSROOT, str(harness), str(library), *specs],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return None, done
    return np.fromfile(tmp_path / "out.bin", np.float32).reshape(out_shape), done


def _scheduled(func, block_name: str, schedule_default):
    from tvm import s_tir

    sch = s_tir.Schedule(func.with_attr("global_symbol", "main"))
    schedule_default(sch, sch.get_sblock(block_name), _rvv_target())
    return sch.mod["main"]


def test_packed_conv_kernel_equals_numpy_under_qemu(harness, tmp_path):
    from tvm import te

    from adntn_deploy.compiler.schedules import packed_conv2d
    from adntn_deploy.compiler.schedules.common import int64_placeholder, panel_width

    width = panel_width(_rvv_target(), 32)
    assert width == 16  # two vectors of 8 floats (VLEN 256)
    xp = int64_placeholder((1, 16, 9, 9), "xp")
    wp = int64_placeholder((32 // width, 16, 3, 3, width), "wp")
    out = packed_conv2d.packed_conv2d_te(xp, wp, 32, 1, (7, 7), (1, 1), (1, 1))
    func = _scheduled(te.create_prim_func([xp, wp, out]), packed_conv2d.BLOCK_NAME, packed_conv2d.schedule_default)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 9, 9)).astype(np.float32)
    w = rng.standard_normal((32 // width, 16, 3, 3, width)).astype(np.float32)
    got, done = _run(harness, tmp_path, func, [x, w], (1, 32, 7, 7))
    assert got is not None, done.stderr
    windows = np.lib.stride_tricks.sliding_window_view(x[0], (3, 3), axis=(1, 2))  # (C, H, W, 3, 3)
    weight = w.transpose(0, 4, 1, 2, 3).reshape(32, 16, 3, 3)  # channel = panel * width + lane
    want = np.einsum("chwij,ocij->ohw", windows, weight)[None]
    assert relative_error(got, want) < float32_rtol(16 * 9)
    # the same library without the vector extension: an illegal instruction, not a scalar fallback
    failed, done = _run(harness, tmp_path, func, [x, w], (1, 32, 7, 7), cpu="rv64,v=false")
    assert failed is None and done.returncode != 0


def test_pointwise_conv_kernel_equals_numpy_under_qemu(harness, tmp_path):
    from tvm import te

    from adntn_deploy.compiler.schedules import pointwise_conv2d
    from adntn_deploy.compiler.schedules.common import int64_placeholder

    lanes, rows = 8, 8
    x_ph = int64_placeholder((1, 24, 5 * lanes), "x")  # a plane of 5 vectors: blocks of 2 leave a short one
    wp = int64_placeholder((2, 24, rows), "wp")
    out = pointwise_conv2d.pointwise_conv2d_te(x_ph, wp, 16, (5, lanes), lanes)
    func = _scheduled(te.create_prim_func([x_ph, wp, out]), pointwise_conv2d.BLOCK_NAME, pointwise_conv2d.schedule_default)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 24, 5 * lanes)).astype(np.float32)
    w = rng.standard_normal((2, 24, rows)).astype(np.float32)
    got, done = _run(harness, tmp_path, func, [x, w], (1, 16, 5, lanes))
    assert got is not None, done.stderr
    want = (w.transpose(0, 2, 1).reshape(16, 24) @ x[0]).reshape(1, 16, 5, lanes)
    assert relative_error(got, want) < float32_rtol(24)


def test_packed_dense_kernel_equals_numpy_under_qemu(harness, tmp_path):
    from tvm import te

    from adntn_deploy.compiler.schedules import packed_dense
    from adntn_deploy.compiler.schedules.common import int64_placeholder, panel_width

    rows, depth, out_dim = 3, 40, 48
    width = panel_width(_rvv_target(), out_dim)
    x_ph = int64_placeholder((rows, depth), "x")
    wp = int64_placeholder((out_dim // width, depth, width), "wp")
    func = _scheduled(te.create_prim_func([x_ph, wp, packed_dense.packed_dense_te(x_ph, wp, out_dim)]),
                      packed_dense.BLOCK_NAME, packed_dense.schedule_default)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    w = rng.standard_normal((out_dim // width, depth, width)).astype(np.float32)
    got, done = _run(harness, tmp_path, func, [x, w], (rows, out_dim))
    assert got is not None, done.stderr
    want = x @ w.transpose(1, 0, 2).reshape(depth, out_dim)  # column = panel * width + lane
    assert relative_error(got, want) < float32_rtol(depth)
