"""Write command outputs without losing anything: never over an input, and replace only what we wrote.

Folder outputs (compile's artifact, bundle, a Triton model version) are written into a staging folder
beside the destination and renamed into place. An existing destination is replaced only when it is
verifiably one of ours (the caller's ``is_ours`` test: our format marker, and nothing in it that our
layout does not list); the old folder is first renamed aside, so that an interruption at any point
leaves either the old or the new output, never a mix and never neither.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from adntn_deploy.errors import AdntnError


class OutputError(AdntnError):
    """An output would overwrite one of the command's inputs, or something this tool did not write."""


def _resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute with symlinks followed (also for paths that do not exist yet)."""
    return Path(os.path.abspath(path)).resolve()


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two existing paths are one file (hard links included); False if either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_inputs(output: str | os.PathLike, *inputs: str | os.PathLike | None, option: str = "output=") -> None:
    """Refuse an ``output`` path that would overwrite or remove an input or the current directory.

    Refused: ``output`` is one of ``inputs`` (same resolved path, or the same file through a hard link),
    holds one of them (a folder output replaced as a whole would delete it), lies inside an input folder,
    or is the current directory or one of its parents. ``None`` inputs and inputs that do not exist are
    skipped. ``option`` names the output in the message: the library parameter (``output=``, the default;
    the CLI turns it into ``-o``), or a flag ("--outputs").

    Raises:
        OutputError: one line naming the path and asking for another one.
    """
    target = _resolved(output)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputError(f"{option} {output} is the current folder or holds it, which the output would replace; "
                          f"give a new folder, e.g. {option} {Path(target.name or 'out')}-out")
    for given in inputs:
        if given is None or not os.path.lexists(given):
            continue
        source = _resolved(given)
        if source == target or _same_file(output, given):
            raise OutputError(f"{option} {output} is the input {given}; writing there would destroy it: choose another {option}")
        if target in source.parents:
            raise OutputError(f"{option} {output} holds the input {given}, which replacing it would delete; choose another {option}")
        if source in target.parents:
            raise OutputError(f"{option} {output} lies inside the input {given}, which writing there would change; "
                              f"choose another {option}")


def staging_dir(out: str | os.PathLike) -> Path:
    """A new hidden folder beside ``out`` (same file system, so the final rename is atomic).

    ``out``'s parent folders are created when missing.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))


def check_replaceable(out: str | os.PathLike, is_ours: Callable[[Path], bool], option: str = "output=",
                      what: str = "an output") -> None:
    """Refuse now an existing ``out`` that :func:`replace_output_dir` would refuse (call it before long work).

    Missing paths and empty folders are replaceable; any other existing path only when it is a real
    folder (not a symlink) for which ``is_ours(out)`` is true.

    Raises:
        OutputError: ``out`` is a file, a symlink or a folder that is not ``what`` this tool wrote.
    """
    out = Path(out)
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{option} {out} exists and is not a folder this tool wrote; choose another {option}")
    if next(out.iterdir(), None) is None:
        return
    if not is_ours(out):
        raise OutputError(f"{option} {out} exists and is not {what} this tool wrote (replacing it would lose its files); "
                          f"choose another {option}")


def replace_output_dir(staging: str | os.PathLike, out: str | os.PathLike, is_ours: Callable[[Path], bool],
                       option: str = "output=", what: str = "an output") -> Path:
    """Move the finished folder ``staging`` to ``out``, replacing an existing ``out`` only if it is ours.

    ``staging`` must lie beside ``out`` (:func:`staging_dir`). An existing ``out`` is renamed aside,
    checked again there (nothing can change it under that hidden name), replaced by ``staging`` and then
    deleted; on any failure the old folder is put back. ``staging`` is left in place when refused (the
    caller removes it). Returns ``out``.

    Raises:
        OutputError: see :func:`check_replaceable`, or a rename failed (another process, a mount point).
    """
    staging, out = Path(staging), Path(out)
    check_replaceable(out, is_ours, option, what)
    if not os.path.lexists(out):
        try:
            os.rename(staging, out)  # replaces at most an empty folder made meanwhile: nothing is lost
        except OSError as exc:
            raise OutputError(f"cannot create {option} {out}: {exc.strerror}; choose another {option}") from None
        return out
    aside = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    try:
        os.rename(out, aside)
    except OSError as exc:
        raise OutputError(f"cannot replace {option} {out}: {exc.strerror}; choose another {option}") from None
    try:
        if next(aside.iterdir(), None) is not None and not is_ours(aside):  # changed since the first check
            raise OutputError(f"{option} {out} changed while this command ran and is no longer {what} this tool wrote; "
                              f"choose another {option}")
        os.rename(staging, out)
    except BaseException as exc:
        os.rename(aside, out)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot replace {option} {out}: {exc.strerror}; choose another {option}") from None
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return out


def only_listed(folder: Path, files: set[str], folders: dict[str, Callable[[Path], bool]] | None = None) -> bool:
    """Whether ``folder`` holds nothing but regular files named in ``files`` and sub-folders named in
    ``folders`` (each passing its own test); symlinks and anything else make it False."""
    folders = folders or {}
    try:
        for entry in os.scandir(folder):
            if entry.is_symlink():
                return False
            if entry.is_file(follow_symlinks=False) and entry.name in files:
                continue
            if entry.is_dir(follow_symlinks=False) and entry.name in folders and folders[entry.name](Path(entry.path)):
                continue
            return False
    except OSError:
        return False
    return True
