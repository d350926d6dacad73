"""compile --weights stream: streamed layers match load mode and torch, never hold the dense weight, tune."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="install the TVM extra: pip install -e '.[tvm]' (scripts/bootstrap.sh does)")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tolerance import assert_rel_close, float32_rtol  # noqa: E402
from adntn_deploy.compiler.build import compile_model  # noqa: E402
from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear  # noqa: E402
from adntn_deploy.onnx_export import export_onnx  # noqa: E402
from adntn_deploy.runtime import load  # noqa: E402


def _linear(family, top):
    return nn.Sequential(ADNTNLinear(96, 48, family=family, bond_dim=3, top_activation=top), nn.ReLU(),
                         ADNTNLinear(48, 10, family=family, bond_dim=2, top_activation=top))


# (family, top activation, layer kind): every family streams; identity tops as two matmuls / convolutions,
# every other activation through the fused kernel
CASES = [
    ("ttn", "identity", "linear"), ("attn", "identity", "linear"), ("mera", "identity", "linear"),
    ("ttn", "tanh", "linear"), ("attn", "relu", "linear"), ("mera", "sigmoid", "linear"),
    ("ttn", "gelu", "linear"), ("mera", "leaky_relu", "linear"), ("attn", "sin", "linear"),
    ("mera", "identity", "conv"), ("attn", "identity", "conv"),
]


@pytest.mark.parametrize("family, top, kind", CASES)
def test_stream_matches_load_mode_and_torch(tmp_path, family, top, kind):
    torch.manual_seed(0)
    if kind == "linear":
        model, shape = _linear(family, top).eval(), (3, 96)
    else:
        model = nn.Sequential(ADNTNConv2d(3, 8, 3, padding=1, stride=2, family=family, bond_dim=2), nn.ReLU(),
                              nn.Flatten(), ADNTNLinear(8 * 4 * 4, 6, family=family)).eval()
        shape = (2, 3, 8, 8)
    path = tmp_path / "m.onnx"
    export_onnx(model, [torch.randn(*shape)], path, input_names=["input"])
    streamed = compile_model(path, "host", tmp_path / "stream", weights="stream", input_shapes={"input": shape})
    loaded = compile_model(path, "host", tmp_path / "load", weights="load", input_shapes={"input": shape})
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    (got,) = load(streamed.path).run({"input": x}).values()
    (reference,) = load(loaded.path).run({"input": x}).values()
    bound = float32_rtol(96, 48) if kind == "linear" else float32_rtol(27, 128)
    assert_rel_close(got, reference, bound, "stream vs load")
    assert_rel_close(got, expected, bound, "stream vs torch")
    kernels = {layer["kernel"] for layer in streamed.manifest["streamed"]}
    assert kernels == ({"factored"} if top == "identity" else {"fused"})
    assert streamed.manifest["weights"] == "stream"


def test_streamed_artifact_never_materialises_a_dense_weight(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(ADNTNLinear(1024, 512, family="ttn", bond_dim=4),
                          ADNTNLinear(512, 256, family="ttn", bond_dim=4, top_activation="tanh")).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, [torch.randn(1, 1024)], path, input_names=["input"])
    artifact = compile_model(path, "host", tmp_path / "stream", weights="stream")
    predictor = load(artifact.path)
    # what load time leaves on the device: the factors (and biases), never a (out, in) weight
    held = [int(np.prod(w.shape)) for w in predictor._weights]
    assert max(held) < 0.05 * 512 * 256 and sum(held) < 0.05 * (1024 * 512 + 512 * 256)


def test_fused_kernel_holds_one_tile_of_the_weight():
    from tvm import s_tir, te

    from adntn_deploy.compiler.schedules.streamed_dense import schedule, streamed_dense_te

    x = te.placeholder((1, 1024), name="x")
    left_t, right = te.placeholder((8, 512), name="left_t"), te.placeholder((1024, 8), name="right")
    bias = te.placeholder((512,), name="bias")
    func = te.create_prim_func([x, left_t, right, bias, streamed_dense_te(x, left_t, right, bias, "tanh", 0.5)])
    sch = s_tir.Schedule(func)
    schedule(sch, sch.get_sblock("streamed"), (64, 32))
    passes = s_tir.transform
    lowered = tvm.transform.Sequential([passes.LowerInitBlock(), passes.PlanAndUpdateBufferAllocationLocation(),
                                        passes.ConvertBlocksToOpaque(), passes.CompactBufferAllocation()])(sch.mod)
    buffers = dict(re.findall(r"(\w+) = T\.\w*alloc_buffer\(\(([^)]*)\)", lowered.script()))
    # one (input tile x output tile) block each, never the 1024x512 weight
    assert buffers["weight_tile"].replace(" ", "") == "32,64" and buffers["weight_act"].replace(" ", "") == "32,64"


def test_fused_kernel_on_a_gpu_target_is_a_clear_error(tmp_path):
    from adntn_deploy.compiler.errors import StreamCompileError

    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export_onnx(_linear("ttn", "tanh").eval(), [torch.randn(1, 96)], path, input_names=["input"])
    with pytest.raises(StreamCompileError, match="--weights load"):
        compile_model(path, "cuda-sm80", tmp_path / "gpu", weights="stream")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "adntn_deploy.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.mark.slow  # a MetaSchedule run (the README's test command runs it)
def test_cli_tune_stream_kernel_then_compile_applies_it(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export_onnx(nn.Sequential(ADNTNLinear(256, 128, family="ttn", bond_dim=3, top_activation="tanh")).eval(),
                [torch.randn(1, 256)], path, input_names=["input"])
    records = tmp_path / "db"
    proc = _cli("tune", path, "--target", "host", "--weights", "stream", "--only", "adntn_streamed", "--trials", "4",
                "--tuning-records", records, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tasks"] == 1 and summary["trials"] >= 1 and summary["best_us"]
    proc = _cli("compile", path, "--target", "host", "--weights", "stream", "--tuning-records", records,
                "-o", tmp_path / "art", "--json")
    assert proc.returncode == 0, proc.stderr
    tuning = json.loads(proc.stdout)["tuning"]
    assert tuning["scheduled_kernels"] >= 1 and tuning["default_schedules"]["adntn_streamed_dense"] == 0
    proc = _cli("tune", path, "--target", "host", "--only", "no_such_kernel", "--trials", "4", "--tuning-records", records)
    assert proc.returncode != 0 and "no kernel's task name contains" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_stream_refuses_a_layer_it_cannot_stream(tmp_path, cli_runner):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    export_onnx(nn.Sequential(ADNTNConv2d(3, 4, 3, family="ttn", bond_dim=2, top_activation="tanh")).eval(),
                [torch.randn(1, 3, 6, 6)], path, input_names=["input"])
    proc = cli_runner("compile", path, "--target", "host", "--weights", "stream", "-o", tmp_path / "art")
    assert proc.returncode != 0 and "identity top activation" in proc.stderr and "--weights load" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "art").exists()


def _operator_model(kind):
    if kind == "linear":
        return nn.Sequential(ADNTNLinear(96, 64, layout="operator", bond_dim=3, max_mode=4), nn.ReLU(),
                             ADNTNLinear(64, 10, family="mera", layout="operator", bond_dim=2, max_mode=2)), (3, 96)
    return nn.Sequential(ADNTNConv2d(32, 16, 3, padding=1, family="attn", layout="operator", bond_dim=2, max_mode=2),
                         nn.ReLU(), nn.Flatten(), ADNTNLinear(16 * 5 * 5, 6, layout="operator", max_mode=4)), (2, 32, 5, 5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("weights", ["stream", "auto"])
def test_operator_layout_streams_as_kronecker_products_in_tvm(tmp_path, kind, weights):
    torch.manual_seed(0)
    model, shape = _operator_model(kind)
    model.eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, [torch.randn(*shape)], path, input_names=["input"])
    artifact = compile_model(path, "host", tmp_path / weights, weights=weights, input_shapes={"input": shape})
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    predictor = load(artifact.path)
    (got,) = predictor.run({"input": x}).values()
    assert_rel_close(got, expected, float32_rtol(96, 64) if kind == "linear" else float32_rtol(288, 400))
    decisions = artifact.manifest["streamed"]
    assert [d["layout"] for d in decisions] == ["operator", "operator"] and artifact.manifest["weights"] == weights
    streamed = [d for d in decisions if d["mode"] == "stream"]
    assert streamed and all(d["kernel"] == "kronecker" for d in streamed)
    if weights == "stream":  # both layers run from their halves: less than the weights stays resident
        assert len(streamed) == 2
        assert sum(int(np.prod(w.shape)) for w in predictor._weights) < sum(d["dense_bytes"] // 4 for d in decisions)
    # the halves' matmuls (and the convolution) run on packed kernels, fast without tuning
    assert artifact.manifest["tuning"]["packed_dense"] >= 2


def test_operator_stream_compiles_for_gpu_and_arm(tmp_path):
    torch.manual_seed(0)
    model, shape = _operator_model("linear")
    path = tmp_path / "m.onnx"
    export_onnx(model.eval(), [torch.randn(*shape)], path, input_names=["input"])
    for target, arch, device in (("cuda-sm80", "x86_64", "cuda"), ("aarch64", "aarch64", "cpu")):
        artifact = compile_model(path, target, tmp_path / target, weights="stream", input_shapes={"input": shape})
        assert (artifact.manifest["arch"], artifact.manifest["device"]) == (arch, device)
        assert artifact.manifest["weights"] == "stream" and (artifact.path / artifact.manifest["library"]).is_file()
        assert {d["kernel"] for d in artifact.manifest["streamed"]} == {"kronecker"}


def test_cli_compile_auto_prints_each_layer_choice(tmp_path, cli_runner):
    torch.manual_seed(0)
    # the first layer's halves (16x16 at rank 8, 4x4) cost more than its dense GEMM; the second's do not
    model = nn.Sequential(ADNTNLinear(64, 64, layout="operator", bond_dim=8, max_mode=16),
                          ADNTNLinear(64, 64, layout="operator", bond_dim=1, max_mode=2)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, [torch.randn(64, 64)], path, input_names=["input"])
    proc = cli_runner("compile", path, "--target", "host", "--weights", "auto", "-o", tmp_path / "art")
    assert proc.returncode == 0, proc.stderr
    assert "layer 0: generator kept" in proc.stdout and "layer 1: streamed (kronecker, rank 1)" in proc.stdout
    assert "1 layers streamed (kronecker)" in proc.stdout
