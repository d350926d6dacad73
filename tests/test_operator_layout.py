"""The operator (paired-mode) layout: counts by hand, full-rank weights, the Kronecker join, its start from a
dense weight, seeds, and compatibility with IR written before the layout existed."""

import math

import numpy as np
import pytest
import torch

from adntn_deploy.compression import config_for_ratio
from adntn_deploy.fit import relative_error
from adntn_deploy.generators import GeneratorSpec, build_generator, build_structure
from adntn_deploy.generators.spec import pair_modes
from adntn_deploy.ir.executors import generate_numpy
from adntn_deploy.ir.program import GeneratorError
from adntn_deploy.ir.split import split_generator
from adntn_deploy.nn import ADNTNLinear

FAMILIES = ["ttn", "attn", "mera"]


def _weight(spec, shape):
    generator = build_generator(spec, shape)
    return generate_numpy(generator.ir, generator.cores).reshape(shape[0], -1), generator.ir


# Counts by hand (docs/generators.md, "The operator layout"): site k holds A_k[o_k, i_k, chi_0].
@pytest.mark.parametrize("family, shape, options, expected", [
    # 2 sites (4x4 each, 16 elements): one leaf per half (16*2 each) + top 2x2
    ("ttn", (16, 16), {"bond_dim": 2}, 2 * 16 * 2 + 4),
    # 4 sites of 16: 4 leaves 16*3, one node 3^3 per half, top 3x3
    ("ttn", (256, 256), {"bond_dim": 3}, 4 * 48 + 2 * 27 + 9),
    # MERA on 2 sites per half: top isometry 3^3 and two leaves 16*3 per half, no disentangler, top 3x3
    ("mera", (256, 256), {"bond_dim": 3}, 2 * (27 + 2 * 48) + 9),
    # aTTN, 8 sites of (2, 2): TTN (8 leaves 4*2, 3 nodes 2^3 per half, top 2x2) + one gate per half on
    # the output legs of sites (1, 2): (2*2)^2
    ("attn", (256, 256), {"bond_dim": 2, "max_mode": 2}, 8 * 8 + 2 * 3 * 8 + 4 + 2 * 16),
    # a convolution: in = Cin*kh*kw = (3, 3, 3), out 8 = (4, 2) padded with a 1: sites 12, 6, 3
    ("ttn", (8, 3, 3, 3), {"bond_dim": 2}, 12 * 2 + 6 * 2 + 3 * 2 + 8 + 4),
])
def test_parameter_counts_by_hand(family, shape, options, expected):
    ir = build_structure(GeneratorSpec(family=family, layout="operator", **options), shape)[0]
    assert ir.params == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_operator_weights_are_full_rank_where_split_ones_cannot_be(family):
    shape = (1024, 1024)
    operator = config_for_ratio(shape, 2000, GeneratorSpec(family=family, layout="operator", seed=3))
    split = config_for_ratio(shape, 2000, GeneratorSpec(family=family, layout="split", seed=3))
    w_op, ir_op = _weight(operator, shape)
    w_split, ir_split = _weight(split, shape)
    assert ir_op.report().compression_ratio >= 2000 and ir_split.report().compression_ratio >= 2000
    assert np.linalg.matrix_rank(w_op) >= 256
    assert np.linalg.matrix_rank(w_split) <= max(split.bond_dims)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_join_is_the_last_contraction_over_one_bond(family):
    """W = s * sum_b L_b (x) R_b: the program's last step contracts the two halves over exactly one index."""
    _, ir = _weight(GeneratorSpec(family=family, layout="operator", bond_dim=3), (64, 64))
    lhs, rhs, out = ir.steps[-1].subscripts
    shared = set(lhs) & set(rhs)
    assert len(shared) == 1 and not shared & set(out)
    assert len(set(lhs) - shared) + len(set(rhs) - shared) == len(out)


def test_sum_of_kronecker_products_is_recovered_exactly_from_a_dense_start():
    rng = np.random.default_rng(0)
    target = sum(np.kron(rng.normal(size=(16, 16)), rng.normal(size=(16, 16))) for _ in range(3))
    for layout, bound in (("operator", 1e-8), ("split", None)):
        spec = GeneratorSpec(layout=layout, bond_dim=16, max_mode=4, activation="tanh")
        generator = build_generator(spec, target.shape, target=target)
        err = relative_error(generator.ir, generator.cores, target)
        if bound is not None:
            assert err < 1e-3  # tanh is linear to first order at the start's small pre-activations
        else:
            assert err > 0.5  # a rank-16 product cannot hold a full-rank weight


@pytest.mark.parametrize("out_modes, in_modes, expected", [
    ((4, 4), (4, 4, 2), ((4, 4, 1), (4, 4, 2))),
    ((4, 2), (3, 3, 3), ((4, 2, 1), (3, 3, 3))),
    ((4, 4, 4), (1, 7), ((4, 4, 4), (7, 1, 1))),
])
def test_pairing_pads_the_shorter_side_with_ones(out_modes, in_modes, expected):
    assert pair_modes(out_modes, in_modes) == expected


def test_a_single_site_is_a_clear_error():
    with pytest.raises(GeneratorError, match="at least two paired sites.*lower max_mode"):
        build_structure(GeneratorSpec(layout="operator"), (4, 4))


def test_ir_without_a_layout_reads_as_split():
    data = GeneratorSpec(bond_dim=3).to_dict()
    del data["layout"]
    assert GeneratorSpec.from_dict(data).layout == "split"
    with pytest.raises(GeneratorError, match="unknown layout"):
        GeneratorSpec(layout="paired")


def test_the_low_rank_split_points_operator_layout_generators_to_the_kronecker_split():
    # operator-layout layers stream through adntn_deploy.ir.kron (tests/test_kronecker.py)
    _, ir = _weight(GeneratorSpec(layout="operator", bond_dim=3), (64, 64))
    with pytest.raises(GeneratorError, match="operator layout.*kronecker_split"):
        split_generator(ir)


def test_layers_follow_torch_seeding():
    torch.manual_seed(0)
    a, b = ADNTNLinear(256, 256, layout="operator"), ADNTNLinear(256, 256, layout="operator")
    assert not torch.equal(a.weight, b.weight), "two layers of one shape must not start identical"
    torch.manual_seed(0)
    again = ADNTNLinear(256, 256, layout="operator")
    assert torch.equal(a.weight, again.weight)
    fixed = [ADNTNLinear(256, 256, layout="operator", seed=7).weight for _ in range(2)]
    assert torch.equal(*fixed)
    assert a.generator.metadata["spec"]["seed"] is not None  # the drawn seed is recorded


@pytest.mark.parametrize("family", FAMILIES)
def test_random_start_has_the_kaiming_variance(family):
    w, ir = _weight(GeneratorSpec(family=family, layout="operator", bond_dim=4, seed=1), (512, 256))
    assert math.isclose(float(w.std()), math.sqrt(2 / 256), rel_tol=1e-6)


# a scale test (13 s), run with -m slow: the dense start itself runs in the default suite in
# test_sum_of_kronecker_products_is_recovered_exactly_from_a_dense_start; the thin SVD of tall unfoldings is checked only here
@pytest.mark.slow
def test_dense_start_handles_sites_with_a_million_rows():
    """Three sites of 16x16 on a 1024x1024 weight: the left half spans 65,536 rows against 16 columns (a Gram
    matrix there would need 34 GB); the start takes a thin SVD and still reproduces what the bonds can hold."""
    rng = np.random.default_rng(1)
    target = np.kron(rng.normal(size=(256, 256)), rng.normal(size=(4, 4)))
    spec = GeneratorSpec(layout="operator", bond_dim=(256, 4), max_mode=16, activation="tanh")
    generator = build_generator(spec, target.shape, target=target)
    assert relative_error(generator.ir, generator.cores, target) < 1e-2
