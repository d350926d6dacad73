"""Errors of the TVM stage, one per concern; each message says what is wrong and what to do instead.

``CompileError`` and ``TuningError`` are the stage classes of :mod:`adntn_deploy.errors` (re-exported here);
the others refine ``CompileError``. All derive from :class:`~adntn_deploy.errors.AdntnError`, so the CLI
reports them as one line with exit code 1, like every other error.
"""

from __future__ import annotations

from adntn_deploy.errors import CompileError, TuningError

__all__ = ["ArtifactError", "CompileError", "StreamCompileError", "TuningError"]


class StreamCompileError(CompileError):
    """A streamed kernel cannot be built for this target; the message says what to do instead."""


class ArtifactError(CompileError):
    """An artifact is missing, tampered with, or built for another machine."""
