"""The contract's checks on α and η, against what fp32 coefficients actually hold (computed
here in numpy fp32 and fp64, independently of moxkit.engine.formula's bounds)."""

from __future__ import annotations

import numpy as np
import pytest

from moxkit.engine.formula import (
    ALPHA_MAX,
    FP32_TINY,
    PAPER_ETA,
    Coefficients,
    check_alpha,
    check_eta,
)
from moxkit.errors import MoxError


@pytest.mark.parametrize(
    "alpha",
    [2.0**24, 3e7, 1e-50, 1e-45, 0.0, -1.0, float("inf"), float("nan"), 10**5000, True, "4"],
    ids=lambda a: "huge-int" if isinstance(a, int) and a > 2**64 else repr(a),
)
def test_alpha_that_loses_the_formula_is_refused_by_name(alpha):
    with pytest.raises(MoxError, match=r"^alpha "):
        Coefficients(alpha)
    with pytest.raises(MoxError, match=r"^--alpha "):
        check_alpha(alpha, "--alpha")


def test_refused_alphas_really_lose_the_formula():
    """What the refusals protect against: from 2**24, fp32(1+α) == fp32(α) (OUT = α·(REF−MEM));
    at 1e-50, fp32(α) == 0 (OUT == REF)."""
    f = np.float32
    assert f(1 + 2.0**24) == f(2.0**24)
    assert f(1e-50) == 0


def test_every_accepted_alpha_keeps_the_weight_on_ref():
    """Over the accepted range (log-uniform sample plus its ends), a − b = 1 within 2**-10 and
    b is α to fp32 precision."""
    rng = np.random.default_rng(0)
    alphas = np.concatenate(
        [
            [FP32_TINY, 1.0, 4.0, ALPHA_MAX, np.nextafter(ALPHA_MAX, 0)],
            np.exp(rng.uniform(np.log(FP32_TINY), np.log(ALPHA_MAX), 20000)),
        ]
    )
    for alpha in alphas:
        c = Coefficients(float(alpha))
        assert abs((c.ref_scale - c.mem_scale) - 1.0) <= 2.0**-10, alpha
        assert abs(c.mem_scale - alpha) <= 2.0**-24 * alpha, alpha


@pytest.mark.parametrize("eta", [0.0, -0.1, 1.5, 1e-50, float("nan")])
def test_eta_outside_a_weight_is_refused_by_name(eta):
    with pytest.raises(MoxError, match=r"^eta "):
        Coefficients(4.0, eta)
    with pytest.raises(MoxError, match=r"^mix "):
        check_eta(eta, "mix")


def test_coefficients_are_the_fp32_constants():
    c = Coefficients(0.1, PAPER_ETA)
    assert c.ref_scale == float(np.float32(1.1))
    assert c.mem_scale == float(np.float32(0.1))
    assert c.new_weight == float(np.float32(PAPER_ETA))
    assert c.prev_weight == float(np.float32(1 - PAPER_ETA))
    plain = Coefficients(np.float32(2.0))
    assert (plain.momentum, plain.new_weight, plain.prev_weight) == (False, 1.0, 0.0)
    assert type(plain.alpha) is float
