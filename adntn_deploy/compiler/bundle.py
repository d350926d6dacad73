"""Edge bundles: an artifact plus the native runner and TVM runtime libraries, ready to copy to a board."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from adntn_deploy.compiler.tvm_runtime import read_manifest
from adntn_deploy.errors import GeneratorError

_RUN_SH = """#!/bin/sh
# Run the model on this board: ./run.sh INPUTS.safetensors OUTPUTS.safetensors [--repeat N]
# Inputs are a safetensors file with one tensor per model input name (see artifact/manifest.json).
here="$(cd "$(dirname "$0")" && pwd)"
LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/adntn-runner" "$here/artifact" "$@"
"""


def make_bundle(artifact: str | os.PathLike, output: str | os.PathLike, cross_compiler: str | None = None) -> Path:
    """Write ``output/`` = artifact/ + adntn-runner (built for the artifact's arch) + runtime libs + run.sh.

    Raises:
        ArtifactError: the artifact is invalid. GeneratorError: no runner can be built for its
            architecture here (missing cross compiler or runtime libraries; the message says how to get them).
    """
    from adntn_deploy.compiler.runner import build_runner

    manifest = read_manifest(artifact)
    if manifest.get("device", "cpu") != "cpu":
        raise GeneratorError(
            f"bundles hold the CPU runner; {manifest['profile']} runs on {manifest['device']}: "
            "use the TVM runtime with that device on the board (docs/tvm.md)"
        )
    out = Path(output)
    if out.exists():
        raise GeneratorError(f"{out} already exists; choose a new folder for the bundle")
    out.mkdir(parents=True)
    try:
        build_runner(manifest["arch"], out, cross_compiler=cross_compiler)
        shutil.copytree(artifact, out / "artifact")
        (out / "run.sh").write_text(_RUN_SH)
        (out / "run.sh").chmod(0o755)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
