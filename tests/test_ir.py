"""The IR: validation errors, JSON round trip, reports."""

import json

import numpy as np
import pytest

from adntn_deploy.generators import GeneratorSpec, build_generator
from adntn_deploy.ir import Core, GeneratorError, GeneratorIR, Step, generate_numpy


def _matrix_product_ir(**changes):
    fields = dict(
        family="custom",
        weight_shape=(3, 5),
        cores=(Core("a", (3, 2), "leaf"), Core("b", (2, 5), "leaf")),
        steps=(Step("ij,jk->ik", "a", "b", "w", "identity"),),
        output_permutation=(0, 1),
        output_scale=2.0,
    )
    fields.update(changes)
    return GeneratorIR(**fields)


def test_hand_made_program_runs_and_reports():
    ir = _matrix_product_ir()
    a, b = np.arange(6.0).reshape(3, 2), np.arange(10.0).reshape(2, 5)
    np.testing.assert_allclose(generate_numpy(ir, {"a": a, "b": b}), 2.0 * a @ b)
    report = ir.report()
    assert report.params == 16
    assert report.dense_params == 15
    assert report.generation_flops == 2 * 3 * 2 * 5 + 15  # contraction + output scale
    assert report.peak_intermediate_bytes == 4 * 15


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(steps=(Step("ij,jk", "a", "b", "w"),)), "two-operand einsum"),
        (dict(steps=(Step("ij,jk->ik", "a", "zz", "w"),)), "before it is defined"),
        (dict(steps=(Step("ij,jk->iz", "a", "b", "w"),)), "not a subset"),
        (dict(steps=(Step("ij,ik->jk", "a", "b", "w"),)), "has sizes"),
        (dict(steps=(Step("ij,jk->ik", "a", "b", "w", "swish"),)), "unknown activation"),
        (dict(output_permutation=(0, 0)), "not a permutation"),
        (dict(weight_shape=(4, 5)), "needs 20"),
        (dict(cores=(Core("a", (3, 0), "leaf"), Core("b", (2, 5), "leaf"))), "must be >= 1"),
        (dict(cores=(Core("a", (3, 2), "leaf"), Core("a", (2, 5), "leaf"))), "declared twice"),
        (dict(cores=(Core("a", (3, 2), "weird"), Core("b", (2, 5), "leaf"))), "unknown role"),
        (dict(output_scale=float("nan")), "finite"),
        (dict(steps=()), "at least one"),
    ],
)
def test_invalid_programs_are_rejected_with_a_reason(changes, message):
    with pytest.raises(GeneratorError, match=message):
        _matrix_product_ir(**changes)


@pytest.mark.parametrize("family", ["ttn", "attn", "mera"])
@pytest.mark.parametrize("options", [{}, {"share": True, "out_modes": (4, 4), "in_modes": (2, 2, 2, 2)}, {"bond_dim": (2, 3)}])
def test_json_round_trip_is_exact(family, options):
    ir = build_generator(GeneratorSpec(family=family, **options), (16, 16)).ir
    text = ir.to_json()
    again = GeneratorIR.from_json(text)
    assert again == ir
    assert again.to_json() == text


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="other"), "not an ADNTN generator IR"),
        (lambda d: d.update(version=99), "upgrade adntn-deploy"),
        (lambda d: d.pop("steps"), "missing or has a malformed field"),
    ],
)
def test_bad_ir_files_give_clear_errors(mutate, message):
    data = json.loads(build_generator(GeneratorSpec(), (8, 8)).ir.to_json())
    mutate(data)
    with pytest.raises(GeneratorError, match=message):
        GeneratorIR.from_dict(data)


def test_malformed_json_text():
    with pytest.raises(GeneratorError, match="not valid JSON"):
        GeneratorIR.from_json("{not json")
