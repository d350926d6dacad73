"""The error hierarchy (one root, one class per stage), and how the CLI shows library errors: one line, exit 1,
the parameters they name as flags."""

import json
import subprocess
import sys

import click
import numpy as np
import pytest
from torch import nn

from adntn_deploy.errors import (
    STAGE_ERRORS, AdntnError, CheckpointError, CompileError, ExportError, GeneratorError, InferenceError, ServingError,
    TuningError,
)


# ---- the hierarchy ---------------------------------------------------------------------------------------------------

def test_every_stage_class_derives_from_the_root_and_the_root_from_value_error():
    assert issubclass(AdntnError, ValueError)  # callers written against ValueError keep working
    assert len(STAGE_ERRORS) == 7
    for cls in STAGE_ERRORS:
        assert issubclass(cls, AdntnError) and cls is not AdntnError
    # stages are siblings: a checkpoint or a serving failure is not a generator error
    for cls in STAGE_ERRORS:
        assert [other for other in STAGE_ERRORS if other is not cls and issubclass(cls, other)] == []


def test_each_module_error_belongs_to_its_stage():
    from adntn_deploy.checkpoint import CheckpointError as FromCheckpoint
    from adntn_deploy.compiler.errors import ArtifactError, StreamCompileError
    from adntn_deploy.compiler.errors import CompileError as FromCompiler
    from adntn_deploy.compiler.errors import TuningError as FromTuning
    from adntn_deploy.compiler.profiles import ProfileError
    from adntn_deploy.data import DataError
    from adntn_deploy.ir import GeneratorError as FromIr
    from adntn_deploy.limits import LimitError
    from adntn_deploy.onnx_export import ExportError as FromExport
    from adntn_deploy.onnx_export.reader import OnnxModelError
    from adntn_deploy.onnx_export.streaming import StreamError
    from adntn_deploy.outputs import OutputError
    from adntn_deploy.runtime import InputError
    from adntn_deploy.safejson import JsonLimitError
    from adntn_deploy.serving.app import BodyTimeoutError, BodyTooLargeError
    from adntn_deploy.serving.protocol import NonFiniteOutputError, ProtocolError

    assert (FromIr, FromCheckpoint, FromExport, FromCompiler, FromTuning) == (
        GeneratorError, CheckpointError, ExportError, CompileError, TuningError)
    stages = {
        ExportError: [OnnxModelError, StreamError],
        CompileError: [ArtifactError, StreamCompileError, ProfileError],
        InferenceError: [InputError],
        ServingError: [ProtocolError, NonFiniteOutputError, BodyTooLargeError, BodyTimeoutError],
    }
    for stage, classes in stages.items():
        for cls in classes:
            assert issubclass(cls, stage), cls
    for cls in (LimitError, OutputError, JsonLimitError, DataError):  # cross-cutting: the root directly
        assert issubclass(cls, AdntnError) and not any(issubclass(cls, stage) for stage in STAGE_ERRORS), cls
    import adntn_deploy

    assert adntn_deploy.AdntnError is AdntnError


def _generator():
    from adntn_deploy.compression import compress

    compress(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))  # neither bond_dim nor ratio


def _checkpoint(tmp_path):
    from adntn_deploy.checkpoint import read_checkpoint

    read_checkpoint(tmp_path / "missing.ckpt")


def _export(tmp_path):
    from adntn_deploy.onnx_export.reader import load_onnx

    (tmp_path / "garbage.onnx").write_bytes(b"not onnx")
    load_onnx(tmp_path / "garbage.onnx")


def _compile(tmp_path):
    from adntn_deploy.compiler.build import compile_model

    compile_model(tmp_path / "m.onnx", "host", tmp_path / "out", weights="dense")


def _tuning(tmp_path):
    from adntn_deploy.compiler.database import copy_database

    (tmp_path / "empty").mkdir()
    copy_database(tmp_path / "empty", tmp_path / "copy")


def _runtime(tmp_path):
    from adntn_deploy.runtime import load

    load(tmp_path / "model.bin")


def _serving(tmp_path):
    from adntn_deploy.serving.repository import discover

    discover(tmp_path / "nothing-here")


@pytest.mark.parametrize("raise_one, stage, message", [
    (lambda tmp: _generator(), GeneratorError, "exactly one of bond_dim= or ratio="),
    (_checkpoint, CheckpointError, "does not exist"),
    (_export, ExportError, "not a valid ONNX file"),
    (_compile, CompileError, "weights= must be one of"),
    (_tuning, TuningError, "is not a tuning database"),
    (_runtime, InferenceError, "pass backend= one of ort, tvm"),
    (_serving, ServingError, "does not exist"),
], ids=["generator", "checkpoint", "export", "compile", "tuning", "runtime", "serving"])
def test_a_representative_failure_of_each_stage_raises_its_class(tmp_path, raise_one, stage, message):
    with pytest.raises(stage, match=message) as info:
        raise_one(tmp_path)
    assert isinstance(info.value, AdntnError) and "\n" not in str(info.value)
    assert not any(isinstance(info.value, other) for other in STAGE_ERRORS if other is not stage)


# ---- parameters as flags -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("message, shown", [
    ("weights= must be one of load, fold, stream, auto, not 'dense'", "--weights must be one of load, fold, stream, auto, not 'dense'"),
    ("give exactly one of bond_dim= or ratio=", "give exactly one of --bond-dim or --ratio"),
    ("input_shapes= input:[1, 2] does not fit", "--input-shape input:[1, 2] does not fit"),
    ("output= out is the input out; choose another output=", "-o out is the input out; choose another -o"),
    ("x.ckpt records no input shape: pass input_shapes= NAME:D1,D2,... (e.g. input:1,1,28,28)",
     "x.ckpt records no input shape: pass --input-shape NAME:D1,D2,... (e.g. input:1,1,28,28)"),
    ("lower ratio= or pick another family", "lower --ratio or pick another family"),
    # values, unknown parameters and longer words stay as written
    ("stream='maybe' is not one of on, off, auto", "stream='maybe' is not one of on, off, auto"),
    ("providers= ['X'] are not in this onnxruntime", "providers= ['X'] are not in this onnxruntime"),
    ("a=b, rpc_tracker=host:1, --weights load", "a=b, rpc_tracker=host:1, --weights load"),
])
def test_parameters_become_flags(message, shown):
    from adntn_deploy.cli.errors import cli_message, to_flags

    assert to_flags(message) == shown
    assert cli_message(CompileError(message)) == shown


def _cli_flags() -> set[str]:
    from adntn_deploy.cli.main import cli

    flags, todo = set(), [cli]
    while todo:
        command = todo.pop()
        if isinstance(command, click.Group):
            todo.extend(command.commands.values())
        for param in command.params:
            if isinstance(param, click.Option):
                flags.update(param.opts)
    return flags


def test_every_mapped_flag_exists_on_some_command():
    from adntn_deploy.cli.errors import PARAMETER_FLAGS

    missing = {name: flag for name, flag in PARAMETER_FLAGS.items() if flag not in _cli_flags()}
    assert missing == {}


def _one_error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_cli_prints_a_library_error_once_with_its_flags(tmp_path, cli_runner):
    from adntn_deploy.checkpoint import save_checkpoint

    line = _one_error_line(cli_runner("run", tmp_path / "model.bin"))
    assert "cannot tell which runtime opens" in line and "pass --backend one of ort, tvm" in line
    line = _one_error_line(cli_runner("compile", tmp_path / "m.onnx", "--target", "{bad json", "-o", tmp_path / "art"))
    assert "--target JSON is invalid" in line
    bare = save_checkpoint(tmp_path / "bare.ckpt", nn.Linear(3, 2))  # records no input shape
    line = _one_error_line(cli_runner("export", bare, "-o", tmp_path / "b.onnx"))
    assert line.endswith("records no input shape: pass --input-shape NAME:D1,D2,... (e.g. input:1,1,28,28)")
    line = _one_error_line(cli_runner("export", bare, "-o", bare))
    assert f"-o {bare} is the input" in line and "choose another -o" in line
    line = _one_error_line(cli_runner("inspect", "no-such-preset-*"))
    assert "is neither a file nor a preset" in line


def test_cli_bad_input_is_one_line_and_exit_1_as_a_process(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    proc = subprocess.run([sys.executable, "-m", "adntn_deploy.cli.main", "run", str(tmp_path / "model.bin")],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("Error: cannot tell which runtime opens") and "--backend" in lines[0]


def test_debug_mode_is_untouched_for_library_errors(tmp_path, monkeypatch, cli_runner):
    """ADNTN_DEBUG shows tracebacks of unexpected errors only; the project's own stay one line."""
    monkeypatch.setenv("ADNTN_DEBUG", "1")
    assert "--backend" in _one_error_line(cli_runner("run", tmp_path / "model.bin"))


def test_json_output_is_unaffected_by_the_mapping(cli_runner):
    result = cli_runner("presets", "--json", "--model", "alexnet")
    assert result.exit_code == 0 and json.loads(result.stdout)
    assert np.all([row["ratio"] > 1 for row in json.loads(result.stdout)])
