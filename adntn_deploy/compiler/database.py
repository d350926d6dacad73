"""Which shipped tuning database a compile applies: records that travel between CPUs of one ISA.

MetaSchedule matches records to kernels by workload hash, and a kernel's TIR does not depend on ``-mcpu``
or ``num-cores`` (it does depend on the vector width, through the packed-dense panels). So records tuned
on one AVX-512 CPU apply to every AVX-512 CPU. Profiles that carry an ``isa`` entry (targets/*.json:
LLVM feature names and a rank) are the ISA classes; ``schedules/<profile>/`` holds their records.

Resolution for a compile target:
1. the profile's own folder, ``schedules/<profile>/``, when it has one;
2. otherwise, for CPU (llvm) targets, the highest-ranked ISA profile of the same architecture whose
   features the target's CPU has and that ships records (``--target host`` on an AVX-512 CPU ->
   x86-64-avx512, on an AVX2 CPU -> x86-64-avx2);
3. otherwise none: generic (untuned) schedules, with a note saying why, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adntn_deploy.compiler.profiles import DeviceProfile, host_arch, list_profiles, triple_arch

DB_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass(frozen=True)
class RecordsChoice:
    """The database a compile applies (or None) and a one-line note saying which and why."""

    folder: Path | None
    profile: str | None
    note: str


def has_database(folder: Path) -> bool:
    """Whether ``folder`` holds both MetaSchedule JSON database files."""
    return all((folder / name).is_file() for name in DB_FILES)


def target_arch(profile: DeviceProfile, target) -> str:
    """The CPU architecture a tvm Target compiles for (its host's, for GPU targets)."""
    cpu = target.host if str(target.kind.name) != "llvm" and target.host is not None else target
    triple = str(cpu.attrs.get("mtriple", "")) if "mtriple" in cpu.attrs else ""
    return triple_arch(triple) or (host_arch() if profile.arch == "native" else profile.arch)


def isa_profiles(arch: str) -> list[DeviceProfile]:
    """The profiles with an ``isa`` entry for ``arch``, best (highest rank) first."""
    found = [p for p in list_profiles() if isinstance(p.extra.get("isa"), dict) and p.arch == arch]
    return sorted(found, key=lambda p: -int(p.extra["isa"].get("rank", 0)))


def supports(target, features: list[str]) -> bool:
    """Whether the CPU of an llvm ``target`` has every LLVM feature in ``features``."""
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(list(features), target))
    except Exception:  # an LLVM without this architecture's backend: treat as unsupported
        return False


def choose_records(profile: DeviceProfile, target, schedules: Path) -> RecordsChoice:
    """The shipped database for compiling ``profile`` (as the tvm ``target``), following the module rules."""
    own = schedules / profile.name
    if has_database(own):
        return RecordsChoice(own, profile.name, f"records of profile {profile.name}")
    if str(target.kind.name) != "llvm":
        return RecordsChoice(None, None, f"no shipped records for {profile.name}; tune them with adntn-deploy tune")
    arch = target_arch(profile, target)
    cpu = str(target.attrs.get("mcpu", "")) if "mcpu" in target.attrs else ""
    candidates = isa_profiles(arch)
    for isa in candidates:
        if supports(target, isa.extra["isa"].get("features", [])) and has_database(schedules / isa.name):
            return RecordsChoice(schedules / isa.name, isa.name,
                                 f"records of {isa.name}: this {cpu or arch} CPU has its instruction set")
    if not candidates:
        why = f"no instruction-set profile for {arch}"
    else:
        usable = [p.name for p in candidates if supports(target, p.extra["isa"].get("features", []))]
        why = (f"no shipped records for {', '.join(usable)}" if usable
               else f"this {cpu or arch} CPU has none of the instruction sets of {', '.join(p.name for p in candidates)}")
    return RecordsChoice(None, None, f"generic schedules: {why}; tune with adntn-deploy tune")
