"""docs/guide.md: every ```bash block runs as written, in order, in a scratch folder (blocks marked sh need a board)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def test_the_guide_has_runnable_examples_for_each_workflow():
    script = "\n".join(bash_blocks(GUIDE.read_text()))
    for command in ("demo", "train", "compress", "export", "compile", "bundle", "tune", "serve", "package", "qemu-aarch64"):
        assert command in script, command


@pytest.mark.slow  # minutes: trains, compresses, compiles, tunes, serves (the README's test command runs it)
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None or shutil.which("curl") is None,
                    reason="needs the aarch64 cross compiler, qemu-user and curl: bash scripts/bootstrap.sh install")
def test_every_bash_example_in_the_guide_runs(tmp_path):
    script = "set -euo pipefail\n" + "\n".join(f"echo '+ block {i + 1}' >&2\n{block}" for i, block in enumerate(bash_blocks(GUIDE.read_text())))
    (tmp_path / "guide.sh").write_text(script)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "guide.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}"
    assert (tmp_path / "bundle-rpi4" / "run.sh").exists() and (tmp_path / "reply.json").stat().st_size > 0
    assert "outputs" in (tmp_path / "reply.json").read_text()
