"""Quiet compiles: TVM's native messages go to the artifact's build.log with one summary line, unless -v."""

import os
import subprocess
import sys

import pytest

from adntn_deploy.compiler.native_log import NativeLog

TVM_WARNING = b"[04:06:30] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults when there are out-of-bounds indices.\n"


def test_capture_takes_native_writes_and_summarises(tmp_path, capfd):
    log = NativeLog()
    with log.capture():
        for _ in range(3):
            os.write(2, TVM_WARNING)  # what C++ code does: straight to the file descriptor
        os.write(2, b"[04:06:31] /project/src/x.cc:9: Warning: something else\n")
    assert capfd.readouterr().err == ""
    assert log.count == 4
    summary = log.summary(tmp_path / "build.log")
    assert "\n" not in summary and summary.startswith("note: TVM printed 4 warnings (2 distinct; most often 3x")
    assert "Fast mode segfaults" in summary and str(tmp_path / "build.log") in summary


def test_routine_database_notice_is_not_counted(tmp_path, capfd):
    """TVM's "Creating JSONDatabase" line (printed as a warning whenever records are applied) is bookkeeping:
    alone it makes no summary; beside a real warning only the real one is counted."""
    routine = (b"[23:40:54] /project/src/relax/transform/meta_schedule.cc:95: Warning: Creating JSONDatabase. "
               b"Workload at: /tmp/adntn-records-x/database_workload.json\n")
    log = NativeLog()
    with log.capture():
        os.write(2, routine)
    assert capfd.readouterr().err == "" and log.count == 0
    with log.capture():
        os.write(2, TVM_WARNING)
    assert log.count == 1 and log.summary(None).startswith("note: TVM printed 1 warning (1 distinct")


def test_summary_without_a_log_file_says_how_to_see_them():
    log = NativeLog()
    with log.capture():
        os.write(2, TVM_WARNING)
    summary = log.summary(None, "ADNTN_TUNE_VERBOSE=1 shows them")
    assert "all in" not in summary and summary.endswith("(ADNTN_TUNE_VERBOSE=1 shows them)")


def test_verbose_lets_native_writes_through(capfd):
    log = NativeLog(verbose=True)
    with log.capture():
        os.write(2, TVM_WARNING)
    assert "Fast mode" in capfd.readouterr().err and log.count == 0


def test_capture_restores_stderr_after_an_error(capfd):
    log = NativeLog()
    with pytest.raises(RuntimeError):
        with log.capture():
            os.write(2, b"inside\n")
            raise RuntimeError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n" and log.text == "inside\n"


def _cli(*args):
    env = {**{k: v for k, v in os.environ.items() if k != "ADNTN_DEBUG"}, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "adntn_deploy.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env)


def _warning_model(folder):
    """A model whose import prints TVM warnings (Gathers of single rows: "Fast mode segfaults...") and has a
    depthwise conv."""
    pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")
    import torch
    from torch import nn

    from adntn_deploy.onnx_export import export_onnx

    class RowSum(nn.Module):
        def forward(self, x):
            return x[:, :, 1] + x[:, :, 3]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=8, padding=1), RowSum()).eval()
    path = folder / "m.onnx"
    export_onnx(model, [torch.randn(1, 3, 5, 5)], path, input_names=["input"])
    return path


def test_compile_is_quiet(tmp_path):
    path = _warning_model(tmp_path)
    quiet = _cli("compile", path, "--target", "host", "-o", tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: TVM printed") and "quiet/build.log" in lines[0], lines
    assert "Fast mode" in (tmp_path / "quiet" / "build.log").read_text()
    assert "1 convolutions on packed weights" in quiet.stdout


# -v passing native writes through is checked in process above; the generic-kernel note by tests/test_conv.py
@pytest.mark.slow
def test_verbose_compile_shows_tvm_warnings_and_names_generic_kernels(tmp_path):
    path = _warning_model(tmp_path)
    loud = _cli("compile", path, "--target", "host", "-o", tmp_path / "loud", "-v")
    assert loud.returncode == 0, loud.stderr
    assert "Fast mode" in loud.stderr and not (tmp_path / "loud" / "build.log").exists()
    assert any("relax.nn.conv2d" in line and "depthwise" in line for line in loud.stderr.splitlines())


def test_failed_import_is_one_line_and_leaves_stdout_clean(tmp_path):
    """TVM's importer prints "Error converting operator ..." to stdout (which would break --json) and its
    abandoned BlockBuilder warns on stderr when garbage-collected: the user sees our one error line only, and
    it names the operator."""
    pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Unsqueeze", ["s", "axes"], ["s3"]),  # repeated axes: TVM refuses them
             helper.make_node("Mul", ["c", "s3"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "s"),
             numpy_helper.from_array(np.array([1, 1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = _cli("compile", path, "--target", "host", "-o", tmp_path / "art", "--json")
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: TVM cannot import the model (converting Unsqueeze): ValueError")
    assert not (tmp_path / "art").exists()
