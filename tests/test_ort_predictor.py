"""runtime/ort.py: what the ONNX Runtime predictor holds after it loads a model with big stored weights."""

import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

#: a fresh process: its resident set grown by loading (MiB, Linux /proc), after the imports loading needs
_RESIDENT_AFTER_LOAD = """
import sys
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024
import numpy, onnx, onnxruntime
import adntn_deploy.limits, adntn_deploy.onnx_export.reader, adntn_deploy.onnx_export.streaming
from adntn_deploy.onnx_export.schema import register_schemas
from adntn_deploy.runtime.ort import OrtPredictor
register_schemas()
before = status("VmRSS")
predictor = OrtPredictor(sys.argv[1])
print(status("VmRSS") - before, predictor.resident_weight_bytes / 2**20)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set from Linux's /proc")
def test_a_stored_weight_is_held_once_after_load(tmp_path):
    """The session reads the file itself. Created from the serialized model, onnxruntime kept those bytes
    for its whole life: a 64 MiB dense layer held +138 MiB after load; the session alone holds +74."""
    size = 4096
    weight = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w"], ["output"], transB=1)], "dense",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, size])],
        [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "dense.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    done = subprocess.run([sys.executable, "-c", _RESIDENT_AFTER_LOAD, str(path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    grown, weights = (float(v) for v in done.stdout.split())
    assert weights == 64.0
    assert grown < 1.5 * weights, f"{grown:.0f} MiB resident after loading {weights:.0f} MiB of weights"
