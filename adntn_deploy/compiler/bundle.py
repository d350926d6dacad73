"""Edge bundles: an artifact plus the native runner and TVM runtime libraries, ready to copy to a board."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from adntn_deploy.compiler.artifact import is_artifact_dir, read_manifest
from adntn_deploy.errors import CompileError
from adntn_deploy.outputs import check_replaceable, only_listed, refuse_overwriting_inputs, replace_output_dir, staging_dir

_RUN_SH = """#!/bin/sh
# Run the model on this board: ./run.sh INPUTS.safetensors OUTPUTS.safetensors [--repeat N]
# Inputs are a safetensors file with one tensor per model input name (see artifact/manifest.json).
here="$(cd "$(dirname "$0")" && pwd)"
LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/adntn-runner" "$here/artifact" "$@"
"""


def is_bundle_dir(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a bundle this tool wrote, safe to replace: ``run.sh`` exactly as we write it,
    the runner and its two libraries, an ``artifact`` folder of ours (:func:`is_artifact_dir`), nothing else."""
    from adntn_deploy.compiler.runner import RUNTIME_LIBS

    folder = Path(folder)
    try:
        if (folder / "run.sh").is_symlink() or (folder / "run.sh").read_text() != _RUN_SH:
            return False
    except (OSError, UnicodeDecodeError):
        return False
    return only_listed(folder, {"run.sh", "adntn-runner", *RUNTIME_LIBS}, {"artifact": is_artifact_dir})


def make_bundle(artifact: str | os.PathLike, output: str | os.PathLike, cross_compiler: str | None = None) -> Path:
    """Write ``output/`` = artifact/ + adntn-runner (built for the artifact's arch) + runtime libs + run.sh.

    The bundle is built in a staging folder beside ``output`` and renamed into place; an existing
    ``output`` is replaced only when it is a bundle this tool wrote (:func:`is_bundle_dir`). Only the
    manifest and the files it lists are copied from the artifact.

    Raises:
        ArtifactError: the artifact is invalid. CompileError: no runner can be built for its
            architecture here (missing cross compiler or runtime libraries; the message says how to get them).
        OutputError: ``output`` is, holds or lies inside the artifact, or exists and is not a bundle.
    """
    from adntn_deploy.compiler.runner import build_runner

    manifest = read_manifest(artifact)
    if manifest.get("device", "cpu") != "cpu":
        raise CompileError(
            f"bundles hold the CPU runner; {manifest.get('profile', 'this artifact')} runs on {manifest['device']}: "
            "use the TVM runtime with that device on the board (docs/tvm.md)"
        )
    out = Path(output)
    refuse_overwriting_inputs(out, artifact)
    check_replaceable(out, is_bundle_dir, what="a bundle")
    staging = staging_dir(out)
    try:
        build_runner(manifest["arch"], staging, cross_compiler=cross_compiler)
        (staging / "artifact").mkdir()
        for name in ("manifest.json", *manifest["files"]):
            shutil.copy2(Path(artifact) / name, staging / "artifact" / name)
        (staging / "run.sh").write_text(_RUN_SH)
        (staging / "run.sh").chmod(0o755)
        staging.chmod(0o755)  # mkdtemp makes it 0700; a bundle is meant to be copied and shared
        replace_output_dir(staging, out, is_bundle_dir, what="a bundle")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out
