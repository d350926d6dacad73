"""Splitting generators at their top contraction, and the ONNX rewrite behind --weights stream (no TVM)."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tolerance import float32_rtol, relative_error
from adntn_deploy.generators import GeneratorSpec, build_generator
from adntn_deploy.ir import Core, GeneratorError, GeneratorIR, Step, generate_numpy
from adntn_deploy.ir.split import split_generator
from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear
from adntn_deploy.onnx_export import export_onnx
from adntn_deploy.onnx_export.streaming import STREAMED_OP, StreamError, stream_weights
from adntn_deploy.presets import PRESETS


@pytest.mark.parametrize("family, options", [
    ("ttn", {}), ("ttn", {"mixing": True}), ("ttn", {"arity": 3}),
    ("attn", {}), ("attn", {"max_mode": 16}), ("mera", {}), ("mera", {"max_mode": 8}),
])
@pytest.mark.parametrize("top", ["identity", "tanh"])
@pytest.mark.parametrize("shape", [(64, 96), (10, 64), (16, 4, 3, 3), (12, 8)])
def test_split_rebuilds_the_weight(family, options, top, shape):
    _check_split(GeneratorSpec(family=family, bond_dim=3, top_activation=top, **options), shape)


@pytest.mark.parametrize("family", ["ttn", "attn", "mera"])
def test_split_of_shared_cores(family):
    # sharing needs equal mode sizes per half: powers of two with max_mode 2
    _check_split(GeneratorSpec(family=family, bond_dim=2, share=True, max_mode=2, top_activation="relu"), (16, 64))


def _check_split(spec, shape):
    generator = build_generator(spec, shape)
    split = split_generator(generator.ir)
    cores = {k: v.astype(np.float64) for k, v in generator.cores.items()}
    expected = generate_numpy(generator.ir, cores)
    np.testing.assert_allclose(split.dense_numpy(cores), expected, rtol=1e-10, atol=1e-12)
    assert split.left.rows == shape[0] and split.right.rows == int(np.prod(shape[1:]))
    assert split.activation == spec.top_activation


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if p.spec.layout == "split"))  # operator: test_kronecker.py
def test_every_preset_streams_with_under_one_percent_of_the_weight(name):
    from adntn_deploy.generators import build_structure

    preset = PRESETS[name]
    ir, _ = build_structure(preset.spec, preset.weight_shape)
    split = split_generator(ir)
    assert split.factor_elements < 0.01 * ir.dense_params


def test_a_program_whose_sides_meet_early_is_refused():
    # W[o, i] = sum_k P[o, i, k] q[k]: the last step keeps o and i on one operand, there is nothing to split
    ir = GeneratorIR("ttn", (4, 6), (Core("p", (4, 6, 2), "node"), Core("q", (2,), "top")),
                     (Step("oik,k->oi", "p", "q", "w"),), (0, 1))
    with pytest.raises(GeneratorError, match="cannot be streamed"):
        split_generator(ir)


def _export(tmp_path, model, example, name="m"):
    path = tmp_path / f"{name}.onnx"
    export_onnx(model.eval(), [example], path, input_names=["x"])
    return onnx.load(str(path)), path


class _ThreeD(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = ADNTNLinear(64, 32, family="attn", bond_dim=3)

    def forward(self, x):
        return self.proj(x)


CASES = {
    "gemm": (lambda: nn.Sequential(ADNTNLinear(64, 32, family="ttn", bond_dim=4), nn.ReLU(),
                                   ADNTNLinear(32, 10, family="mera", bond_dim=3)), (2, 64), ["Gemm", "Gemm"]),
    "conv": (lambda: nn.Sequential(ADNTNConv2d(4, 8, 3, family="ttn", bond_dim=3, padding=1, stride=2), nn.ReLU(),
                                   ADNTNConv2d(8, 6, (3, 1), family="mera", bond_dim=2)), (2, 4, 9, 9), ["Conv", "Conv"]),
    "matmul": (_ThreeD, (2, 5, 64), ["MatMul"]),
}

#: each case's reduction lengths (tests/tolerance.py): Linear in_features, Conv in_channels * kernel area
REDUCTIONS = {"gemm": (64, 32), "conv": (36, 24), "matmul": (64,)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_top_layers_stream_as_standard_ops_that_onnxruntime_runs(tmp_path, case):
    import onnxruntime as ort

    build, shape, ops = CASES[case]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape)
    proto, path = _export(tmp_path, model, x)
    streamed, layers = stream_weights(proto)
    assert [layer.op for layer in layers] == ops and all(layer.kernel == "factored" for layer in layers)
    assert all(layer.factor_bytes < layer.dense_bytes for layer in layers)
    assert not any(n.domain == "ai.adntn" for n in streamed.graph.node)  # the generators are gone
    onnx.save(streamed, str(tmp_path / "streamed.onnx"))
    got = ort.InferenceSession(str(tmp_path / "streamed.onnx")).run(None, {"x": x.numpy()})[0]
    expected = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    assert relative_error(got, expected) < float32_rtol(*REDUCTIONS[case])
    assert onnx.load(str(path)).SerializeToString() == proto.SerializeToString()  # the input is not modified


def test_nonlinear_top_linear_becomes_one_fused_node(tmp_path):
    torch.manual_seed(0)
    proto, _ = _export(tmp_path, nn.Sequential(ADNTNLinear(32, 16, family="ttn", bond_dim=2, top_activation="tanh")),
                       torch.randn(1, 32))
    streamed, (layer,) = stream_weights(proto)
    (fused,) = [n for n in streamed.graph.node if n.op_type == STREAMED_OP]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in fused.attribute}
    assert layer.kernel == "fused" and attrs["activation"] == b"tanh" and attrs["scale"] > 0


@pytest.mark.parametrize("layer, message", [
    (lambda: ADNTNConv2d(4, 8, 3, family="ttn", bond_dim=2, top_activation="tanh"), "identity top activation"),
    (lambda: ADNTNConv2d(4, 8, 3, family="ttn", bond_dim=2, groups=2), "grouped convolutions"),
])
def test_layers_that_cannot_stream_get_one_clear_error(tmp_path, layer, message):
    torch.manual_seed(0)
    proto, _ = _export(tmp_path, nn.Sequential(layer()), torch.randn(1, 4, 6, 6))
    with pytest.raises(StreamError, match=message) as info:
        stream_weights(proto)
    assert "--weights load" in str(info.value) and "\n" not in str(info.value)
