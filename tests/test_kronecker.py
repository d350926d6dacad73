"""Kronecker streaming of operator-layout layers: the split, the ONNX form ONNX Runtime runs, export --stream,
--weights auto's choices, the stream format check and the resident-weight metric (TVM cases: test_streaming.py)."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tolerance import float32_rtol, relative_error
from adntn_deploy.checkpoint import save_checkpoint
from adntn_deploy.generators import GeneratorSpec, build_generator, build_structure
from adntn_deploy.ir import GeneratorError, generate_numpy
from adntn_deploy.ir.kron import kronecker_split
from adntn_deploy.ir.split import split_generator
from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear
from adntn_deploy.onnx_export import export_onnx
from adntn_deploy.onnx_export.reader import OnnxModelError, load_onnx
from adntn_deploy.onnx_export.streaming import StreamError, stream_weights
from adntn_deploy.presets import PRESETS


@pytest.mark.parametrize("family", ["ttn", "attn", "mera"])
@pytest.mark.parametrize("shape, options", [
    ((64, 96), {"max_mode": 4}), ((64, 64), {"max_mode": 2, "share": True}), ((12, 8), {}),
    ((32, 16, 3, 3), {"max_mode": 4}), ((10, 64), {"max_mode": 8, "top_activation": "tanh"}),
])
def test_kronecker_split_rebuilds_the_weight_and_applies_it(family, shape, options):
    generator = build_generator(GeneratorSpec(family=family, layout="operator", bond_dim=3, **options), shape)
    kron = kronecker_split(generator.ir)
    cores = {k: v.astype(np.float64) for k, v in generator.cores.items()}
    weight = generate_numpy(generator.ir, cores)
    np.testing.assert_allclose(kron.dense_numpy(cores), weight, rtol=1e-10, atol=1e-12)
    assert kron.out_left * kron.out_right == shape[0] and kron.in_left * kron.in_right == int(np.prod(shape[1:]))
    if kron.activation == "identity":
        x = np.random.default_rng(0).standard_normal((5, kron.in_left * kron.in_right))
        np.testing.assert_allclose(kron.apply_numpy(x, cores), x @ weight.reshape(shape[0], -1).T, rtol=1e-9, atol=1e-10)
    else:
        with pytest.raises(GeneratorError, match="does not factor"):
            kron.apply_numpy(np.zeros((1, kron.in_left * kron.in_right)), cores)


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if p.spec.layout == "operator"))
def test_every_operator_preset_splits_into_halves(name):
    preset = PRESETS[name]
    ir, _ = build_structure(preset.spec, preset.weight_shape)
    kron = kronecker_split(ir)
    assert kron.out_left * kron.out_right == preset.weight_shape[0]
    assert kron.in_left * kron.in_right == preset.weight_shape[1]
    assert kron.factor_elements < kron.dense_elements
    assert kron.matmul_flops(1) == min(kron.order_flops(1, "left"), kron.order_flops(1, "right"))


def test_the_cheaper_order_is_chosen():
    # VGG-16 fc6 at 2,000x: halves 64x784 and 64x32 at rank 30; the left half first needs 36% of the FLOPs
    ir, _ = build_structure(PRESETS["vgg16-fc6-ttn-operator-2k"].spec, (4096, 25088))
    kron = kronecker_split(ir)
    assert kron.best_order() == "left"
    assert 2.5 * kron.order_flops(1, "left") < kron.order_flops(1, "right")
    assert kron.matmul_flops(1) < 2 * kron.dense_elements


def test_each_layout_points_at_the_other_split():
    spec = GeneratorSpec(family="ttn", bond_dim=2)
    with pytest.raises(GeneratorError, match="split_generator"):
        kronecker_split(build_generator(spec, (16, 16)).ir)
    with pytest.raises(GeneratorError, match="kronecker_split"):
        split_generator(build_generator(spec.with_options(layout="operator"), (16, 16)).ir)


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = ADNTNLinear(64, 32, family="attn", layout="operator", bond_dim=3, max_mode=4)

    def forward(self, x):
        return self.proj(x)


# (model, input shape, reductions for the tolerance); "square" has halves of equal sizes (64 = 8 x 8 each),
# where a transpose that swaps two equal-sized axes is easy to drop by mistake
CASES = {
    "gemm": (lambda: nn.Sequential(ADNTNLinear(64, 48, layout="operator", bond_dim=3, max_mode=4), nn.ReLU(),
                                   ADNTNLinear(48, 10, family="mera", layout="operator", bond_dim=2, max_mode=4)),
             (3, 64), (64, 48)),
    "square": (lambda: nn.Sequential(ADNTNLinear(64, 64, layout="operator", bond_dim=2, max_mode=2, share=True)),
               (2, 64), (64,)),
    "conv": (lambda: nn.Sequential(ADNTNConv2d(32, 16, 3, layout="operator", bond_dim=3, max_mode=2, padding=1, stride=2),
                                   nn.ReLU(), ADNTNConv2d(16, 8, (3, 1), family="attn", layout="operator", bond_dim=2,
                                                          max_mode=2)),
             (2, 32, 9, 9), (288, 48)),
    "matmul": (_Tokens, (2, 5, 64), (64,)),
    # halves 8x98 and 4x4: applying the left half first makes the smaller intermediate
    "left-first": (lambda: nn.Sequential(ADNTNLinear(392, 32, layout="operator", bond_dim=3, max_mode=2)), (3, 392), (392,)),
}


def _export(tmp_path, model, x, **options):
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
    export_onnx(model.eval(), [x], path, input_names=["x"], **options)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_stream_runs_in_stock_onnxruntime_without_the_dense_weight(tmp_path, case):
    import onnxruntime as ort

    build, shape, reductions = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    path = _export(tmp_path, model, x, stream=True)
    proto = onnx.load(str(path))
    assert not any(n.domain == "ai.adntn" for n in proto.graph.node) and not proto.functions
    meta = json.loads(next(p.value for p in proto.metadata_props if p.key == "adntn.stream"))
    assert meta["format"] == 1 and all(layer["kernel"] == "kronecker" for layer in meta["layers"])
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    got = ort.InferenceSession(str(path), options).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert relative_error(got, expected) < float32_rtol(*reductions)
    # ORT's constant folding made the halves, not the weights: its constants hold less than the weights
    weights = sum(layer["dense_bytes"] // 4 for layer in meta["layers"])
    folded = onnx.load(str(tmp_path / "optimized.onnx"))
    assert sum(int(np.prod(i.dims)) for i in folded.graph.initializer) < weights


def test_onnxruntime_keeps_factors_not_weights_resident(tmp_path):
    from adntn_deploy.runtime import load

    torch.manual_seed(0)
    model = nn.Sequential(ADNTNLinear(1024, 1024, layout="operator", bond_dim=2, max_mode=4)).eval()
    x = torch.randn(2, 1024)
    streamed = load(_export(tmp_path, model, x, stream=True), backend="ort")
    plain = load(_export(tmp_path, model, x), backend="ort")
    assert plain.resident_weight_bytes >= 4 * 1024 * 1024
    assert streamed.resident_weight_bytes < 0.01 * 4 * 1024 * 1024
    (got,) = streamed.run({"x": x.numpy()}).values()
    (reference,) = plain.run({"x": x.numpy()}).values()
    assert relative_error(got, reference) < float32_rtol(1024)


@pytest.mark.parametrize("layer, message", [
    (lambda: ADNTNConv2d(4, 16, 3, layout="operator", bond_dim=2, max_mode=4), "kernel modes are split"),
    (lambda: ADNTNConv2d(32, 16, 3, layout="operator", bond_dim=2, max_mode=2, top_activation="tanh"),
     "identity top activation"),
])
def test_layers_that_cannot_stream_get_one_line_and_auto_keeps_them(tmp_path, layer, message):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(layer()).eval()
    in_channels = model[0].in_channels
    x = torch.randn(1, in_channels, 6, 6)
    proto = onnx.load(str(_export(tmp_path, model, x)))
    for runtime, fix in (("tvm", "--weights load"), ("onnx", "without --stream")):
        with pytest.raises(StreamError, match=message) as info:
            stream_weights(proto, runtime=runtime)
        assert fix in str(info.value) and "layer 0" in str(info.value) and "\n" not in str(info.value)
    kept, (decision,) = stream_weights(proto, policy="auto", runtime="onnx")
    assert decision.mode == "load" and message.split()[0] in decision.reason
    onnx.save(kept, str(tmp_path / "kept.onnx"))
    ort.InferenceSession(str(tmp_path / "kept.onnx")).run(None, {"x": x.numpy()})


def test_auto_streams_only_where_the_cost_model_wins(tmp_path):
    torch.manual_seed(0)
    # first layer: halves 16x16 (rank 8) and 4x4 cost more than the 64x64 GEMM at batch 64; second: 8x8 + 8x8
    model = nn.Sequential(ADNTNLinear(64, 64, layout="operator", bond_dim=8, max_mode=16),
                          ADNTNLinear(64, 64, layout="operator", bond_dim=1, max_mode=2)).eval()
    proto = onnx.load(str(_export(tmp_path, model, torch.randn(64, 64))))
    _, decisions = stream_weights(proto, policy="auto")
    assert [d.mode for d in decisions] == ["load", "stream"]
    assert decisions[0].cost_ratio > 1 > decisions[1].cost_ratio
    assert "dense layer is cheaper" in decisions[0].reason


def test_a_newer_stream_format_is_refused_with_upgrade_advice(tmp_path):
    torch.manual_seed(0)
    path = _export(tmp_path, nn.Sequential(ADNTNLinear(16, 16, layout="operator", max_mode=4)), torch.randn(1, 16),
                   stream=True)
    proto = onnx.load(str(path))
    entry = next(p for p in proto.metadata_props if p.key == "adntn.stream")
    entry.value = json.dumps({"format": 99, "writer": "9.0"})
    onnx.save(proto, str(tmp_path / "future.onnx"))
    with pytest.raises(OnnxModelError, match="stream format 99.*upgrade adntn-deploy"):
        load_onnx(tmp_path / "future.onnx")


def test_cli_export_stream_and_auto(tmp_path, cli_runner):
    torch.manual_seed(0)
    from adntn_deploy.models.sequential import build_sequential

    def linear(out_features, **generator):
        return {"type": "adntn_linear", "in_features": 64, "out_features": out_features,
                "generator": {"family": "ttn", "layout": "operator", **generator}}

    model = build_sequential({"type": "sequential", "layers": [
        linear(64, bond_dim=8, max_mode=16), {"type": "relu"}, linear(10, bond_dim=2, max_mode=4)]})
    checkpoint = save_checkpoint(tmp_path / "m.safetensors", model, {"inputs": [{"name": "x", "shape": [64, 64]}]})
    done = cli_runner("export", checkpoint, "-o", tmp_path / "s.onnx", "--stream", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["stream"] == "on" and [layer["mode"] for layer in summary["streamed"]] == ["stream", "stream"]
    done = cli_runner("export", checkpoint, "-o", tmp_path / "a.onnx", "--stream", "auto")
    assert done.returncode == 0, done.stderr
    assert "layer 0: generator kept" in done.stdout and "layer 2: streamed (kronecker, rank 2)" in done.stdout
    done = cli_runner("export", checkpoint, "-o", tmp_path / "b.onnx", "--stream", "sometimes")
    assert done.returncode == 2 and "sometimes" in done.stderr and not (tmp_path / "b.onnx").exists()


def test_server_reports_resident_weight_bytes_of_a_streamed_file(tmp_path):
    from test_serving import Server

    torch.manual_seed(0)
    model = nn.Sequential(ADNTNLinear(256, 256, layout="operator", bond_dim=2, max_mode=4)).eval()
    path = tmp_path / "kron.onnx"
    export_onnx(model, [torch.randn(2, 256)], path, input_names=["x"], output_names=["y"], dynamic_batch=True,
                stream=True)
    server = Server(path)
    try:
        x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
        status, body = server.infer("kron", {"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32",
                                                         "data": x.ravel().tolist()}]})
        assert status == 200, body
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = np.array(json.loads(body)["outputs"][0]["data"], np.float32).reshape(2, 256)
        assert relative_error(got, expected) < float32_rtol(256)
        metrics = server.get("/metrics")[1].decode()
        (line,) = [m for m in metrics.splitlines() if m.startswith("adntn_model_resident_weight_bytes{")]
        assert 'model="kron"' in line and 0 < float(line.split()[-1]) < 0.05 * 4 * 256 * 256
    finally:
        server.stop()


@pytest.mark.parametrize("top, streams", [("identity", True), ("tanh", False)])
def test_split_layout_layers_export_streamed_too(tmp_path, top, streams):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = nn.Sequential(ADNTNLinear(96, 48, family="mera", bond_dim=3, top_activation=top)).eval()
    x = torch.randn(2, 96)
    if not streams:  # ONNX Runtime has no fused tile kernel: a clear error, and auto keeps the generator
        with pytest.raises(StreamError, match="identity top activation to factor exactly in ONNX Runtime.*without --stream"):
            _export(tmp_path, model, x, stream=True)
    path = _export(tmp_path, model, x, stream=True if streams else "auto")
    proto = onnx.load(str(path))
    assert any(n.domain == "ai.adntn" for n in proto.graph.node) != streams
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert relative_error(got, model(x).numpy()) < float32_rtol(96)
