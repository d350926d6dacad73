"""TVM targets of device profiles, CPU vector shapes, and the TVM runtime's thread pool on this machine.

The first compiler layer that imports tvm (lazily, inside functions): :mod:`profiles` is data, this module
turns a profile into a ``tvm.target.Target`` and answers what the kernels need to know about it.
"""

from __future__ import annotations

import os
from typing import Any

from adntn_deploy.compiler.profiles import DeviceProfile, ProfileError, host_arch

#: TVM's CPU thread pool reads its size from this variable (at each parallel launch)
THREADS_ENV = "TVM_NUM_THREADS"
_BIG_CORES = 1  # TVM's AffinityMode kBig, its default: on big.LITTLE boards, the big cores first


def configure_threads(threads: int | None = None) -> int:
    """Size TVM's CPU thread pool for this process and the processes it starts; returns the thread count.

    ``threads`` wins; else a ``TVM_NUM_THREADS`` the user set is kept; else the CPUs this process may use,
    the same default as our ONNX Runtime predictor. A given count above those CPUs is capped to them with a
    note on stderr (thousands of threads hung the pool). Why: TVM's own default on x86 is half the logical CPUs
    (it assumes two hyper-threads per core), which on a VM or container without SMT leaves half the cores
    idle -- measured 2.0x slower on a 32x4096x4096 dense layer on the 2-core host. The pool is
    process-wide, so the last call wins for every predictor in the process.

    Raises:
        ValueError: ``threads`` below 1.
    """
    from adntn_deploy.limits import cap_threads
    from adntn_deploy.limits import usable_cpus

    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        os.environ[THREADS_ENV] = str(cap_threads(threads, "threads"))
    else:
        given = os.environ.get(THREADS_ENV, "").strip()
        usable = given.isascii() and given.isdigit() and len(given) <= 9 and int(given) >= 1
        os.environ[THREADS_ENV] = str(cap_threads(int(given), THREADS_ENV) if usable else usable_cpus())
    count = int(os.environ[THREADS_ENV])
    import tvm  # noqa: F401 - loads the runtime library that registers the function below
    import tvm_ffi

    # parallel loops size themselves from the variable at each launch; the pool's own worker count (what
    # tvm.runtime.num_threads() reports) is fixed when it is first used unless reconfigured here
    tvm_ffi.get_global_func("runtime.config_threadpool")(_BIG_CORES, count)
    return count


def tvm_target(profile: DeviceProfile):
    """The tvm.target.Target of a profile, with ``mcpu: native`` and missing ``num-cores`` filled in."""
    import tvm

    from adntn_deploy.limits import usable_cpus

    def fill(target: dict[str, Any]) -> dict[str, Any]:
        target = dict(target)
        if target.get("kind") == "llvm":
            if target.get("mcpu") == "native":
                target["mcpu"] = str(tvm.target.codegen.llvm_get_system_cpu())
            if profile.arch in ("native", host_arch()):
                target.setdefault("num-cores", usable_cpus())
        if isinstance(target.get("host"), dict):
            target["host"] = fill(target["host"])
        return target

    try:
        return tvm.target.Target(fill(profile.target))
    except Exception as exc:
        raise ProfileError(f"target of profile {profile.name!r} is not valid for TVM: {str(exc).splitlines()[0]}") from None


def vector_shape(target) -> tuple[int, int]:
    """(float32 lanes per vector register, vector registers) of a CPU ``target``."""
    from tvm.target import codegen

    triple = str(target.attrs.get("mtriple", "")) if target.attrs else ""
    if not triple or triple.startswith("x86_64"):
        if codegen.target_has_features("avx512f", target):
            return 16, 32
        if codegen.target_has_features("avx2", target):
            return 8, 16
        return 4, 16
    if triple.startswith("aarch64"):
        return 4, 32
    return 4, 16  # armv7 NEON (16 q registers); riscv64 without V falls back to scalar code either way
