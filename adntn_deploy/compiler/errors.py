"""Errors of the TVM stage, one per concern; each message says what is wrong and what to do instead.

They derive from the project's :class:`~adntn_deploy.errors.GeneratorError` so that the CLI reports them
as one line with exit code 1, like every other error.
"""

from __future__ import annotations

from adntn_deploy.errors import GeneratorError


class CompileError(GeneratorError):
    """The model could not be imported into TVM or built for the target; the message says why."""


class StreamCompileError(GeneratorError):
    """A streamed kernel cannot be built for this target; the message says what to do instead."""


class TuningError(GeneratorError):
    """Tuning could not run (bad options, unreachable tracker, broken database)."""


class ArtifactError(GeneratorError):
    """An artifact is missing, tampered with, or built for another machine."""
