"""Run the CLI inside the test process (click's CliRunner): what most CLI tests need, without paying a fresh
interpreter's imports (torch, onnx, tvm: 3-5 s) per call."""

from __future__ import annotations

import os


class CliResult:
    """What an in-process CLI run gave: ``returncode`` (alias ``exit_code``), ``stdout``, ``stderr`` and
    ``output`` (both, interleaved) -- the attributes tests read from a ``subprocess.CompletedProcess``."""

    def __init__(self, result):
        self.returncode = self.exit_code = result.exit_code
        self.stdout, self.stderr, self.output = result.stdout, result.stderr, result.output

    def __repr__(self):
        return f"CliResult(returncode={self.returncode}, stderr={self.stderr[-500:]!r})"


def invoke_cli(*args, env=None, check=False) -> CliResult:
    """Run ``adntn-deploy ARGS...`` in this process; its exit code and captured output.

    For tests of messages, exit codes and output where a real process is not the point; tests of the real
    binary (signals, crashes, servers, memory, native stderr) keep a subprocess. Arguments are str()-ed;
    TQDM_DISABLE=1 is set; ``env`` adds variables (None removes one). The process environment is restored
    afterwards (--max-weight-bytes sets a variable). An exception the CLI does not turn into a one-line error
    propagates instead of passing as exit code 1. ``check``: assert the exit code is 0.
    """
    from click.testing import CliRunner

    from adntn_deploy.cli.main import cli

    saved = dict(os.environ)
    try:
        result = CliResult(CliRunner().invoke(cli, [str(a) for a in args], env={"TQDM_DISABLE": "1", **(env or {})},
                                              prog_name="adntn-deploy", catch_exceptions=False))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if check:
        assert result.returncode == 0, result.stderr
    return result
