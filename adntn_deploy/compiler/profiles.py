"""Device profiles: data files in targets/, resolved from a profile name, a TVM tag or a JSON target.

No tvm import here: listing profiles must be instant. Resolving ``mcpu: native`` and checking tags import
tvm lazily.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adntn_deploy.errors import CompileError

PROFILE_DIR_ENV = "ADNTN_TARGETS_DIR"


class ProfileError(CompileError):
    """An unknown or malformed device profile, or a missing toolchain."""


def profiles_dir() -> Path:
    """Where profile files live: $ADNTN_TARGETS_DIR, else the repository's (or image's) targets/ folder."""
    env = os.environ.get(PROFILE_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "targets"


@dataclass(frozen=True)
class DeviceProfile:
    """A deployable device: TVM target (JSON dict), toolchain, export format, runtime needs."""

    name: str
    description: str
    target: dict[str, Any]
    arch: str = "native"
    device: str = "cpu"
    tag: str | None = None
    cross_compiler: str | None = None
    cross_compiler_package: str | None = None
    export_format: str = "so"
    runtime_libs: tuple[str, ...] = ()
    rpc_key: str | None = None
    qemu: str | None = None
    sysroot: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> "DeviceProfile":
        """Build a profile from its JSON; ProfileError naming ``source`` for missing or bad fields."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        try:
            fields = {k: v for k, v in data.items() if k in known}
            fields["runtime_libs"] = tuple(fields.get("runtime_libs", ()))
            profile = cls(**fields, extra={k: v for k, v in data.items() if k not in known})
        except TypeError as exc:
            raise ProfileError(f"profile {source or data.get('name')!r} is malformed: {exc}") from None
        if not isinstance(profile.target, dict) or "kind" not in profile.target:
            raise ProfileError(f"profile {profile.name!r}: 'target' must be a JSON dict with a 'kind'")
        if profile.export_format not in ("so", "tar"):
            raise ProfileError(f"profile {profile.name!r}: export_format must be 'so' or 'tar'")
        if profile.device not in ("cpu", "cuda", "opencl"):
            raise ProfileError(f"profile {profile.name!r}: device must be cpu, cuda or opencl")
        return profile

    @property
    def is_cross(self) -> bool:
        """True when the artifact runs on another CPU architecture than this machine."""
        return self.arch not in ("native", host_arch())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``adntn-deploy targets --json`` prints)."""
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        data["runtime_libs"] = list(self.runtime_libs)
        return {**data, **self.extra}


def host_arch() -> str:
    """This machine's architecture as profiles name it (x86_64, aarch64, armv7l, riscv64)."""
    return platform.machine()


def list_profiles() -> list[DeviceProfile]:
    """Every profile in :func:`profiles_dir`, sorted by name."""
    folder = profiles_dir()
    if not folder.is_dir():
        raise ProfileError(f"no device profiles at {folder}: set {PROFILE_DIR_ENV} to the repository's targets/ folder")
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile file {path} is not valid JSON: {exc}") from None
        out.append(DeviceProfile.from_dict(data, str(path)))
    return out


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name``; ProfileError listing the known names otherwise."""
    profiles = {p.name: p for p in list_profiles()}
    if name not in profiles:
        raise ProfileError(f"unknown target {name!r}: use a profile ({', '.join(profiles)}), a TVM tag, or a JSON dict")
    return profiles[name]


def resolve_target(spec: str) -> DeviceProfile:
    """Turn ``target`` (``--target``) into a profile: a profile name, a TVM target tag, or a JSON target dict.

    Raises:
        ProfileError: none of the three forms matches, or the JSON is invalid.
    """
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            target = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"target= JSON is invalid: {exc}") from None
        return _profile_for_target("custom", target, f"custom target {spec}")
    profiles = {p.name: p for p in list_profiles()}
    if spec in profiles:
        return profiles[spec]
    import tvm

    if spec in {str(t) for t in tvm.target.list_tags()}:
        target = _export(tvm.target.Target(spec))
        return _profile_for_target(spec, target, f"TVM tag {spec}", tag=spec)
    names = ", ".join(profiles)
    raise ProfileError(f"unknown target {spec!r}: use a profile ({names}), a TVM tag (tvm.target.list_tags()), or a JSON dict")


def _export(target) -> dict[str, Any]:
    """A TVM Target as plain JSON types (tvm_ffi Map/Array/String become dict/list/str)."""
    return to_json_value(target.export())


def to_json_value(value: Any) -> Any:
    """Recursively convert tvm_ffi containers and scalars to JSON-serialisable Python values."""
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return str(value)
    if hasattr(value, "items"):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if hasattr(value, "__iter__"):
        return [to_json_value(v) for v in value]
    if hasattr(value, "value"):  # IntImm / FloatImm
        return value.value
    return str(value)


_TRIPLE_ARCH = {"aarch64": "aarch64", "armv7": "armv7l", "arm": "armv7l", "riscv64": "riscv64", "x86_64": "x86_64"}
_CROSS = {
    "aarch64": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", "qemu-aarch64", "/usr/aarch64-linux-gnu"),
    "armv7l": ("arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf", "qemu-arm", "/usr/arm-linux-gnueabihf"),
    "riscv64": ("riscv64-linux-gnu-g++", "g++-riscv64-linux-gnu", "qemu-riscv64", "/usr/riscv64-linux-gnu"),
}


def triple_arch(triple: str) -> str | None:
    """The architecture (as profiles name it) of an LLVM target triple, or None for an empty/unknown one."""
    return next((arch for prefix, arch in _TRIPLE_ARCH.items() if triple.startswith(prefix)), None)


def _profile_for_target(name: str, target: dict[str, Any], description: str, tag: str | None = None) -> DeviceProfile:
    if not isinstance(target, dict) or "kind" not in target:
        raise ProfileError("a target must be a JSON dict with a 'kind', e.g. {\"kind\": \"llvm\", \"mcpu\": \"cortex-a72\"}")
    cpu = target.get("host", target) if target.get("kind") != "llvm" else target
    triple = str(cpu.get("mtriple", ""))
    arch = triple_arch(triple) or "native"
    device = {"cuda": "cuda", "opencl": "opencl"}.get(str(target.get("kind")), "cpu")
    cross = _CROSS.get(arch) if arch not in ("native", host_arch()) else None
    return DeviceProfile(
        name=name, description=description, target=target, arch=arch, device=device, tag=tag,
        cross_compiler=cross[0] if cross else None, cross_compiler_package=cross[1] if cross else None,
        qemu=cross[2] if cross else None, sysroot=cross[3] if cross else None,
        runtime_libs=("libtvm_runtime.so", "libtvm_ffi.so") if cross else (),
    )


def require_cross_compiler(profile: DeviceProfile, override: str | None = None) -> str | None:
    """The cross g++ to link with (None when compiling for this machine).

    Raises:
        ProfileError: the compiler is not on PATH; the message names the Debian package that installs it.
    """
    compiler = override or (profile.cross_compiler if profile.is_cross else None)
    if compiler is None:
        return None
    if shutil.which(compiler.split()[0]) is None:
        package = profile.cross_compiler_package or "the matching g++ cross compiler"
        raise ProfileError(
            f"cross compiler {compiler.split()[0]} not found for target {profile.name}: apt-get install {package}"
            " (or pass cross_compiler=)"
        )
    return compiler
