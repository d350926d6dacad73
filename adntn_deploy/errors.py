"""The project's error types: one root, one class per pipeline stage; every message says what is wrong and how to fix it.

::

    AdntnError (ValueError)        anything this package refuses; the CLI prints it as one line, exit code 1
    ├── GeneratorError             a generator program, configuration or model description (ir/ ... compression)
    ├── CheckpointError            a checkpoint file: missing, corrupt, newer, or not matching the model
    ├── ExportError                ONNX export and ONNX files (onnx_export/: OnnxModelError, StreamError)
    ├── CompileError               TVM compile, target profiles, artifacts, edge runners (compiler/)
    ├── TuningError                MetaSchedule tuning and tuning databases (compiler/tuning.py, database.py)
    ├── InferenceError             the runtimes: opening a model, feeding it (runtime/: InputError)
    └── ServingError               the HTTP server and model repositories (serving/: ProtocolError)

Errors about a file belong to the stage that writes that file (a bad ``.onnx`` is an :class:`ExportError`
wherever it is read, a bad artifact a :class:`CompileError`). Concerns that cut across stages derive from
the root directly: ``limits.LimitError``, ``outputs.OutputError``, ``safejson.JsonLimitError`` and
``data.DataError``.

Messages name the offending *parameter* of the library call as ``name=`` (``"weights= must be one of load,
fold, stream, auto"``); the command line rewrites those to its flags (``--weights``) in one place,
``adntn_deploy/cli/errors.py``. Hints that name a command to run next ("compile it with --weights load")
stay as commands.

``AdntnError`` derives from ``ValueError`` so that code written against earlier versions, which caught
``ValueError``, keeps working.
"""


class AdntnError(ValueError):
    """Root of every error this package raises on purpose; the message says what is wrong and how to fix it."""


class GeneratorError(AdntnError):
    """A generator program, configuration or model description is invalid; the message says what and how to fix it."""


class CheckpointError(AdntnError):
    """A checkpoint file is missing, corrupt, from a newer version, or does not match the model."""


class ExportError(AdntnError):
    """A model could not be exported to ONNX, or an ONNX file cannot be used; the message says why."""


class CompileError(AdntnError):
    """The model could not be imported into TVM or built for the target; the message says why."""


class TuningError(AdntnError):
    """Tuning could not run (bad options, unreachable tracker, broken database)."""


class InferenceError(AdntnError):
    """A runtime cannot open a model or run it on the given inputs."""


class ServingError(AdntnError):
    """The server cannot serve a model (nothing servable, a model that fails to load or to run)."""


#: the stage classes, in pipeline order (tests check each derives from AdntnError)
STAGE_ERRORS = (GeneratorError, CheckpointError, ExportError, CompileError, TuningError, InferenceError, ServingError)

__all__ = ["AdntnError", "STAGE_ERRORS", *(cls.__name__ for cls in STAGE_ERRORS)]
