"""The synthetic generator plants signal that only per-user adaptation can recover."""

import numpy as np

from metarec.config import SyntheticConfig
from metarec.data.synthetic import generate


def _rows(table):
    return table.to_pandas()


def test_shapes_ranges_and_reproducibility():
    cfg = SyntheticConfig(
        n_users=300, n_items=200, min_ratings_per_user=15, max_ratings_per_user=40
    )
    a, b = generate(cfg, seed=1), generate(cfg, seed=1)
    assert a.ratings.equals(b.ratings)
    assert not a.ratings.equals(generate(cfg, seed=2).ratings)
    r = a.ratings
    counts = r.groupby("user").size()
    assert counts.min() >= 15 * 0.9 and counts.max() <= 40
    assert not r.duplicated(["user", "item"]).any()
    assert set(np.unique(r["rating"])) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 2.8 < r["rating"].mean() < 4.2 and r["rating"].std() > 0.8
    assert len(a.items) == 200 and a.items["genres"].map(len).between(1, 3).all()


def test_user_mean_from_support_beats_global_mean(synthetic_prepared):
    """Adapting even one number per user (their mean) must cut query error: planted bias."""
    train = _rows(synthetic_prepared.tasks("user_cold", "train"))
    test = _rows(synthetic_prepared.tasks("user_cold", "test"))
    mu = np.concatenate(train["support_ratings"].tolist() + train["query_ratings"].tolist()).mean()
    global_err, user_err = [], []
    for s, q in zip(test["support_ratings"], test["query_ratings"], strict=True):
        global_err.append(np.abs(q - mu).mean())
        user_err.append(np.abs(q - s.mean()).mean())
    assert np.mean(user_err) < 0.93 * np.mean(global_err)


def _genre_taste_stability(drift: float) -> float:
    """Correlation of each user's per-genre taste between the first and second half of
    their timeline (taste = mean rating residual after removing item means)."""
    cfg = SyntheticConfig(
        n_users=500,
        n_items=150,
        min_ratings_per_user=70,
        max_ratings_per_user=90,
        drift=drift,
        noise=0.2,
    )
    raw = generate(cfg, seed=0)
    r = raw.ratings.sort_values(["user", "timestamp"]).reset_index(drop=True)
    r["late"] = r.groupby("user").cumcount() >= r.groupby("user")["item"].transform("size") / 2
    r["resid"] = r["rating"] - r.groupby("item")["rating"].transform("mean")
    genres = raw.items.set_index("item")["genres"]
    r = r.assign(genre=r["item"].map(genres)).explode("genre")
    taste = r.groupby(["user", "genre", "late"])["resid"].mean().unstack("late").dropna()
    return float(np.corrcoef(taste[False], taste[True])[0, 1])


def test_taste_drifts_over_each_users_timeline():
    """With drift, a user's early taste predicts their late taste measurably worse."""
    stable, drifting = _genre_taste_stability(0.0), _genre_taste_stability(1.5)
    assert stable > 0.3  # planted personal taste persists without drift
    assert drifting < stable - 0.05
