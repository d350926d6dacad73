"""Float32 tolerances from first principles, not from what one CPU happened to produce.

Two float32 implementations of a network (torch vs ONNX Runtime vs TVM, AVX2 vs AVX-512 vs NEON kernels)
sum the same K-term products in different orders and with different FMA use. Higham & Mary's
probabilistic bound (SIAM J. Sci. Comput. 2019) puts the rounding error of a K-term sum, with high
probability, at lambda * sqrt(K) * u * sum|terms|, u = 2**-24 the float32 unit roundoff. For zero-mean
data sum|terms| is about sqrt(K) times a typical output, so relative to the largest output the error is
about lambda * K * u; successive layers add their terms, and two implementations both err (factor 2).

    float32_rtol(K1, K2, ...) = 2 * lambda * u * (K1 + K2 + ...),  lambda = 4

A layer that reduces over K inputs (Linear: in_features; Conv2d: in_channels/groups * kh * kw) contributes
K. Generator contractions (bond dimensions of a few) add little and are covered by a floor of 64 terms.
Real defects (a wrong layout, activation or bias, a float16 round trip) give errors of 1e-3 and more,
well above these bounds for the small nets the tests use.
"""

from __future__ import annotations

import numpy as np

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24
CONFIDENCE = 4.0  # lambda: the bound fails with probability below 2 * exp(-lambda**2 / 2) ~ 7e-4 per sum
IMPLEMENTATIONS = 2  # both sides of a comparison round
GENERATOR_TERMS = 64  # floor for the weight generators' own contractions


def float32_rtol(*reductions: int) -> float:
    """Bound on max|got - want| / max|want| for float32 networks whose layers reduce over ``reductions`` terms."""
    if any(k < 1 for k in reductions):
        raise ValueError(f"reduction lengths must be >= 1, not {reductions}")
    terms = sum(reductions) + GENERATOR_TERMS
    return IMPLEMENTATIONS * CONFIDENCE * FLOAT32_UNIT_ROUNDOFF * terms


def relative_error(got, want) -> float:
    """max|got - want| / max|want| (0 when both are zero); shapes must agree."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    scale = float(np.abs(want).max()) if want.size else 0.0
    return float(np.abs(got - want).max() / scale) if scale else float(np.abs(got).max() if got.size else 0.0)


def assert_float32_close(got, want, *reductions: int, what: str = "") -> None:
    """Assert ``got`` equals ``want`` within :func:`float32_rtol` of the given reduction lengths."""
    err, bound = relative_error(got, want), float32_rtol(*reductions)
    assert err <= bound, f"{what or 'outputs'}: relative error {err:.3g} > float32 bound {bound:.3g} for K={reductions}"


def assert_rel_close(got, want, rtol: float, what: str = "") -> None:
    """Assert :func:`relative_error` (max|got - want| / max|want|) of ``got`` against ``want`` is at most ``rtol``."""
    err = relative_error(got, want)
    assert err <= rtol, f"{what or 'outputs'}: relative error {err:.3g} > {rtol:.3g}"
