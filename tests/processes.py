"""Stopping servers the tests start in their own session (process group), children included."""

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it if it has not exited within ``timeout`` s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
