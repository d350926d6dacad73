"""Artifact folders on disk: the manifest format, writing one, and reading one back with every check.

An artifact folder (``manifest.json`` describes it; the sha256 of every file is recorded):
    model.so | model.tar     the compiled Relax VM executable
    params.safetensors       parameters in the order main_transform_params takes them (keys p0000, ...):
                             the cores and the model's other (dense) tensors, never a generated weight
    build.log                what TVM printed while building (warnings), when it printed anything
    manifest.json

No tvm import: the server, the bundler and the C++ runner's tests read manifests without TVM.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adntn_deploy.compiler.errors import ArtifactError

ARTIFACT_FORMAT = "adntn-artifact"
ARTIFACT_VERSION = 1
WEIGHT_MODES = ("load", "fold", "stream", "auto")
#: modes whose parameters stay inputs and whose weight-only work runs once at load (main_transform_params)
LIFTED_MODES = ("load", "stream", "auto")


@dataclass
class Artifact:
    """A compiled artifact on disk and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def bytes(self) -> int:
        """Total size of the artifact's files."""
        return sum(f["bytes"] for f in self.manifest["files"].values())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: a manifest is a few KB; anything far larger is not one of ours and is not read into memory
MANIFEST_MAX_BYTES = 16 << 20
_DEVICES = ("cpu", "cuda", "opencl")
_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool")
_HEX = frozenset("0123456789abcdef")


def _load_manifest_json(folder: Path) -> dict:
    """The parsed ``folder/manifest.json`` (size- and depth-bounded), without any check of its fields."""
    from adntn_deploy.safejson import JsonLimitError, loads_object

    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} is not a compiled artifact (no manifest.json); build one with adntn-deploy compile")
    if manifest_path.stat().st_size > MANIFEST_MAX_BYTES:
        raise ArtifactError(f"{manifest_path} is larger than {MANIFEST_MAX_BYTES >> 20} MiB, so not a manifest this tool wrote; rebuild the artifact")
    try:
        return loads_object(manifest_path.read_bytes(), what=str(manifest_path))
    except JsonLimitError as exc:
        raise ArtifactError(f"{exc}; rebuild the artifact") from None


def contained_file(folder: Path, name: object, field: str) -> Path:
    """``folder / name`` for a manifest's file name that stays inside the artifact folder.

    A name must be a plain file name (no folder separators, not ``.`` or ``..``, not absolute); a
    symlink may not lead out of the folder. The file itself need not exist.

    Raises:
        ArtifactError: the name (quoted) and the manifest ``field`` it came from.
    """
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise ArtifactError(f"{folder}/manifest.json: {field} {name!r} is not a plain file name inside the artifact; "
                            "rebuild the artifact")
    path = folder / name
    if path.resolve().parent != folder.resolve():
        raise ArtifactError(f"{folder}/manifest.json: {field} {name!r} leads outside the artifact folder (a symlink); "
                            "rebuild the artifact")
    return path


def _check_tensors(folder: Path, manifest: dict, key: str) -> None:
    entries = manifest.get(key)
    bad = not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) and e.get("dtype") in _DTYPES
        and isinstance(e.get("shape"), list)
        and all(d is None or (type(d) is int and d >= 0) for d in e["shape"]) for e in entries)
    if bad:
        raise ArtifactError(f"{folder}/manifest.json: {key!r} must list {{name, shape, dtype}} entries; rebuild the artifact")


def check_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    """Check the fields of an artifact's manifest that loaders use, and that every name stays inside ``folder``.

    Format marker and version; ``files`` maps plain file names to {sha256, bytes}; ``library`` and (for
    lifted weights) ``params_file`` are listed there, so that every file the runtime loads is hashed;
    ``weights``, ``device``, ``arch``, ``params``, ``inputs`` and ``outputs`` have the types loaders expect.

    Raises:
        ArtifactError: the first problem, in one line.
    """
    folder = Path(folder)
    where = f"{folder}/manifest.json"
    version = manifest.get("version")
    if manifest.get("format") != ARTIFACT_FORMAT or type(version) is not int or not 1 <= version <= ARTIFACT_VERSION:
        raise ArtifactError(f"{folder} has an unknown artifact format/version; rebuild it with this adntn-deploy")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{where}: 'files' must map the artifact's file names to their sha256; rebuild the artifact")
    for name, info in files.items():
        contained_file(folder, name, "files entry")
        if (not isinstance(info, dict) or not isinstance(info.get("sha256"), str) or len(info["sha256"]) != 64
                or not set(info["sha256"]) <= _HEX or type(info.get("bytes")) is not int or info["bytes"] < 0):
            raise ArtifactError(f"{where}: files entry {name!r} needs a sha256 (64 hex digits) and bytes; rebuild the artifact")
    weights = manifest.get("weights")
    if weights not in WEIGHT_MODES:
        raise ArtifactError(f"{where}: 'weights' must be one of {', '.join(WEIGHT_MODES)}; rebuild the artifact")
    loaded = [("library", manifest.get("library"))]
    if weights in LIFTED_MODES:
        loaded.append(("params_file", manifest.get("params_file")))
        params = manifest.get("params")
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise ArtifactError(f"{where}: 'params' must list the parameter names; rebuild the artifact")
    for field, name in loaded:
        contained_file(folder, name, field)
        if name not in files:
            raise ArtifactError(f"{where}: {field} {name!r} is not listed (with its sha256) in 'files'; rebuild the artifact")
    if manifest.get("device", "cpu") not in _DEVICES or not isinstance(manifest.get("arch"), str):
        raise ArtifactError(f"{where}: 'device' must be one of {', '.join(_DEVICES)} and 'arch' a name; rebuild the artifact")
    for key in ("inputs", "outputs"):
        _check_tensors(folder, manifest, key)


def read_manifest(path: str | os.PathLike, verify: bool = True) -> dict:
    """Read and check ``ARTIFACT/manifest.json`` (:func:`check_manifest`) and (by default) every file's sha256.

    The hashes detect accidents (a truncated copy, a file replaced by mistake), not a hostile publisher:
    whoever can write the files can write matching hashes (SECURITY.md).

    Raises:
        ArtifactError: no manifest, a malformed, oversized, too deeply nested or newer manifest, a name
            leading outside the folder, a loaded file not listed, a missing file, or a hash mismatch.
    """
    folder = Path(path)
    manifest = _load_manifest_json(folder)
    check_manifest(folder, manifest)
    if verify:
        for name, info in manifest["files"].items():
            file = folder / name
            if not file.is_file():
                raise ArtifactError(f"artifact file {file} is missing; rebuild the artifact")
            if sha256_file(file) != info["sha256"]:
                raise ArtifactError(f"artifact file {file} was modified (sha256 mismatch); rebuild it with adntn-deploy compile")
    return manifest


def is_artifact_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is an artifact this tool wrote, safe to replace: a manifest that passes
    :func:`check_manifest`, and nothing in the folder but that manifest and the files it lists (hashes are
    not checked: an artifact with a damaged file is still ours to replace)."""
    from adntn_deploy.outputs import only_listed

    folder = Path(folder)
    try:
        manifest = _load_manifest_json(folder)
        check_manifest(folder, manifest)
    except ArtifactError:
        return False
    return only_listed(folder, {"manifest.json", *manifest["files"]})


def write_manifest(folder: Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Record ``files`` (names inside ``folder``) with their sha256 and size in ``manifest``, write
    ``folder/manifest.json`` and make the folder shareable (0755, files 0644, libraries 0755).

    Returns the manifest as written.
    """
    manifest = dict(manifest)
    manifest["files"] = {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in files}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    folder.chmod(0o755)  # mkdtemp makes 0700 folders and files; an artifact is meant to be shared
    for f in folder.iterdir():
        f.chmod(0o644 if f.suffix != ".so" else 0o755)
    return manifest
