"""Find the models to serve: one .onnx file, one compiled artifact, or a model repository folder.

Repository layout (Triton's, which ``adntn-deploy package --format triton`` writes):
    REPO/<model name>/config.pbtxt            optional here
    REPO/<model name>/<version>/model.onnx    or an artifact folder (manifest.json) as <version>/
Versions are positive integers; the highest is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adntn_deploy.errors import ServingError


@dataclass(frozen=True)
class ModelEntry:
    """One servable model version: its name, version, file or folder, and backend (ort or tvm)."""

    name: str
    version: str
    path: Path
    backend: str


def _entry_for(path: Path, name: str, version: str, backend: str | None) -> ModelEntry | None:
    if path.is_file() and path.suffix == ".onnx":
        return ModelEntry(name, version, path, backend or "ort")
    if path.is_dir() and (path / "manifest.json").exists():
        return ModelEntry(name, version, path, backend or "tvm")
    if path.is_dir() and (path / "model.onnx").exists():
        return ModelEntry(name, version, path / "model.onnx", backend or "ort")
    return None


def discover(path: str | Path, backend: str | None = None) -> list[ModelEntry]:
    """Every model version under ``path`` (a file, an artifact folder or a model repository).

    Raises:
        ServingError: ``path`` does not exist, or holds nothing servable.
    """
    root = Path(path)
    if not root.exists():
        raise ServingError(f"{root} does not exist: give an .onnx file, a compiled artifact or a model repository")
    single = _entry_for(root, root.stem if root.is_file() else root.name, "1", backend)
    if single is not None:
        return [single]
    entries = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version_dir in sorted(model_dir.iterdir(), key=lambda p: p.name):
            if version_dir.is_dir() and version_dir.name.isdigit() and int(version_dir.name) > 0:
                entry = _entry_for(version_dir, model_dir.name, version_dir.name, backend)
                if entry is not None:
                    entries.append(entry)
    if not entries:
        raise ServingError(
            f"no servable model in {root}: expected model.onnx, an artifact, or REPO/<name>/<version>/model.onnx"
        )
    return entries
