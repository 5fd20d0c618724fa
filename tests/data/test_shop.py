"""The synthetic shop plants what only per-user adaptation recovers."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from metarec.config import load_config
from metarec.data.shop import EVENTS, generate_shop

REPO = Path(__file__).resolve().parents[2]


def _shop(seed=0, **synthetic):
    keys = {
        "data.synthetic.feedback": "implicit",
        "data.synthetic.n_users": 800,
        "data.synthetic.n_items": 4000,
        "data.synthetic.min_ratings_per_user": 20,
        "data.synthetic.max_ratings_per_user": 60,
    }
    keys |= {f"data.synthetic.{k}": v for k, v in synthetic.items()}
    cfg = load_config(None, **keys)
    return generate_shop(cfg.data.synthetic, cfg.data.event_weights, seed=seed)


def _recall_at_20(raw) -> dict[str, float]:
    """Each user's first 70% of items (by time) as history, the rest as their future; the
    future's recall@20 ranked by popularity, and by popularity plus the user's own history
    of categories and brands (unseen items only)."""
    r = raw.ratings.sort_values(["user", "timestamp"], kind="stable")
    u, i = r["user"].to_numpy() - 1, r["item"].to_numpy() - 1
    n_u, n_i = u.max() + 1, len(raw.items)
    first = np.searchsorted(u, np.arange(n_u))
    count = np.bincount(u, minlength=n_u)
    hist = np.arange(len(u)) - first[u] < 0.7 * count[u]
    tags = raw.items["genres"]
    cat = np.array([int(t[0].split(":")[1]) for t in tags])
    brand = np.array([int(t[1].split(":")[1]) for t in tags])
    seen, future = np.zeros((n_u, n_i)), np.zeros((n_u, n_i))
    seen[u[hist], i[hist]] = 1
    future[u[~hist], i[~hist]] = 1
    by_cat, by_brand = np.zeros((n_u, cat.max() + 1)), np.zeros((n_u, brand.max() + 1))
    np.add.at(by_cat, (u[hist], cat[i[hist]]), 1)
    np.add.at(by_brand, (u[hist], brand[i[hist]]), 1)
    popular = np.broadcast_to(np.log1p(np.bincount(i[hist], minlength=n_i)), (n_u, n_i))
    personal = popular + np.log1p(by_cat[:, cat]) + np.log1p(by_brand[:, brand])
    out = {}
    for name, score in (("popularity", popular), ("own_history", personal)):
        top = np.argsort(-np.where(seen > 0, -np.inf, score), axis=1)[:, :20]
        hits = np.take_along_axis(future, top, axis=1).sum(1)
        out[name] = float((hits / np.maximum(future.sum(1), 1)).mean())
    return out


def test_a_users_own_history_predicts_their_future_better_than_popularity():
    recall = _recall_at_20(_shop()[0])
    assert recall["own_history"] > 1.5 * recall["popularity"], recall


def test_drift_makes_early_history_a_worse_guide_to_later_items():
    steady = _recall_at_20(_shop(drift=0.0)[0])["own_history"]
    drifting = _recall_at_20(_shop(drift=3.0)[0])["own_history"]
    assert drifting < 0.85 * steady, (steady, drifting)


def test_the_funnel_the_long_tail_and_arrivals():
    raw, events = _shop()
    assert set(events["event"]) == set(EVENTS)
    pairs = {e: set(zip(g["user"], g["item"], strict=True)) for e, g in events.groupby("event")}
    assert pairs["purchase"] <= pairs["cart"] <= pairs["view"]
    assert len(pairs["view"]) > 3 * len(pairs["cart"]) > 3 * len(pairs["purchase"]) > 0
    # each pair's strength is the sum of its events' weights (view 1, cart 3, purchase 5)
    assert set(raw.ratings["rating"]) == {1.0, 4.0, 9.0}
    views = np.bincount(events.loc[events["event"] == "view", "item"], minlength=4001)
    top = np.sort(views)[::-1]
    assert top[:40].sum() > 0.10 * top.sum()  # 1% of the catalogue: over 10% of views
    year = raw.items.set_index("item")["year"]
    seen_year = events["timestamp"].astype("datetime64[s]").dt.year.to_numpy()
    assert (seen_year >= year.loc[events["item"]].to_numpy()).all()  # none before arrival
    assert (year > year.min()).mean() > 0.2  # new items keep arriving


def test_the_shop_preset_has_a_20k_catalogue_and_prepares_as_implicit(tmp_path):
    from metarec.data.prepare import prepare

    preset = yaml.safe_load((REPO / "configs" / "shop.yaml").read_text())
    assert preset["data"]["synthetic"]["n_items"] >= 20_000
    cfg = load_config(
        REPO / "configs" / "shop.yaml",
        overrides=["data.synthetic.n_users=300", "data.scenarios=user_cold,temporal,item_cold"],
    )
    ds = prepare(cfg, tmp_path / "shop", progress=False)
    assert ds.feedback == "implicit" and ds.manifest["counts"]["items"] == 20_000
    assert {"category", "brand", "price"} <= {
        g.split(":")[0] for g in ds.manifest["vocab"]["genre"][1:]
    }
    assert set(ds.scenarios) == {"user_cold", "temporal", "item_cold"}


def test_the_shop_needs_a_weight_for_each_of_its_events():
    from metarec.errors import ConfigError

    cfg = load_config(None, overrides=["data.event_weights={view: 1}"])
    with pytest.raises(ConfigError, match=r"data.event_weights: .* expected weights for"):
        generate_shop(cfg.data.synthetic, cfg.data.event_weights, seed=0)


@pytest.mark.integration  # a whole CLI evaluation
def test_the_shops_event_log_written_to_a_file_takes_the_generic_path(tmp_path):
    """Real files take the same path: the shop's raw events written as a plain
    ``user,item,event,timestamp`` CSV, prepared with ``--source events``, give the same
    interactions as the synthetic source, and ``metarec evaluate`` runs the meta-learner
    and the baselines on them."""
    import json

    from metarec.cli import main
    from metarec.data.prepare import prepare

    raw, events = _shop(n_users=150, n_items=600)
    path = tmp_path / "events.csv"
    events[["user", "item", "event", "timestamp"]].assign(
        user=lambda f: "u" + f["user"].astype(str), item=lambda f: "i" + f["item"].astype(str)
    ).to_csv(path, index=False)
    cfg = load_config(None, **{"data.source": "events", "data.input": str(path)})
    ds = prepare(cfg, tmp_path / "prepared", progress=False)
    mine = ds.manifest["counts"]
    assert ds.feedback == "implicit"
    assert mine["ratings_raw"] == len(raw.ratings)  # one interaction per (user, item) pair
    assert ds.manifest["ratings"]["max"] == float(raw.ratings["rating"].max())
    out = tmp_path / "eval"
    flags = ["--baselines", "popularity,item_knn", "--epochs", "1", "--out", str(out)]
    assert main(["evaluate", "--data", str(tmp_path / "prepared"), *flags]) == 0
    rows = json.loads((out / "results.json").read_text())["user_cold"]
    assert {"maml", "popularity", "item_knn"} <= set(rows)
