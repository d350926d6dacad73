"""Library errors as the command line shows them: the parameters a message names become this CLI's flags.

Library messages name the offending parameter of the call as ``name=`` followed by a space, punctuation or
the end of the text (``"weights= must be one of load, fold, stream, auto"``; see :mod:`adntn_deploy.errors`).
The command line reports the same error in its own vocabulary (``"--weights must be one of ..."``): this
module is the one place that knows which flag stands for which parameter.
"""

from __future__ import annotations

import re

#: library parameter -> the flag that sets it (on every command that has one; the same name means the same thing)
PARAMETER_FLAGS: dict[str, str] = {
    "backend": "--backend",
    "bond_dim": "--bond-dim",
    "cpu": "--cpu",
    "cross_compiler": "--cross-compiler",
    "dynamic_batch": "--dynamic-batch",
    "family": "--family",
    "image": "--image",
    "input_shapes": "--input-shape",
    "inputs": "--inputs",
    "layers": "--layers",
    "memory_headroom": "--memory-headroom",
    "model": "--model",
    "name": "--name",
    "opt_level": "--opt-level",
    "output": "-o",
    "outputs": "--outputs",
    "ratio": "--ratio",
    "repeat": "--repeat",
    "repository": "-o",
    "rpc_key": "--rpc-key",
    "rpc_tracker": "--rpc-tracker",
    "runtime": "--runtime",
    "storage_uri": "--storage-uri",
    "target": "--target",
    "trials": "--trials",
    "tuning_records": "--tuning-records",
    "version": "--version",
    "warmup": "--warmup",
    "weights": "--weights",
}

#: ``name=`` as messages write a parameter: not part of a longer word or value, followed by a space,
#: punctuation or the end (``weights='load'``, a value, is left alone)
_PARAMETER = re.compile(r"(?<![\w.=\-])([a-z][a-z0-9_]*)=(?=[\s,;:.)\]]|$)")


def flag_for(parameter: str) -> str | None:
    """The flag that sets library parameter ``parameter`` (e.g. "input_shapes" -> "--input-shape"), or None."""
    return PARAMETER_FLAGS.get(parameter)


def to_flags(message: str) -> str:
    """``message`` with each ``parameter=`` that has a flag replaced by the flag ("weights= must" -> "--weights must").

    Parameters without a flag (Python-only ones) stay as written.
    """
    return _PARAMETER.sub(lambda m: flag_for(m.group(1)) or m.group(0), message)


def cli_message(exc: BaseException) -> str:
    """The line(s) the CLI prints for a library error: its message, in flags (:func:`to_flags`)."""
    text = str(exc)
    return to_flags(text) if text.strip() else type(exc).__name__
