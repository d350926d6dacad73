"""Build and run ``adntn-runner``, the native C++ program that runs a compiled artifact on an edge board.

The runner (``adntn_runner.cc`` beside this file) links only the TVM runtime (``libtvm_runtime.so`` and
``libtvm_ffi.so``); see README.md here for deploying it to a board. Nothing here imports TVM: the headers
and x86 libraries are found from the installed ``tvm`` / ``tvm_ffi`` packages' folders without importing them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from adntn_deploy.errors import CompileError

__all__ = ["RUNTIME_LIBS", "SOURCE", "build_runner", "run_with_qemu", "runtime_libs_dir"]

#: The two shared libraries the runner needs at run time, copied beside the binary.
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
#: The runner's C++ source.
SOURCE = Path(__file__).with_name("adntn_runner.cc")

_REPO = Path(__file__).resolve().parents[3]
# arch -> (cross g++, Debian package that provides it, qemu binary, sysroot for qemu -L)
_TOOLCHAINS = {
    "aarch64": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", "qemu-aarch64", "/usr/aarch64-linux-gnu"),
    "armv7": ("arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf", "qemu-arm", "/usr/arm-linux-gnueabihf"),
    "riscv64": ("riscv64-linux-gnu-g++", "g++-riscv64-linux-gnu", "qemu-riscv64", "/usr/riscv64-linux-gnu"),
}
_HOST_ARCH = "x86_64"


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (importing tvm takes seconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CompileError(
            f"Python package '{name}' is not installed; install it with "
            "pip install 'apache-tvm[all]==0.27.0.post1' 'apache-tvm-ffi==0.1.14.post1'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _host_libs() -> dict[str, Path]:
    """Paths of the x86 libtvm_runtime.so and libtvm_ffi.so shipped in the installed Python wheels."""
    libs = {
        "libtvm_runtime.so": _package_dir("tvm") / "lib" / "libtvm_runtime.so",
        "libtvm_ffi.so": _package_dir("tvm_ffi") / "lib" / "libtvm_ffi.so",
    }
    for name, path in libs.items():
        if not path.is_file():
            raise CompileError(f"{name} not found at {path}; reinstall apache-tvm==0.27.0.post1 / apache-tvm-ffi==0.1.14.post1")
    return libs


def _include_dirs() -> list[Path]:
    """Header folders for the runner: tvm_ffi's (which also holds dlpack) and tvm's."""
    dirs = [_package_dir("tvm_ffi") / "include", _package_dir("tvm") / "include"]
    if not (dirs[0] / "tvm" / "ffi" / "extra" / "module.h").is_file():
        raise CompileError(f"tvm_ffi headers not found under {dirs[0]}; reinstall apache-tvm-ffi==0.1.14.post1")
    return [d for d in dirs if d.is_dir()]


def runtime_libs_dir(arch: str) -> Path:
    """Return the folder holding libtvm_runtime.so and libtvm_ffi.so built for the board architecture ``arch``.

    That is ``$ADNTN_EDGE_RUNTIME_DIR`` when set, else ``<repo>/.cache/edge-runtime/<arch>`` (filled by
    ``scripts/fetch_edge_runtime.sh aarch64`` from the official PyPI wheels; for armv7 / riscv64 build the
    runtime yourself, see README.md here).

    Raises:
        CompileError: either library is missing there; the message says how to fetch them.
    """
    env = os.environ.get("ADNTN_EDGE_RUNTIME_DIR")
    folder = Path(env) if env else _REPO / ".cache" / "edge-runtime" / arch
    missing = [name for name in RUNTIME_LIBS if not (folder / name).is_file()]
    if missing:
        fix = (
            f"run scripts/fetch_edge_runtime.sh {arch}"
            if arch == "aarch64"
            else "build the TVM runtime for it (adntn_deploy/compiler/runner/README.md) and set ADNTN_EDGE_RUNTIME_DIR"
        )
        raise CompileError(f"{', '.join(missing)} for {arch} not found in {folder}; {fix}")
    return folder


def build_runner(arch: str, out_dir: Path, cross_compiler: str | None = None) -> Path:
    """Compile ``adntn-runner`` for ``arch`` into ``out_dir`` and copy the two runtime libraries beside it.

    ``arch`` is ``"aarch64"`` (cross g++ ``aarch64-linux-gnu-g++``, libraries from :func:`runtime_libs_dir`),
    ``"armv7"`` / ``"riscv64"`` (same, with libraries you built) or ``"x86_64"`` (host ``g++`` and the x86
    libraries of the installed tvm / tvm_ffi wheels, to test the runner natively). ``cross_compiler``
    overrides the g++ to use. The binary gets an rpath of ``$ORIGIN``, so it finds the libraries copied
    beside it. Compiling takes a few seconds.

    Returns:
        The path of the binary, ``out_dir / "adntn-runner"``.

    Raises:
        CompileError: unknown arch, compiler not installed (names the Debian package), runtime libraries
            or headers missing, or the compilation failed (with the compiler's last lines).
    """
    out_dir = Path(out_dir)
    if arch == _HOST_ARCH:
        cxx, package = cross_compiler or "g++", "g++"
        libs = _host_libs()
    elif arch in _TOOLCHAINS:
        cxx, package = cross_compiler or _TOOLCHAINS[arch][0], _TOOLCHAINS[arch][1]
        folder = runtime_libs_dir(arch)
        libs = {name: folder / name for name in RUNTIME_LIBS}
    else:
        raise CompileError(f"unknown runner arch '{arch}'; use one of x86_64, {', '.join(_TOOLCHAINS)}")
    if shutil.which(cxx) is None:
        raise CompileError(f"C++ compiler '{cxx}' not found; install it with apt-get install {package}")

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, path in libs.items():
        if path.resolve() != (out_dir / name).resolve():
            shutil.copy2(path, out_dir / name)
    binary = out_dir / "adntn-runner"
    cmd = [cxx, "-std=c++17", "-O2", str(SOURCE), "-o", str(binary)]
    cmd += [f"-I{d}" for d in _include_dirs()]
    # Link against the copies in out_dir; --no-as-needed keeps libtvm_runtime (it registers the VM loader).
    cmd += [f"-L{out_dir}", "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed"]
    cmd += ["-Wl,-rpath,$ORIGIN", "-ldl", "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise CompileError(f"building adntn-runner for {arch} failed ({' '.join(cmd)}):\n{tail}")
    return binary


def run_with_qemu(binary: Path, args: list[str], arch: str = "aarch64") -> subprocess.CompletedProcess:
    """Run a cross-compiled ``binary`` with ``args`` under qemu user-mode emulation and return the result.

    Runs ``qemu-<arch> -L /usr/<triple> binary args...`` with ``LD_LIBRARY_PATH`` set to the binary's folder
    (where :func:`build_runner` put the runtime libraries), capturing stdout and stderr as text. The exit
    status is not checked. Timings under qemu say nothing about real boards; use it to check correctness.

    Raises:
        CompileError: unknown arch, or the qemu binary is not installed (package qemu-user).
    """
    if arch not in _TOOLCHAINS:
        raise CompileError(f"no qemu setup for arch '{arch}'; use one of {', '.join(_TOOLCHAINS)}")
    _, _, qemu, sysroot = _TOOLCHAINS[arch]
    if shutil.which(qemu) is None:
        raise CompileError(f"{qemu} not found; install it with apt-get install qemu-user")
    binary = Path(binary).resolve()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(binary.parent)
    return subprocess.run([qemu, "-L", sysroot, str(binary), *map(str, args)], capture_output=True, text=True, env=env)
