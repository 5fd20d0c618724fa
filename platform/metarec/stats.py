"""Paired comparisons of two methods on the same test users, with bootstrap intervals.

Why paired: every method is scored on the same users, and users differ far more from each
other than methods do; the per-user difference cancels that spread, so a real edge shows
with a few hundred users where two unpaired means would overlap.

Why a bootstrap over users: the unit of sampling in a user split is the user. Users are
resampled *within* each split (splits are strata), the statistic is recomputed exactly as
reported (a mean over users, or RMSE pooled over every query rating), and the percentile
interval of the resampled differences is the 95% CI. Seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metarec.metrics import POOLED  # metric -> (numerator, denominator) per user

__all__ = ["LOWER_IS_BETTER", "paired_differences", "verdict"]

LOWER_IS_BETTER = ("mae", "rmse")


PerUser = dict[str, np.ndarray]  # metric -> (users,), NaN where undefined for that user


def _statistic(a: PerUser, b: PerUser, metric: str, rows: np.ndarray) -> np.ndarray:
    """Method ``a`` minus ``b`` on users ``rows`` (R, n): the (R,) resampled differences'
    numerator and denominator stacked as (2, R), so splits add before the ratio."""
    if metric in POOLED:
        num, den = POOLED[metric]
        return np.stack([a[num][rows].sum(-1), b[num][rows].sum(-1), a[den][rows].sum(-1)])
    d = a[metric] - b[metric]
    ok = ~np.isnan(d)
    return np.stack([np.where(ok, d, 0.0)[rows].sum(-1), ok[rows].sum(-1).astype(float)])


def _finish(metric: str, parts: np.ndarray) -> np.ndarray:
    if metric in POOLED:
        sse_a, sse_b, n = parts
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(sse_a / n) - np.sqrt(sse_b / n)
    total, n = parts
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / n


def paired_differences(
    a: Sequence[PerUser],
    b: Sequence[PerUser],
    metrics: Sequence[str],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 250,
) -> dict[str, dict[str, float | list[float]]]:
    """``{metric: {"diff": a - b, "ci95": [lo, hi]}}`` over test users pooled across splits.

    Args:
        a, b: per split, each method's per-user metrics on the same users in the same
            order; pooled metrics (``rmse``) need the per-user ``sse`` and ``count``.
        resamples: bootstrap resamples (users drawn with replacement within each split).
    """

    def users(x: PerUser) -> int:
        return len(next(iter(x.values())))

    if len(a) != len(b) or any(users(x) != users(y) for x, y in zip(a, b, strict=True)):
        raise ValueError("a, b: expected the same splits with the same users")
    sizes = [users(x) for x in a]
    full = {
        m: _finish(
            m,
            sum(
                _statistic(x, y, m, np.arange(n)[None]) for x, y, n in zip(a, b, sizes, strict=True)
            ),
        )[0]
        for m in metrics
    }
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for lo in range(0, resamples, chunk):
        r = min(chunk, resamples - lo)
        rows = [rng.integers(0, n, size=(r, n)) for n in sizes]  # same draws for every metric
        for m in metrics:
            parts = sum(_statistic(x, y, m, i) for x, y, i in zip(a, b, rows, strict=True))
            draws[m].append(_finish(m, parts))
    tail = (1 - level) / 2 * 100
    out: dict[str, dict[str, float | list[float]]] = {}
    for m in metrics:
        d = np.concatenate(draws[m])
        d = d[~np.isnan(d)]
        ci = np.percentile(d, [tail, 100 - tail]).tolist() if len(d) else [np.nan, np.nan]
        out[m] = {"diff": float(full[m]), "ci95": [float(ci[0]), float(ci[1])]}
    return out


def verdict(metric: str, diff: float, ci: Sequence[float]) -> str:
    """``"win"`` / ``"loss"`` for the first method only when the CI excludes 0, else ``"tie"``."""
    lo, hi = ci
    if not (lo > 0 or hi < 0):  # also NaN
        return "tie"
    better = diff < 0 if metric in LOWER_IS_BETTER else diff > 0
    return "win" if better else "loss"
