"""Torch layers: shapes, forward semantics, weight caching, training, attention projections."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adntn_deploy.fit import fit
from adntn_deploy.generators import GeneratorSpec, build_generator
from adntn_deploy.ir import GeneratorError, generate_numpy
from adntn_deploy.nn import ADNTNConv2d, ADNTNLinear, ADNTNMultiheadAttention, generated_layers

FAMILIES = ["ttn", "attn", "mera"]


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_forward_is_a_linear_layer_with_the_generated_weight(family):
    layer = ADNTNLinear(24, 10, family=family, bond_dim=3)
    x = torch.randn(5, 24)
    assert layer.weight.shape == (10, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer.generator.report().params == sum(p.numel() for p in layer.weight_generator.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "kwargs, in_shape, out_shape",
    [
        (dict(kernel_size=3, padding=1), (2, 4, 8, 8), (2, 6, 8, 8)),
        (dict(kernel_size=(3, 1), stride=2), (1, 4, 9, 9), (1, 6, 4, 5)),
        (dict(kernel_size=1, bias=False), (1, 4, 5, 5), (1, 6, 5, 5)),
        (dict(kernel_size=3, groups=2, dilation=2, padding=2), (1, 4, 7, 7), (1, 6, 7, 7)),
    ],
)
def test_conv2d_matches_torch_conv_with_generated_weight(family, kwargs, in_shape, out_shape):
    layer = ADNTNConv2d(4, 6, family=family, bond_dim=2, **kwargs)
    x = torch.randn(in_shape)
    y = layer(x)
    assert y.shape == out_shape
    groups = kwargs.get("groups", 1)
    assert layer.weight.shape == (6, 4 // groups, *layer.kernel_size)
    expected = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, groups)
    torch.testing.assert_close(y, expected)


def test_eval_caches_the_weight_until_cores_change():
    layer = ADNTNLinear(16, 16).eval()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first
        next(iter(layer.weight_generator.parameters())).mul_(2.0)  # an optimizer step is in place too
        second = layer.weight
    assert second is not first
    assert not torch.equal(first, second)


def test_training_regenerates_and_gradients_reach_every_core():
    layer = ADNTNLinear(16, 8, family="attn", mixing=True).train()
    assert layer.weight is not layer.weight
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    for name, p in layer.weight_generator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_eval_with_gradients_wanted_does_not_use_a_detached_cache():
    layer = ADNTNLinear(8, 8).eval()
    with torch.no_grad():
        layer.weight  # fill the cache
    layer(torch.randn(2, 8)).sum().backward()
    assert all(p.grad is not None for p in layer.weight_generator.parameters())


def test_cache_built_in_inference_mode_is_usable_outside_it():
    layer = ADNTNLinear(8, 8).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        layer(torch.randn(1, 8))
    x = torch.randn(1, 8, requires_grad=True)
    layer(x).sum().backward()  # would fail on an inference tensor saved for backward
    assert x.grad is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_a_4096_square_layer_trains_towards_a_target_weight(family):
    layer = ADNTNLinear(4096, 4096, family=family, bond_dim=2, bias=False)
    teacher = build_generator(GeneratorSpec(family=family, bond_dim=2, seed=11), (4096, 4096))
    target = generate_numpy(teacher.ir, teacher.cores).astype(np.float32)
    cores = {name: p.detach().numpy() for name, p in layer.weight_generator.core_tensors().items()}
    result = fit(layer.generator, cores, target, steps=25, lr=2e-2)
    assert result.relative_error < result.initial_relative_error
    assert min(result.history[1:]) < result.history[0]


def test_training_loop_loss_falls():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ADNTNLinear(32, 64, family="mera", bond_dim=3), torch.nn.Tanh(), ADNTNLinear(64, 1))
    x = torch.randn(256, 32)
    y = torch.sin(x[:, :1]) + x[:, 1:2]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("projections", [("q", "k", "v", "out"), ("q", "v")])
def test_attention_projections(projections):
    attn = ADNTNMultiheadAttention(32, 4, family="ttn", bond_dim=2, projections=projections)
    x = torch.randn(2, 5, 32)
    y = attn(x)
    assert y.shape == (2, 5, 32)
    names = {name for name, _ in generated_layers(attn)}
    assert names == {f"{p}_proj" for p in projections}
    # reference: dense attention with the same (generated) projection weights
    q, k, v = (getattr(attn, f"{p}_proj")(x).view(2, 5, 4, 8).transpose(1, 2) for p in "qkv")
    scores = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    expected = attn.out_proj((scores @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()


def test_bad_layer_arguments():
    with pytest.raises(GeneratorError, match="divisible"):
        ADNTNMultiheadAttention(30, 4)
    with pytest.raises(GeneratorError, match="unknown projection"):
        ADNTNMultiheadAttention(32, 4, projections=("query",))
    with pytest.raises(GeneratorError, match="groups"):
        ADNTNConv2d(3, 4, 3, groups=2)
    with pytest.raises(GeneratorError, match="this layer needs"):
        ADNTNLinear(8, 8, generator=build_generator(GeneratorSpec(), (4, 8)).ir)
