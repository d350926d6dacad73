"""The float32 bounds of tests/tolerance.py hold for reordered sums and still catch real defects."""

import numpy as np
import pytest

from tolerance import assert_rel_close, float32_rtol, relative_error


def _net(rng, dims):
    return [rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k) for k, n in zip(dims, dims[1:])]


def _forward(x, weights, dtype=np.float32, reverse=False):
    for k, w in enumerate(weights):
        if reverse:  # the same sums in the opposite order, one product at a time
            x = sum((x[:, i:i + 1].astype(dtype) * w[i].astype(dtype) for i in reversed(range(w.shape[0]))),
                    start=np.zeros((x.shape[0], w.shape[1]), dtype))
        else:
            x = x.astype(dtype) @ w.astype(dtype)
        x = np.maximum(x, 0) if k < len(weights) - 1 else x
    return x


@pytest.mark.parametrize("dims", [(27, 72, 32, 5), (48, 64, 10), (784, 256, 10), (1024, 1024)])
def test_reordered_float32_sums_stay_within_the_bound(dims):
    rng = np.random.default_rng(sum(dims))
    weights, x = _net(rng, dims), rng.standard_normal((4, dims[0])).astype(np.float32)
    blas, reverse, exact = _forward(x, weights), _forward(x, weights, reverse=True), _forward(x, weights, np.float64)
    bound = float32_rtol(*dims[:-1])
    assert relative_error(blas, reverse) < bound
    assert relative_error(blas, exact) < bound / 2  # one implementation against the exact value


@pytest.mark.parametrize("defect", ["float16 weights", "one weight off by 1%", "bias dropped"])
def test_the_bound_catches_real_defects(defect):
    dims = (27, 72, 32, 5)
    rng = np.random.default_rng(0)
    weights, x = _net(rng, dims), rng.standard_normal((4, dims[0])).astype(np.float32)
    broken = [w.copy() for w in weights]
    if defect == "float16 weights":
        broken = [w.astype(np.float16).astype(np.float32) for w in broken]
    elif defect == "one weight off by 1%":
        index = np.unravel_index(np.abs(broken[-1]).argmax(), broken[-1].shape)
        broken[-1][index] *= 1.01
    else:  # a bias of 0.01 that one implementation forgot
        broken[0] = np.vstack([broken[0][:-1], broken[0][-1:] + 0.01])
    assert relative_error(_forward(x, broken), _forward(x, weights)) > float32_rtol(*dims[:-1])


def test_reduction_lengths_must_be_positive():
    with pytest.raises(ValueError, match=">= 1"):
        float32_rtol(0)


def test_assert_rel_close_scales_by_the_largest_wanted_value_and_names_the_failure():
    want = np.array([1.0, -4.0])
    assert_rel_close(want + [0.0, 0.039], want, 0.01)  # 0.039 / 4
    with pytest.raises(AssertionError, match="logits: relative error 0.0125 > 0.01"):
        assert_rel_close(want + [0.05, 0.0], want, 0.01, "logits")
    with pytest.raises(AssertionError, match="shape"):
        assert_rel_close(np.zeros(3), np.zeros(2), 1.0)
