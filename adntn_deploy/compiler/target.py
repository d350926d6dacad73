"""TVM targets of device profiles, CPU vector shapes, and the TVM runtime's thread pool on this machine.

The first compiler layer that imports tvm (lazily, inside functions): :mod:`profiles` is data, this module
turns a profile into a ``tvm.target.Target`` and answers what the kernels need to know about it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from adntn_deploy.compiler.profiles import DeviceProfile, ProfileError, host_arch

#: TVM's CPU thread pool reads its size from this variable (at each parallel launch)
THREADS_ENV = "TVM_NUM_THREADS"
#: "0" keeps TVM from pinning its worker threads to cores (read when the pool is configured)
BIND_ENV = "TVM_BIND_THREADS"
_BIG_CORES = 1  # TVM's AffinityMode kBig, its default: on big.LITTLE boards, the big cores first


def import_tvm():
    """``import tvm``, the first time without letting tvm_ffi import torch; returns the tvm module.

    tvm_ffi imports torch while it is imported whenever torch is installed (to load an optional, faster
    DLPack path for torch tensors). A process that never touches torch -- ``run`` or ``serve`` of an artifact,
    ``compile`` or ``tune`` of an ONNX file -- paid for it: loading a compiled 2048 x 2048 layer took 2.0 s
    and 446 MiB peak instead of 0.6 s and 240 MiB (2-core host). So while tvm is first imported, and torch is
    not yet, torch is hidden from the importer. Torch stays importable afterwards, and its tensors still reach
    TVM through the standard DLPack protocol; only tvm_ffi's optional torch extension is not loaded. Another
    thread that imports torch during those ~0.5 s gets an ImportError: import tvm first in threaded programs.
    """
    if "tvm" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes ``import torch`` raise ImportError
        try:
            import tvm  # noqa: F401
        finally:
            if "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
    import tvm

    return tvm


def configure_threads(threads: int | None = None) -> int:
    """Size TVM's CPU thread pool for this process and the processes it starts; returns the thread count.

    ``threads`` wins; else a ``TVM_NUM_THREADS`` the user set is kept; else the CPUs this process may use,
    the same default as our ONNX Runtime predictor. A given count above those CPUs is capped to them with a
    note on stderr (thousands of threads hung the pool). Why: TVM's own default on x86 is half the logical CPUs
    (it assumes two hyper-threads per core), which on a VM or container without SMT leaves half the cores
    idle -- measured 2.0x slower on a 32x4096x4096 dense layer on the 2-core host. The pool is
    process-wide, so the last call wins for every predictor in the process. Where all usable cores are
    alike, the workers are not pinned to cores (``TVM_BIND_THREADS=0``, unless the user set it): see the
    comment in the body.

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
    if BIND_ENV not in os.environ and _identical_cores():
        # TVM pins each worker to a core but leaves the calling thread (task 0) free to run anywhere; when the
        # OS puts it on a worker's core, both share that core for the life of the process. Measured on the
        # 2-core host, cnn32 at batch 1 in fresh processes: a third of them ran at 0.11 ms (one core's speed)
        # instead of 0.08 pinned; 12 of 12 at 0.075-0.081 unpinned. Boards with big and little cores keep
        # the pinning, which is what puts the threads on the big cores.
        os.environ[BIND_ENV] = "0"
    import_tvm()  # loads the runtime library that registers the function below
    import tvm_ffi

    # parallel loops size themselves from the variable at each launch; the pool's own worker count (what
    # tvm.runtime.num_threads() reports) is fixed when it is first used unless reconfigured here
    tvm_ffi.get_global_func("runtime.config_threadpool")(_BIG_CORES, count)
    return count


def _identical_cores() -> bool:
    """Whether every CPU this process may use has the same top frequency (what TVM tells big cores from
    little ones by); a CPU without cpufreq counts as like the others (VMs and containers show none)."""
    from pathlib import Path

    frequencies = set()
    for cpu in os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else ():
        try:
            frequencies.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq").read_text().strip())
        except OSError:
            continue
    return len(frequencies) <= 1


def tvm_target(profile: DeviceProfile):
    """The tvm.target.Target of a profile, with ``mcpu: native`` and missing ``num-cores`` filled in."""
    tvm = import_tvm()

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

    from adntn_deploy.compiler.native_log import NativeLog

    # LLVM prints an error line of its own for an unknown CPU on each query: ours says it once, with the fix
    with NativeLog().capture():
        try:
            target = tvm.target.Target(fill(profile.target))
        except Exception as exc:
            reason = str(exc).splitlines()[0]
            raise ProfileError(f"target of profile {profile.name!r} is not valid for TVM: {reason}") from None
        for llvm in (target, target.host):
            if llvm is not None and llvm.kind.name == "llvm":
                _check_cpu_name(llvm, profile.name)
    return target


def _check_cpu_name(target, profile_name: str) -> None:
    """Refuse an ``mcpu`` LLVM does not know for the target's triple: LLVM would print an error per kernel
    and build for its generic CPU, so a typo gave a slow artifact and no failure.

    Raises:
        ProfileError: naming the CPU, the closest names LLVM knows, and how to list them all.
    """
    import difflib

    from tvm.target import codegen

    cpu = str(target.attrs.get("mcpu", "")) if target.attrs else ""
    if not cpu:
        return
    known = [str(name) for name in codegen.llvm_get_cpu_archlist(target)]
    if not known or cpu in known:
        return
    triple = str(target.attrs.get("mtriple", "")) or host_arch()
    close = difflib.get_close_matches(cpu, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ProfileError(f"LLVM knows no CPU {cpu!r} for {triple} (target of {profile_name!r}): {hint}"
                       f"list them with: llc -mtriple={triple} -mcpu=help")


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
    if triple.startswith("riscv64") and codegen.target_has_features("v", target):
        # RVV: 32 vector registers of VLEN bits, VLEN at least the largest zvl<N>b the CPU guarantees; a
        # fixed-length vector of that many floats fills one register (LMUL 1)
        vlen = max([bits for bits in (128, 256, 512, 1024) if codegen.target_has_features(f"zvl{bits}b", target)],
                   default=128)
        return vlen // 32, 32
    return 4, 16  # armv7 NEON (16 q registers); riscv64 without V falls back to scalar code either way
