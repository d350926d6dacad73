"""The numeric tests pass on AVX2 code paths too: scripts/test-avx2.sh runs them under qemu-x86_64 -cpu Haswell."""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "test-avx2.sh"


@pytest.mark.slow  # about 5 minutes of TCG emulation (the README's test command runs it)
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None,
                    reason="needs an x86-64 machine and qemu-user: apt-get install qemu-user (scripts/bootstrap.sh does)")
def test_numeric_tests_pass_on_an_emulated_avx2_cpu():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3600)
    assert "emulated CPU has AVX2 + FMA3, no AVX-512" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
