"""Paired bootstrap CIs: known answers, pooled RMSE, strata, and the win/tie rule."""

import math

import numpy as np
import pytest

from metarec.stats import paired_differences, verdict


def _users(mae, sse=None, count=None):
    mae = np.asarray(mae, dtype=float)
    sse = mae**2 if sse is None else np.asarray(sse, dtype=float)
    count = np.ones_like(mae) if count is None else np.asarray(count, dtype=float)
    return {"mae": mae, "sse": sse, "count": count}


def test_a_constant_shift_has_a_zero_width_interval():
    rng = np.random.default_rng(0)
    base = [_users(rng.uniform(0.5, 1.0, 40)), _users(rng.uniform(0.5, 1.0, 60))]
    shifted = [_users(b["mae"] - 0.1) for b in base]
    out = paired_differences(shifted, base, ["mae"], resamples=1000)
    assert out["mae"]["diff"] == pytest.approx(-0.1)
    assert out["mae"]["ci95"] == pytest.approx([-0.1, -0.1])


def test_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    d = rng.normal(0.05, 0.2, 2000)
    out = paired_differences([_users(d)], [_users(np.zeros_like(d))], ["mae"], resamples=4000)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    lo, hi = out["mae"]["ci95"]
    assert out["mae"]["diff"] == pytest.approx(d.mean())
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < d.mean() < hi


def test_rmse_is_pooled_over_query_ratings():
    # a: user errors [1, 1] and [3]; b: no error. Pooled sqrt(11/3), not mean of per-user RMSEs.
    a = [_users([1.0, 3.0], sse=[2.0, 9.0], count=[2, 1])]
    b = [_users([0.0, 0.0], sse=[0.0, 0.0], count=[2, 1])]
    out = paired_differences(a, b, ["rmse"], resamples=1000)
    assert out["rmse"]["diff"] == pytest.approx(math.sqrt(11 / 3))
    assert out["rmse"]["diff"] != pytest.approx(2.0)


def test_undefined_users_are_skipped_and_resampling_is_seeded():
    a = [_users([0.5, math.nan, 0.7, 0.2])]
    b = [_users([0.6, 0.9, 0.6, 0.4])]
    out = paired_differences(a, b, ["mae"], resamples=1000)
    assert out["mae"]["diff"] == pytest.approx(((-0.1) + 0.1 + (-0.2)) / 3)
    rng = np.random.default_rng(2)
    a, b = [_users(rng.uniform(0, 1, 80))], [_users(rng.uniform(0, 1, 80))]
    out = paired_differences(a, b, ["mae"], resamples=1000)
    assert out == paired_differences(a, b, ["mae"], resamples=1000)
    assert out != paired_differences(a, b, ["mae"], resamples=1000, seed=1)


def test_mismatched_users_are_refused():
    with pytest.raises(ValueError, match="same users"):
        paired_differences([_users([1.0, 2.0])], [_users([1.0])], ["mae"])


@pytest.mark.parametrize(
    ("metric", "diff", "ci", "expected"),
    [
        ("mae", -0.02, (-0.03, -0.01), "win"),
        ("mae", 0.02, (0.01, 0.03), "loss"),
        ("mae", -0.01, (-0.03, 0.01), "tie"),
        ("ndcg@3", 0.02, (0.01, 0.03), "win"),
        ("ndcg@3", -0.02, (-0.03, -0.01), "loss"),
        ("ndcg@3", 0.0, (math.nan, math.nan), "tie"),
    ],
)
def test_verdict_claims_a_win_only_when_the_ci_excludes_zero(metric, diff, ci, expected):
    assert verdict(metric, diff, ci) == expected
