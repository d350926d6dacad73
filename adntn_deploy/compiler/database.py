"""Tuning databases: which shipped one a compile applies, and reading, checking, copying and applying them.

A database is a MetaSchedule JSON work dir: ``database_workload.json`` + ``database_tuning_record.json``
(one JSON record per line). Every line is checked before TVM's reader sees it (:func:`copy_database`), and
files change only by write-to-temp-and-rename (:func:`publish`, :func:`clean_database`). A writer (``tune``,
``refresh-records``) holds the folder's lock (:func:`lock_database`): each publishes its whole database,
so two at once would drop each other's records. Readers (``compile``) need no lock.

Records travel between CPUs of one ISA.

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

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from adntn_deploy.compiler.errors import TuningError
from adntn_deploy.compiler.profiles import DeviceProfile, host_arch, list_profiles, triple_arch

SCHEDULES_ENV = "ADNTN_SCHEDULES_DIR"

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


def schedules_dir() -> Path:
    """The shipped tuning databases: $ADNTN_SCHEDULES_DIR or the repository's schedules/ folder."""
    env = os.environ.get(SCHEDULES_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "schedules"


def clean_database(folder: Path) -> None:
    """Drop incomplete trailing lines from a JSON database (what an interrupted writer leaves).

    A file that changes is rewritten through a temporary file and a rename, never in place: a reader (or
    a crash) sees the old file or the new one.
    """
    # records are appended one line at a time, so only the tail can be incomplete: check the last line
    # instead of parsing the whole (multi-MB) database
    for name in DB_FILES:
        path = folder / name
        if not path.exists():
            continue
        data = path.read_bytes()
        body = data.rstrip(b"\n")
        cut = body.rfind(b"\n") + 1
        try:
            json.loads(body[cut:]) if body[cut:].strip() else None
            fixed = body + b"\n" if body else b""
        except (json.JSONDecodeError, RecursionError):
            fixed = body[:cut]
        if fixed != data:
            write_atomically(path, fixed)


@contextlib.contextmanager
def lock_database(folder: Path, instead: str) -> Iterator[None]:
    """Hold ``folder``'s writer lock while the block runs (``instead``: what else the user can do, for the
    message, e.g. "tune into another folder").

    The lock is an advisory ``flock`` on the folder itself (no lock file is left in it), released when the
    block ends or the process dies. A folder that does not exist yet is created (with its parents), and
    removed again if the block leaves it empty. Where ``fcntl`` is missing (not POSIX), or the file system
    cannot lock a folder (some network mounts), nothing is locked.

    Raises:
        TuningError: another process holds the lock (one line naming the folder and what to do), or
            ``folder`` cannot be created or opened (it is a file, or not writable).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # the folder, then its new parents
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise TuningError(f"cannot use {folder} as a tuning database folder: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TuningError(f"{folder} is being written by another adntn-deploy process (tune or refresh-records); "
                              f"wait for it to finish, or {instead}") from None
        except OSError:  # a file system without flock on folders (some network mounts): unlocked, as before
            pass
        yield
    finally:
        os.close(handle)  # releases the lock
        with contextlib.suppress(OSError):  # rmdir only succeeds on a folder the block left empty
            for new in created:
                new.rmdir()


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` through a temporary file beside it and a rename (mode 0644)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a database is meant to be shared and shipped
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_WORKLOAD_HASH = re.compile(rb'^\["(\d+)",')
_RECORD_INDEX = re.compile(rb"^\[(\d+),")


def checked_lines(path: Path, workloads: int | None, keep: Callable[[bytes], bool] | None = None) -> list[bytes]:
    """The lines of one database file, each checked before TVM's JSON reader may see it.

    TVM parses records (and the IR inside each workload, base64 after an 8-byte length) with a recursive
    reader that a deeply nested line crashes: every line and every embedded IR must nest at most
    DEFAULT_MAX_DEPTH levels, strings included (trace strings hold JSON too). A workload line is
    ``[hash, base64]``; a record line is ``[workload index, [trace, ...]]`` with an index into the
    ``workloads`` lines read before. A last line without its newline that does not parse is dropped
    (an interrupted writer left it); any other bad line is an error. With ``keep``, lines it refuses are
    skipped without being checked or returned (a compile reads only the workloads of its own kernels).

    Raises:
        TuningError: the file and line number, and what is wrong there.
    """
    import base64
    import binascii

    from adntn_deploy.safejson import DEFAULT_MAX_DEPTH, JsonLimitError, check_depth

    data = path.read_bytes()
    lines = data.split(b"\n")
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or (keep is not None and not keep(line)):
            continue
        where = f"{path} line {number}"
        try:
            check_depth(line, what=where, strings=True)
            value = json.loads(line)
        except JsonLimitError as exc:
            raise TuningError(f"{exc}; it is not a tuning database this tool wrote (run adntn-deploy tune again)") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            if number == len(lines):  # no newline after it: an interrupted append
                break
            raise TuningError(f"{where} is not valid JSON; remove the line or tune again") from None
        if workloads is None:
            ok = (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value))
            if ok:
                try:
                    ir = base64.b64decode(value[1], validate=True)
                except (binascii.Error, ValueError):
                    ok = False
                else:
                    ok = len(ir) >= 8 and int.from_bytes(ir[:8], "little") == len(ir) - 8
                    if ok:
                        try:
                            check_depth(ir[8:], DEFAULT_MAX_DEPTH, f"the IR in {where}", strings=True)
                        except JsonLimitError as exc:
                            raise TuningError(f"{exc}; it is not a tuning database this tool wrote") from None
            what = "a workload [hash, base64 IR]"
        else:
            ok = (isinstance(value, list) and len(value) == 2 and type(value[0]) is int
                  and 0 <= value[0] < workloads and isinstance(value[1], list))
            what = f"a record [workload index below {workloads}, [trace, ...]]"
        if not ok:
            raise TuningError(f"{where} is not {what}; it is not a tuning database this tool wrote (tune again)")
        kept.append(line)
    return kept


def _renumbered(records: list[bytes], renumber) -> list[bytes]:
    """Checked record lines with each workload index ``i`` replaced by ``renumber[i]`` (the rest kept byte
    for byte)."""
    out = []
    for line in records:
        match = _RECORD_INDEX.match(line)
        out.append(b"[%d," % renumber[int(match.group(1))] + line[match.end():])
    return out


def copy_database(source: Path, destination: Path, workloads_of: set[str] | None = None) -> int:
    """Copy the database in ``source`` into the folder ``destination``, checked line by line; returns the
    number of workloads copied.

    ``source`` is only read. Incomplete trailing lines are left out of the copy (see :func:`checked_lines`).
    ``workloads_of``: copy only the workloads with these structural hashes (:func:`workload_hashes`) and
    their records, renumbered; the other lines are neither parsed nor checked. The shipped AVX-512
    database holds a hundred workloads, and a compile needs a handful.

    Raises:
        TuningError: a file is missing or a line is malformed or too deeply nested.
    """
    source, destination = Path(source), Path(destination)
    if not has_database(source):
        raise TuningError(f"{source} is not a tuning database (needs {' and '.join(DB_FILES)}); run adntn-deploy tune")
    if workloads_of is None:
        workloads = checked_lines(source / DB_FILES[0], None)
        records = checked_lines(source / DB_FILES[1], len(workloads))
    else:
        # records name workloads by their index among the non-empty workload lines
        all_workloads = [line for line in (source / DB_FILES[0]).read_bytes().split(b"\n") if line.strip()]
        renumber: dict[int, int] = {}
        for index, line in enumerate(all_workloads):
            match = _WORKLOAD_HASH.match(line)
            if match is None or match.group(1).decode() in workloads_of:  # unreadable lines get checked (and refused)
                renumber[index] = len(renumber)
        wanted = {all_workloads[i] for i in renumber}
        workloads = checked_lines(source / DB_FILES[0], None, keep=lambda line: line in wanted)

        def record_wanted(line: bytes) -> bool:
            match = _RECORD_INDEX.match(line)
            return match is None or int(match.group(1)) in renumber

        records = _renumbered(checked_lines(source / DB_FILES[1], len(all_workloads), keep=record_wanted), renumber)
    destination.mkdir(parents=True, exist_ok=True)
    for name, lines in zip(DB_FILES, (workloads, records)):
        (destination / name).write_bytes(b"".join(line + b"\n" for line in lines))
    return len(workloads)


def merge_equal_workloads(folder: Path, equal: Callable[[bytes, bytes], bool]) -> int:
    """Merge the workload lines of the database in ``folder`` that MetaSchedule holds as one workload;
    returns the number of lines merged away (0 leaves both files untouched).

    MetaSchedule's JSON database keeps one workload per structurally equal kernel in memory but numbers
    a workload it adds by that in-memory count, while appending it as the next line of the file. A file
    with two lines of one kernel (the same TIR with other buffer names: one structural hash, two
    serialisations) thus gets every later workload's records filed under the index of an earlier line:
    tuning into the shipped AVX-512 database (12 such pairs) wrote 40 records that named a dense kernel's
    workload for conv traces, and TVM then refused to read the whole database. Lines of one structural
    hash that ``equal(line, other)`` says are the same kernel become the first of them; their records
    are renumbered to it. Both files are rewritten atomically.

    Raises:
        TuningError: a file is missing or a line is malformed (:func:`checked_lines`).
    """
    folder = Path(folder)
    workloads = checked_lines(folder / DB_FILES[0], None)
    first_of: dict[bytes, list[int]] = {}
    renumber: list[int] = []
    kept: list[bytes] = []
    for line in workloads:
        match = _WORKLOAD_HASH.match(line)
        key = match.group(1) if match else line
        same = next((kept_index for kept_index in first_of.get(key, []) if equal(kept[kept_index], line)), None)
        if same is None:
            first_of.setdefault(key, []).append(len(kept))
            same = len(kept)
            kept.append(line)
        renumber.append(same)
    merged = len(workloads) - len(kept)
    if merged:
        records = _renumbered(checked_lines(folder / DB_FILES[1], len(workloads)), renumber)
        write_atomically(folder / DB_FILES[1], b"".join(line + b"\n" for line in records))
        write_atomically(folder / DB_FILES[0], b"".join(line + b"\n" for line in kept))
    return merged


def workload_hashes(mod) -> set[str]:
    """The structural hashes under which MetaSchedule files the kernels (PrimFuncs) of ``mod``."""
    import tvm
    import tvm_ffi

    hashes = set()
    for _, func in mod.functions_items():
        if type(func).__name__ == "PrimFunc":
            workload = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            hashes.add(str(tvm_ffi.structural_hash(workload) & 0xFFFFFFFFFFFFFFFF))
    return hashes


def apply_records(fused, target, records: Path, prepare: Callable[[Path], None] | None = None) -> tuple[Any, int, int]:
    """Apply the database in ``records`` to ``fused`` (from :func:`~adntn_deploy.compiler.schedules.fuse_kernels`).

    ``records`` is only read: TVM gets a checked private copy (:func:`copy_database`), which ``prepare``
    (when given) may rewrite first (the compile refreshes old records there: :mod:`~adntn_deploy.compiler.refresh`).
    Returns (module, kernels scheduled, kernels in all).

    Raises:
        TuningError: the folder is not a tuning database, a line is malformed, or TVM refused it.
    """
    from tvm import relax

    from adntn_deploy.compiler.schedules import count_scheduled

    records = Path(records)
    private = Path(tempfile.mkdtemp(prefix="adntn-records-"))
    try:
        copy_database(records, private, workloads_of=workload_hashes(fused))
        if prepare is not None:
            prepare(private)
        with target:
            try:
                applied = relax.transform.MetaScheduleApplyDatabase(str(private))(fused)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise TuningError(f"the tuning records in {records} could not be applied ({first}); tune again") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)
    scheduled, total = count_scheduled(applied)
    return applied, scheduled, total


def default_records(profile: DeviceProfile, target) -> RecordsChoice:
    """The shipped database to apply when compiling ``profile`` as ``target``, and a note saying why.

    See :mod:`adntn_deploy.compiler.database`: the profile's own records, else those of the best
    instruction-set profile the target's CPU supports (records travel between CPUs of one ISA), else none.
    """
    return choose_records(profile, target, schedules_dir())


def _read_meta(path: Path) -> dict:
    """A schedules folder's adntn_schedule.json (depth-bounded), as a dict.

    Raises:
        TuningError: the file is not a JSON object.
    """
    from adntn_deploy.safejson import JsonLimitError, loads_object

    try:
        return loads_object(path.read_bytes(), what=str(path))
    except JsonLimitError as exc:
        raise TuningError(f"{exc}; delete it or tune again") from None


def list_schedules() -> list[dict[str, Any]]:
    """What schedules/ ships: per profile folder, the target, models, workloads and records."""
    rows = []
    root = schedules_dir()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        meta_path = folder / "adntn_schedule.json"
        meta = _read_meta(meta_path) if meta_path.exists() else {}
        counts = {f: sum(1 for line in (folder / f).read_text().splitlines() if line.strip()) if (folder / f).exists() else 0
                  for f in DB_FILES}
        rows.append({"profile": folder.name, "target": meta.get("target") or (meta.get("tuned_on") or {}).get("target"), "models": meta.get("models", []),
                     "trials": meta.get("trials"), "workloads": counts[DB_FILES[0]], "records": counts[DB_FILES[1]]})
    return rows


def publish(staging: Path, records: Path) -> None:
    """Copy the staging database to ``records`` atomically (temp file + rename per file)."""
    records.mkdir(parents=True, exist_ok=True)
    for name in DB_FILES:
        source = staging / name
        if not source.exists():
            continue
        data = source.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
        write_atomically(records / name, data)
