"""The synthetic generator plants signal that only per-user adaptation can recover."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metarec.config import SyntheticConfig, apply_overrides, load_config
from metarec.data.prepare import prepare
from metarec.data.synthetic import SCALES, VARIANTS, apply_variant, generate
from metarec.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


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
    """With drift, a user's early taste predicts their late taste measurably worse, and the
    "drift" variant's 3.0 worse still (yet not to zero: adaptation still has taste to use)."""
    stable, drifting = _genre_taste_stability(0.0), _genre_taste_stability(1.5)
    strong = _genre_taste_stability(VARIANTS["drift"]["data.synthetic.drift"])
    assert stable > 0.3  # planted personal taste persists without drift
    assert drifting < stable - 0.05
    assert strong < drifting


# -- variants: small versions of each preset (600 users), prepared once per module ----------


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    name = request.param
    cfg = apply_overrides(apply_variant(load_config(None), name), **{"data.synthetic.n_users": 600})
    return name, cfg, prepare(cfg, tmp_path_factory.mktemp(name) / "data", progress=False)


def test_variant_prepares_on_its_scale_with_the_right_manifest(variant):
    _, cfg, ds = variant
    s, m = cfg.data.synthetic, ds.manifest
    lo, hi, step = SCALES[s.scale]
    assert (m["ratings"]["min"], m["ratings"]["max"]) == (lo, hi)  # both ends get used
    r = ds.ratings().column("rating").to_numpy()
    assert np.allclose((r - lo) / step, np.rint((r - lo) / step))  # on the grid
    assert m["features"]["has_user_features"] is s.user_features
    assert bool(m["features"]["user"]) is s.user_features
    assert m["source"]["generator"] == cfg.to_dict()["data"]["synthetic"]
    assert m["counts"]["users_kept"] == s.n_users  # the default 13-100 filter keeps everyone
    assert set(m["scenarios"]) == set(cfg.data.scenarios)


def test_variant_user_ratings_beat_a_global_item_model(variant):
    """Per-user structure survives every variant: the item means of training users plus the
    user's own (lightly shrunk) offset on their support beat the item means alone on the
    query ratings of held-out users."""
    _, _, ds = variant
    train = _rows(ds.tasks("user_cold", "train"))
    held_out = pd.concat([_rows(ds.tasks("user_cold", split)) for split in ("valid", "test")])
    items = np.concatenate(train["support_items"].tolist() + train["query_items"].tolist())
    ratings = np.concatenate(train["support_ratings"].tolist() + train["query_ratings"].tolist())
    n = ds.manifest["counts"]["items"]
    count = np.bincount(items, minlength=n)
    item_mean = (np.bincount(items, ratings, n) + 5 * ratings.mean()) / (count + 5)
    global_err, user_err = [], []
    columns = ["support_items", "support_ratings", "query_items", "query_ratings"]
    for si, sr, qi, qr in held_out[columns].itertuples(index=False):
        offset = (sr - item_mean[si]).sum() / (len(sr) + 3)
        global_err.append(((qr - item_mean[qi]) ** 2).mean())
        user_err.append(((qr - item_mean[qi] - offset) ** 2).mean())
    assert np.mean(user_err) < 0.9 * np.mean(global_err)  # MSE; 0.79-0.86 measured


def test_few_ratings_users_all_keep_a_support_set():
    """13-30 ratings and query 10: every user survives MeLU's 13-rating filter."""
    s = apply_variant(load_config(None), "few_ratings").data.synthetic
    counts = generate(s, seed=0).ratings.groupby("user").size()
    assert counts.between(13, 30).all() and len(counts) == s.n_users


def test_long_tail_concentrates_ratings_on_few_items():
    """Zipf(1) over 10,000 items: the top 1% draw a large share, most items next to none."""
    base = load_config(None, **{"data.synthetic.n_users": 200})
    shares = {}
    for name in ("default", "long_tail"):
        s = apply_overrides(base, **{"data.synthetic.n_items": 10_000, **VARIANTS[name]})
        r = generate(s.data.synthetic, seed=0).ratings
        counts = np.sort(np.bincount(r["item"], minlength=10_001)[1:])[::-1]
        shares[name] = counts[:100].sum() / len(r)
        if name == "long_tail":
            assert np.median(counts) <= 1
    assert shares["long_tail"] > 0.3 and shares["long_tail"] > 3 * shares["default"]


def test_hidden_age_still_shapes_ratings_without_a_user_table():
    """Dropping the user table only skips its (last) draws: the ratings, age x year effect
    included, are the default's exactly; only their explanation is no longer observable."""
    s = SyntheticConfig(n_users=100, n_items=100)
    with_table = generate(s, seed=3)
    without = generate(SyntheticConfig(n_users=100, n_items=100, user_features=False), seed=3)
    assert without.users is None and with_table.users is not None
    assert without.ratings.equals(with_table.ratings)


def test_scales_round_the_same_latent_scores():
    """Half stars refine whole stars (same rounding, finer grid); 1-10 is the same order."""
    cfgs = {k: SyntheticConfig(n_users=100, n_items=100, scale=k) for k in SCALES}
    r = {k: generate(c, seed=4).ratings["rating"].to_numpy() for k, c in cfgs.items()}
    assert np.abs(r["0.5-5"] - r["1-5"]).max() <= 0.5 + 1e-9
    assert np.corrcoef(r["1-5"], r["1-10"])[0, 1] > 0.9


@pytest.mark.parametrize(
    ("key", "value", "msg"),
    [
        ("data.synthetic.scale", "1-7", "data.synthetic.scale: got '1-7'; expected one of"),
        ("data.synthetic.popularity_zipf", 2.0, "data.synthetic.popularity_zipf: got 2.0"),
        ("data.synthetic.user_features", "no", "data.synthetic.user_features: got 'no'"),
        ("data.synthetic.drift", -1.0, "data.synthetic.drift: got -1.0"),
    ],
)
def test_variant_keys_are_checked_by_name(key, value, msg):
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        load_config(None, **{key: value})


def test_variants_are_settable_keys_and_unknown_names_fail():
    for overrides in VARIANTS.values():
        assert all(k.startswith("data.synthetic.") for k in overrides)
        assert "data.synthetic.n_users" not in overrides  # every variant keeps 2000 users
    cfg = load_config(None, overrides=["data.synthetic.scale=0.5-5"])
    assert cfg == apply_variant(load_config(None), "half_star")
    with pytest.raises(ConfigError, match="synthetic variant: got 'sparse'; expected one of"):
        apply_variant(load_config(None), "sparse")


def test_pareto_activity_has_a_long_tail_of_heavy_users():
    """``configs/ml25m.yaml``'s activity: most users rate a few dozen items, a few rate
    thousands, and the mean gives ~25M ratings over 160,000 users."""
    from metarec.data.synthetic import activity

    cfg = load_config(REPO / "configs" / "ml25m.yaml").data.synthetic
    counts = activity(np.random.default_rng(0), cfg, cfg.n_users)
    assert counts.min() == cfg.min_ratings_per_user and counts.max() == cfg.max_ratings_per_user
    assert np.median(counts) < 60 and (counts >= 5000).sum() > 100
    assert 22e6 < counts.sum() < 28e6
    uniform = activity(np.random.default_rng(0), load_config(None).data.synthetic, 1000)
    assert uniform.min() >= 15 and uniform.max() <= 80  # the default stays uniform
