"""Refresh tuning records after one of our schedule rules changed: replay each record's decisions through
today's rule.

A MetaSchedule record stores its kernel's whole schedule as a trace of primitives, not only the choices
the search made. When a rule learns something that does not depend on those choices (the packed conv's
unrolled filter taps, :func:`~adntn_deploy.compiler.schedules.packed_conv2d.unrolled_taps`), every
record tuned before still replays the old schedule, and a kernel compiled with records can be slower than
the same kernel compiled without any. :func:`refresh_records` rewrites such records in place: today's rule
is run again on the record's workload with the record's own decisions (its register block), so the tuned
choice is kept and what the rule now derives from it is added. The measured run time is kept as it was
(measured with the old schedule); records of other rules, and lines that do not parse as ours, are left
byte for byte as they were.

Refreshable rules: ``adntn_packed_conv2d`` and ``adntn_packed_dense`` (its K-blocking, rule version 2).
Only this module and the rest of the compiler package import tvm (lazily).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from adntn_deploy.compiler.database import DB_FILES, checked_lines, has_database, lock_database, write_atomically
from adntn_deploy.compiler.errors import TuningError
from adntn_deploy.compiler.schedules import packed_conv2d, packed_dense


@dataclass(frozen=True)
class RefreshReport:
    """What :func:`refresh_records` did: records rewritten, already current, left alone (other rules),
    and left alone because a faster record of the same kernel exists (``best_only``)."""

    refreshed: int
    unchanged: int
    other: int
    not_best: int = 0


def _replay_register_block(rule, workload_mod, trace):
    """The schedule today's register-blocked ``rule`` module (packed conv2d or packed dense) gives
    ``workload_mod`` with the (row, panel) block ``trace`` sampled, or None when ``trace`` is not one of
    that rule's (it samples no row and panel block)."""
    from tvm import s_tir

    sampled = [trace.decisions[inst] for inst in trace.insts if inst.kind.name == "SamplePerfectTile"]
    if len(sampled) != 2:
        return None
    row_block, panel_block = (int(decision[-1]) for decision in sampled)
    sch = s_tir.Schedule(workload_mod, error_render_level="none")
    rule.schedule(sch, sch.get_sblock(rule.BLOCK_NAME), row_block, panel_block, decided=True)
    return sch


#: first SBlock a rule's trace gets -> (the function that re-derives that rule's schedule, the rule's version
#: stamp: an annotation every trace of today's rule carries)
_REFRESHERS = {
    rule.BLOCK_NAME: (partial(_replay_register_block, rule), (rule.RULE_VERSION_KEY, rule.RULE_VERSION))
    for rule in (packed_conv2d, packed_dense)
}


def _stamped(trace, version) -> bool:
    """Whether ``trace`` carries the rule-version annotation ``version`` ((key, value)): made by today's rule.

    Such a record is left as it is even where it differs from what a refresh would derive: MetaSchedule
    mutates a tuned trace's sampled decisions without re-running the rule, so quantities the rule derived
    from the first sample (a K-blocking chunk, the unrolled taps) stay as they were measured.
    """
    key, value = version
    for inst in trace.insts:
        if inst.kind.name == "Annotate" and str(inst.attrs[0]) == key:
            stamp = inst.inputs[1]
            return int(getattr(stamp, "value", stamp)) == value
    return False


def _plain_json(value):
    """A TVM container (Array, Map, IntImm, FloatImm, String) as plain Python JSON values."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "items"):
        return {str(key): _plain_json(item) for key, item in value.items()}
    if hasattr(value, "value"):  # IntImm / FloatImm
        return value.value
    return [_plain_json(item) for item in value]


def _first_block(trace) -> str | None:
    insts = list(trace.insts)
    if insts and insts[0].kind.name == "GetSBlock":
        return str(insts[0].attrs[0])
    return None


def _mean_seconds(record_json) -> float:
    try:
        times = [float(t) for t in record_json[1]]
        return sum(times) / len(times)
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return float("inf")


def _fastest_records(record_lines: list[bytes]) -> set[int]:
    """The line numbers (from 1) of each kernel's fastest record: the one a compile applies (lowest mean run
    time; the first of equals)."""
    fastest: dict[int, tuple[float, int]] = {}  # workload index -> (seconds, line number)
    for number, line in enumerate(record_lines, 1):
        index, record_json = json.loads(line)
        seconds = _mean_seconds(record_json)
        if index not in fastest or seconds < fastest[index][0]:
            fastest[index] = (seconds, number)
    return {number for _, number in fastest.values()}


def prune_records(folder: str | Path) -> int:
    """Keep only each kernel's fastest record in the database ``folder`` (what a compile applies; a tune
    keeps every measured candidate, dozens per kernel); the workloads stay as they are. The records file is
    replaced atomically. Returns the number of records removed.

    Raises:
        TuningError: ``folder`` is not a tuning database, a line is malformed, or a ``tune`` is writing to it.
    """
    folder = Path(folder)
    if not has_database(folder):
        raise TuningError(f"{folder} is not a tuning database (needs {' and '.join(DB_FILES)}); run adntn-deploy tune")
    with lock_database(folder, "prune a copy of the folder"):
        workloads = len(checked_lines(folder / DB_FILES[0], None))
        record_lines = checked_lines(folder / DB_FILES[1], workloads)
        kept = _fastest_records(record_lines)
        if len(kept) < len(record_lines):
            write_atomically(folder / DB_FILES[1],
                             b"".join(line + b"\n" for number, line in enumerate(record_lines, 1) if number in kept))
        return len(record_lines) - len(kept)


def refresh_records(folder: str | Path, best_only: bool = False) -> RefreshReport:
    """Rewrite the records in the database ``folder`` whose kernels today's rules schedule differently.

    Each record of a refreshable rule (see the module doc) gets the trace the rule gives its workload with
    the record's own decisions; the file is replaced atomically (temporary file and rename), and only the
    lines whose trace changed differ. Idempotent: a second run reports every record unchanged.
    ``best_only``: refresh only each kernel's fastest record, the one a compile applies (a compile's
    private copy: a database tuned with 64 trials per kernel holds 64 records of it).

    Raises:
        TuningError: ``folder`` is not a tuning database, a line is malformed, a record's decisions no
            longer schedule its workload (the rule changed what it can sample: tune that kernel again), or
            a ``tune`` is writing to ``folder`` (:func:`~adntn_deploy.compiler.database.lock_database`).
    """
    folder = Path(folder)
    if not has_database(folder):
        raise TuningError(f"{folder} is not a tuning database (needs {' and '.join(DB_FILES)}); run adntn-deploy tune")
    with lock_database(folder, "refresh a copy of the folder"):  # a tune publishing meanwhile would be overwritten
        return _refresh_locked(folder, best_only)


def _refresh_locked(folder: Path, best_only: bool) -> RefreshReport:
    import tvm.s_tir.meta_schedule as ms

    workload_lines = checked_lines(folder / DB_FILES[0], None)
    record_lines = checked_lines(folder / DB_FILES[1], len(workload_lines))
    workloads: dict[int, object] = {}
    refreshed = unchanged = other = not_best = 0
    out = []
    fastest = _fastest_records(record_lines) if best_only else set()
    for number, line in enumerate(record_lines, 1):
        index, record_json = json.loads(line)
        refresher = None
        if best_only and number not in fastest:
            not_best += 1
            out.append(line)
            continue
        # parse only the records whose trace starts at a refreshable rule's block: a database holds thousands
        if any(b'["GetSBlock",[],["%s",' % name.encode() in line[:200] for name in _REFRESHERS):
            if index not in workloads:
                workloads[index] = ms.database.Workload.from_json(json.loads(workload_lines[index]))
            record = ms.database.TuningRecord.from_json(record_json, workloads[index])
            refresher, version = _REFRESHERS.get(_first_block(record.trace) or "", (None, None))
        if refresher is None:
            other += 1
            out.append(line)
            continue
        if _stamped(record.trace, version):
            unchanged += 1  # made by today's rule: left exactly as tuned and measured
            out.append(line)
            continue
        try:
            today = refresher(workloads[index].mod, record.trace)
        except Exception as exc:  # noqa: BLE001 - TVM raises many types; the line number is what the user needs
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TuningError(f"{folder / DB_FILES[1]} record {number} no longer schedules its kernel ({first}); "
                              "tune that model again") from None
        if today is None:
            other += 1
            out.append(line)
            continue
        record_json[0] = _plain_json(today.trace.as_json())
        out.append(json.dumps([index, record_json], separators=(",", ":")).encode())
        refreshed += 1
    if refreshed:
        write_atomically(folder / DB_FILES[1], b"".join(line + b"\n" for line in out))
    return RefreshReport(refreshed, unchanged, other, not_best)
