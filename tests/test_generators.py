"""Families: executors agree, gradients are right, initial variance matches dense init, bad specs fail."""

import math

import numpy as np
import pytest
import torch

from adntn_deploy.fit import fit, relative_error
from adntn_deploy.generators import GeneratorSpec, build_generator, factorize
from adntn_deploy.ir import GeneratorError, generate_numpy, generate_torch

FAMILY_OPTIONS = [
    ("ttn", {}),
    ("ttn", {"mixing": True, "activation": ("gelu", "sin")}),
    ("ttn", {"arity": 3, "bond_dim": (2, 3)}),
    ("ttn", {"share": True, "out_modes": (2, 2, 2, 2), "in_modes": (3, 3, 3)}),
    ("attn", {}),
    ("attn", {"mixing": True, "activation": "relu"}),
    ("attn", {"share": True, "out_modes": (2, 2, 2, 2), "in_modes": (3, 3, 3)}),
    ("mera", {}),
    ("mera", {"activation": ("leaky_relu", "tanh", "sigmoid"), "bond_dim": (3, 2)}),
    ("mera", {"share": True, "out_modes": (2, 2, 2, 2), "in_modes": (3, 3, 3)}),
]


@pytest.mark.parametrize(
    "family, options, shape",
    [(f, o, (16, 27)) for f, o in FAMILY_OPTIONS] + [(f, o, (6, 2, 3, 3)) for f, o in FAMILY_OPTIONS if "in_modes" not in o],
)
def test_torch_executor_equals_numpy_executor(family, options, shape):
    gen = build_generator(GeneratorSpec(family=family, **options), shape)
    reference = generate_numpy(gen.ir, gen.cores)
    ours = generate_torch(gen.ir, {k: torch.from_numpy(v) for k, v in gen.cores.items()}).numpy()
    assert reference.shape == shape
    np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family, options", [f for f in FAMILY_OPTIONS if f[1].get("activation") != "relu"])
def test_gradients_match_finite_differences(family, options):
    gen = build_generator(GeneratorSpec(family=family, **options), (16, 27))
    names = list(gen.ir.core_names)
    tensors = [torch.tensor(gen.cores[n], dtype=torch.float64, requires_grad=True) for n in names]
    probe = torch.randn(gen.ir.weight_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def scalar(*cores):
        return (generate_torch(gen.ir, dict(zip(names, cores))) * probe).sum()

    assert torch.autograd.gradcheck(scalar, tensors, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["kaiming", "xavier"])
@pytest.mark.parametrize("family", ["ttn", "attn", "mera"])
@pytest.mark.parametrize("shape", [(64, 128), (32, 16, 3, 3)])
def test_initial_weight_has_dense_init_variance(family, init, shape):
    gen = build_generator(GeneratorSpec(family=family, init=init), shape)
    fan_in = math.prod(shape[1:])
    fan_out = shape[0] * math.prod(shape[2:])
    expected = math.sqrt(2 / fan_in) if init == "kaiming" else math.sqrt(2 / (fan_in + fan_out))
    weight = generate_numpy(gen.ir, gen.cores)
    assert weight.std() == pytest.approx(expected, rel=1e-6)
    assert abs(weight.mean()) < 0.5 * expected


def test_seeds_are_deterministic_and_distinct():
    a = build_generator(GeneratorSpec(seed=3), (16, 16))
    b = build_generator(GeneratorSpec(seed=3), (16, 16))
    c = build_generator(GeneratorSpec(seed=4), (16, 16))
    assert all(np.array_equal(a.cores[k], b.cores[k]) for k in a.cores)
    assert not all(np.array_equal(a.cores[k], c.cores[k]) for k in a.cores)


@pytest.mark.parametrize(
    "n, max_mode, expected",
    [(4096, 4, (4,) * 6), (25088, 4, (7, 7, 4, 4, 4, 4, 2)), (1000, 10, (10, 10, 10)), (13, 4, (13,)), (1, 4, (1,)),
     (9216, 8, (8, 8, 6, 6, 4))],
)
def test_factorize(n, max_mode, expected):
    modes = factorize(n, max_mode)
    assert math.prod(modes) == n
    assert modes == expected


@pytest.mark.parametrize(
    "spec_options, shape, message",
    [
        ({"out_modes": (3, 5)}, (16, 16), "multiply to 15"),
        ({"bond_dim": 0}, (16, 16), "positive integer"),
        ({"bond_dim": (2, 0)}, (16, 16), "positive integer"),
        ({"activation": "swish"}, (16, 16), "unknown activation"),
        ({"family": "peps"}, (16, 16), "unknown generator family"),
        ({"arity": 1}, (16, 16), "arity must be >= 2"),
        ({"family": "mera", "mixing": True}, (16, 16), "mixing tensors belong"),
        ({"family": "mera", "arity": 3}, (16, 16), "MERA is binary"),
        ({"share": True, "out_modes": (4, 2, 2)}, (16, 16), "shared core"),
        ({"planner": "magic"}, (16, 16), "unknown planner"),
        ({"init": "he"}, (16, 16), "unknown init"),
        ({}, (16,), "must be"),
    ],
)
def test_bad_configurations_raise_clear_errors(spec_options, shape, message):
    with pytest.raises(GeneratorError, match=message):
        build_generator(GeneratorSpec(**spec_options), shape)


@pytest.mark.parametrize("family", ["ttn", "attn", "mera"])
def test_target_init_is_exact_when_bonds_do_not_truncate(family):
    rng = np.random.default_rng(0)
    target = rng.standard_normal((16, 12))
    spec = GeneratorSpec(family=family, activation="identity", bond_dim=64, out_modes=(4, 4), in_modes=(3, 4))
    gen = build_generator(spec, target.shape, target=target)
    assert relative_error(gen.ir, gen.cores, target) < 1e-10


@pytest.mark.parametrize("family", ["ttn", "attn", "mera"])
def test_target_init_then_fit_approaches_a_reachable_weight(family):
    spec = GeneratorSpec(family=family, bond_dim=3)
    teacher = build_generator(spec.with_options(seed=7), (64, 48))
    target = generate_numpy(teacher.ir, teacher.cores)
    student = build_generator(spec, target.shape, target=target)
    result = fit(student.ir, student.cores, target, steps=60, lr=3e-3)
    before, after = relative_error(student.ir, student.cores, target), relative_error(student.ir, result.cores, target)
    assert before < 0.5 and before == pytest.approx(result.initial_relative_error, rel=1e-4)
    assert after == pytest.approx(result.relative_error, rel=1e-4)
    assert after < before  # the fit moved the cores towards the target, not merely kept the start


def test_target_init_rejects_what_it_cannot_do():
    with pytest.raises(GeneratorError, match="linear near zero"):
        build_generator(GeneratorSpec(activation="relu"), (16, 16), target=np.ones((16, 16)))
    with pytest.raises(GeneratorError, match="share=False"):
        build_generator(GeneratorSpec(share=True), (16, 16), target=np.ones((16, 16)))
    with pytest.raises(GeneratorError, match="target has shape"):
        build_generator(GeneratorSpec(), (16, 16), target=np.ones((8, 16)))


def test_fit_rejects_bad_targets():
    gen = build_generator(GeneratorSpec(), (16, 16))
    with pytest.raises(GeneratorError, match="target has shape"):
        fit(gen.ir, gen.cores, np.ones((4, 4)))
    with pytest.raises(GeneratorError, match="all zeros"):
        fit(gen.ir, gen.cores, np.zeros((16, 16)))
    with pytest.raises(GeneratorError, match="unknown fit method"):
        fit(gen.ir, gen.cores, np.ones((16, 16)), method="sgd")


def test_lbfgs_fit_is_deterministic():
    gen = build_generator(GeneratorSpec(bond_dim=2), (16, 16))
    target = np.random.default_rng(0).standard_normal((16, 16))
    first = fit(gen.ir, gen.cores, target, steps=5, method="lbfgs")
    second = fit(gen.ir, gen.cores, target, steps=5, method="lbfgs")
    assert first.history == second.history
    assert first.relative_error < first.initial_relative_error
