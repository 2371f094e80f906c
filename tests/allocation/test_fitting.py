"""Fitting d_i(b) = alpha_i * beta^(-b): recovery of known parameters, the pooled slope, guards, round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ratequant.allocation.fitting import DistortionFit, fit_distortion
from ratequant.errors import RateQuantError

BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def synthetic(shape=(2, 5, 3), betas=(4.5, 3.7), bits=BITS, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    alpha = np.exp(rng.normal(0.0, 2.0, shape))
    beta = np.empty(shape)
    beta[0], beta[1] = betas
    b = np.asarray(bits, dtype=np.float64)
    table = alpha[..., None] * beta[..., None] ** -b
    if noise:
        table = table * np.exp(rng.normal(0.0, noise, table.shape))
    return table, alpha, beta


def test_exact_curves_recover_parameters():
    table, alpha, _ = synthetic()
    fit = fit_distortion(table, BITS)
    assert fit.beta_key == pytest.approx(4.5, rel=1e-12)
    assert fit.beta_value == pytest.approx(3.7, rel=1e-12)
    np.testing.assert_allclose(fit.alpha, alpha, rtol=1e-10)
    np.testing.assert_allclose(fit.r2, 1.0, atol=1e-12)
    assert fit.r2_overall == pytest.approx(1.0, abs=1e-12)
    assert fit.worst_residual < 1e-10
    np.testing.assert_allclose(fit.predicted_table(), table, rtol=1e-10)
    assert fit.n_clipped == 0


def test_noisy_curves_recover_parameters_within_noise():
    table, alpha, _ = synthetic(shape=(2, 30, 3), noise=0.05, seed=1)
    fit = fit_distortion(table, BITS)
    # pooled slope over 90 components x 8 points: standard error ~ 0.05 / sqrt(90 * 42) ~ 1e-3 in log beta
    assert abs(math.log(fit.beta_key / 4.5)) < 5e-3
    assert abs(math.log(fit.beta_value / 3.7)) < 5e-3
    assert np.abs(np.log(fit.alpha / alpha)).max() < 0.1  # per-component intercept: se ~ 0.05/sqrt(8) + slope term
    assert fit.r2_overall > 0.999
    assert fit.r2.min() > 0.99
    assert 0.05 < fit.worst_residual < 0.3  # about 4 sigma of 0.05 over 1440 points


def test_pooled_slope_equals_joint_least_squares():
    """The closed-form pooled slope is the least-squares solution with per-component intercepts."""
    table, _, _ = synthetic(shape=(2, 3, 2), noise=0.3, seed=2)
    fit = fit_distortion(table, BITS)
    for k, beta in ((0, fit.beta_key), (1, fit.beta_value)):
        y = np.log(table[k]).reshape(-1, len(BITS))  # [components, nb]
        m = y.shape[0]
        rows, rhs = [], []
        for i in range(m):
            for j, b in enumerate(BITS):
                row = np.zeros(m + 1)
                row[i] = 1.0
                row[m] = -b
                rows.append(row)
                rhs.append(y[i, j])
        sol = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
        assert math.log(beta) == pytest.approx(sol[m], rel=1e-10)
        np.testing.assert_allclose(np.log(fit.alpha[k].reshape(-1)), sol[:m], rtol=1e-10, atol=1e-10)


def test_zero_and_negative_entries_are_clipped_and_left_out():
    table, alpha, _ = synthetic(shape=(2, 2, 2))
    table[0, 0, 0, -1] = 0.0  # exact reconstruction at 8 bits
    table[1, 1, 1, -2:] = [-1e-30, 0.0]  # numerical noise below zero
    with np.errstate(all="raise"):  # would trip on log(0) or log(negative)
        fit = fit_distortion(table, BITS)
    assert fit.n_clipped == 3
    assert fit.beta_key == pytest.approx(4.5, rel=1e-12)
    assert fit.beta_value == pytest.approx(3.7, rel=1e-12)
    np.testing.assert_allclose(fit.alpha, alpha, rtol=1e-10)
    assert np.isfinite(fit.r2).all() and fit.worst_residual < 1e-10


def test_all_zero_component_gets_alpha_zero():
    table, alpha, _ = synthetic(shape=(2, 2, 2))
    table[1, 0, 1] = 0.0
    fit = fit_distortion(table, BITS)
    assert fit.alpha[1, 0, 1] == 0.0
    assert fit.r2[1, 0, 1] == 1.0
    assert fit.predict(np.full((2, 2, 2), 3))[1, 0, 1] == 0.0
    mask = np.ones((2, 2, 2), bool)
    mask[1, 0, 1] = False
    np.testing.assert_allclose(fit.alpha[mask], alpha[mask], rtol=1e-10)


def test_component_mode_recovers_per_component_betas():
    rng = np.random.default_rng(3)
    shape = (2, 3, 2)
    alpha = np.exp(rng.normal(0, 1, shape))
    beta = rng.uniform(2.5, 6.0, shape)
    table = alpha[..., None] * beta[..., None] ** -np.asarray(BITS, float)
    fit = fit_distortion(table, BITS, shared_beta="component")
    np.testing.assert_allclose(fit.beta, beta, rtol=1e-10)
    np.testing.assert_allclose(fit.alpha, alpha, rtol=1e-9)
    np.testing.assert_allclose(fit.r2, 1.0, atol=1e-12)
    assert fit.details["beta_fallback_components"] == 0
    shared = fit_distortion(table, BITS)  # the per-kind report is the pooled fit
    assert fit.beta_key == shared.beta_key and fit.beta_value == shared.beta_value
    assert shared.r2.min() < 0.99  # one slope per kind cannot fit different betas


def test_global_mode_shares_one_beta():
    table, _, _ = synthetic(betas=(4.0, 4.0))
    fit = fit_distortion(table, BITS, shared_beta="global")
    assert fit.beta_key == fit.beta_value == pytest.approx(4.0, rel=1e-12)
    table2, _, _ = synthetic(betas=(5.0, 3.0))
    fit2 = fit_distortion(table2, BITS, shared_beta="global")
    assert fit2.beta_key == fit2.beta_value
    assert 3.0 < fit2.beta_key < 5.0


def test_subset_bitset_and_prediction_at_other_widths():
    bits = (2, 4, 8)
    table, alpha, _ = synthetic(bits=bits)
    fit = fit_distortion(table, bits)
    want, _, _ = synthetic(bits=(3, 5))
    np.testing.assert_allclose(fit.curves((3, 5)), want, rtol=1e-10)
    b = np.full((2, 5, 3), 3)
    np.testing.assert_allclose(fit.predict(b), want[..., 0], rtol=1e-10)
    with pytest.raises(RateQuantError, match="shape"):
        fit.predict(np.full((2, 5), 3))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: t[..., ::-1].copy(), "does not decrease"),
        (lambda t: np.where(np.arange(8) == 3, np.nan, t), "NaN"),
        (lambda t: t[..., :7], "bit columns"),
        (lambda t: t[0], "shape"),
        (lambda t: np.zeros_like(t), "cannot fit beta"),
    ],
)
def test_bad_tables_are_refused(mutate, match):
    table, _, _ = synthetic()
    with pytest.raises(RateQuantError, match=match):
        fit_distortion(mutate(table), BITS)


def test_bad_arguments_are_refused():
    table, _, _ = synthetic()
    with pytest.raises(RateQuantError, match="two or more"):
        fit_distortion(table[..., :1], (4,))
    with pytest.raises(RateQuantError, match="increasing"):
        fit_distortion(table, (1, 2, 3, 4, 5, 6, 8, 7))
    with pytest.raises(RateQuantError, match="1 to 8"):
        fit_distortion(table, (0, 1, 2, 3, 4, 5, 6, 7))
    with pytest.raises(RateQuantError, match="shared_beta"):
        fit_distortion(table, BITS, shared_beta="layer")


@pytest.mark.parametrize("mode", ["kind", "component", "global"])
def test_json_round_trip_is_exact(mode):
    table, _, _ = synthetic(noise=0.1)
    fit = fit_distortion(table, BITS, shared_beta=mode)
    again = DistortionFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert again == fit
    np.testing.assert_array_equal(again.alpha, fit.alpha)
    np.testing.assert_array_equal(again.beta, fit.beta)
    np.testing.assert_array_equal(again.predicted_table(), fit.predicted_table())
    assert not fit.alpha.flags.writeable


@pytest.mark.parametrize(
    "change, match",
    [
        ({"beta_key": 0.9}, "beta_key"),
        ({"beta_value": float("nan")}, "beta_value"),
        ({"r2_overall": 10**400}, "r2_overall"),
        ({"alpha": {"key": [[1.0]]}}, "key' and 'value"),
        ({"bitset": [3]}, "at least 2"),
        ({"extra": 1}, "unknown"),
        ({"shared_beta": "component"}, "per-component"),
    ],
)
def test_from_dict_refuses_malformed(change, match):
    table, _, _ = synthetic(shape=(2, 1, 1))
    d = fit_distortion(table, BITS).to_dict()
    d.update(change)
    with pytest.raises(RateQuantError, match=match):
        DistortionFit.from_dict(d)


def test_summary_reports_betas_and_r2():
    table, _, _ = synthetic()
    text = fit_distortion(table, BITS).summary()
    assert "key 4.500" in text and "value 3.700" in text and "overall 1.0000" in text


def test_bitset_and_number_checks_live_in_validation():
    from ratequant.validation import check_bitset, finite_real

    assert check_bitset(range(1, 9)) == BITS and check_bitset([2, 4]) == (2, 4)
    for bad, match in (
        ([0, 1], "1 to 8"),
        ([3, 2], "increasing"),
        ([2, 2], "increasing"),
        (3, "sequence"),
        ([True, 2], "1 to 8"),
    ):
        with pytest.raises(RateQuantError, match=match):
            check_bitset(bad)
    with pytest.raises(RateQuantError, match="fit bitset needs at least 2"):
        check_bitset([3], name="fit bitset", min_len=2)
    assert finite_real(1) and finite_real(2.5) and finite_real(np.float32(1.0))
    assert not any(finite_real(v) for v in (True, float("nan"), float("inf"), 10**400, "1", None))


def test_fit_curves_feed_the_allocator_at_any_widths():
    from ratequant.allocation import Curves

    table, _, _ = synthetic(bits=(2, 4, 8), noise=0.05)
    fit = fit_distortion(table, (2, 4, 8))
    curves = Curves.from_fit(fit, (1, 3, 5), design="kivi", label="fisher")
    np.testing.assert_array_equal(curves.values, fit.curves((1, 3, 5)))
    assert curves.bitset == (1, 3, 5) and curves.fit is fit and curves.source == "fit"
    assert curves.provenance() == {"source": "fit", "design": "kivi", "label": "fisher", "min_bits": None}
    assert Curves.from_fit(fit).bitset == (2, 4, 8)
    bits = np.random.default_rng(0).integers(1, 9, size=fit.shape)
    assert curves.total(bits) == pytest.approx(float(fit.predict(bits).sum()), rel=1e-12)
    with pytest.raises(RateQuantError, match="needs a DistortionFit"):
        Curves.from_fit(table)
