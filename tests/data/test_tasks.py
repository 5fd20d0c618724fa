"""Task building: the protocol's guarantees, checked against the raw ratings.

The leakage checks run on two sources: the synthetic dataset (always there, so they run on
any machine) and ML-100k (skipped when it is missing, failed under CI=true).
"""

from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metarec.config import SCENARIOS
from metarec.data import synthetic
from metarec.data.prepared import PreparedDataset
from metarec.data.sources import load_ml100k
from metarec.data.tasks import SPLITS, TaskProtocol, build_scenarios, tasks_table

COLD_USERS = ("user_cold", "temporal", "user_item_cold")


class Source(NamedTuple):
    prepared: PreparedDataset
    ratings: pd.DataFrame  # the raw ratings it was prepared from: user, item, rating, timestamp


@pytest.fixture(scope="module", params=["synthetic", "ml100k"])
def source(request) -> Source:
    if request.param == "synthetic":
        cfg = request.getfixturevalue("synthetic_cfg")
        raw = synthetic.generate(cfg.data.synthetic, seed=cfg.seed)
    else:
        raw = load_ml100k(request.getfixturevalue("ml100k_dir"))
    return Source(request.getfixturevalue(f"{request.param}_prepared"), raw.ratings)


def _pairs(table, which):
    t = table.to_pandas()
    return {(u, i) for u, items in zip(t["user"], t[f"{which}_items"], strict=True) for i in items}


def _items(table, which):
    return {i for items in table.column(f"{which}_items").to_pylist() for i in items}


def _users(table):
    return set(table.column("user").to_pylist())


def _raw(src: Source, column: str):
    """(user index, item index) of a task row -> ``column`` of that raw rating."""
    users = src.prepared.users().to_pandas()["raw_id"].astype(int).to_numpy()
    items = src.prepared.items().to_pandas()["raw_id"].astype(int).to_numpy()
    r = src.ratings
    by_pair = dict(zip(zip(r["user"], r["item"], strict=True), r[column], strict=True))
    return lambda u, i: by_pair[(users[u], items[i])]


def test_every_scenario_and_split_is_written(source):
    m = source.prepared.manifest
    assert set(m["scenarios"]) == set(SCENARIOS)
    for scenario in SCENARIOS:
        for split in SPLITS:
            t = source.prepared.tasks(scenario, split)
            assert t.num_rows == m["scenarios"][scenario][split]["tasks"] > 0


def test_counts_follow_the_filter_and_split(ml100k_prepared):
    m = ml100k_prepared.manifest
    assert m["counts"]["ratings_raw"] == 100_000
    assert m["counts"]["users_kept"] == 582  # ML-100k users with 13-100 ratings
    assert m["dropped"]["users_too_many"] == 943 - 582
    cold = m["scenarios"]["user_cold"]
    assert [cold[s]["tasks"] for s in SPLITS] == [466, 58, 58]  # round(0.8 * 582) = 466
    assert (
        sum(cold[s]["support_ratings"] + cold[s]["query_ratings"] for s in SPLITS)
        == m["counts"]["ratings_kept"]
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_query_size_and_support_floor(source, scenario):
    q = source.prepared.manifest["protocol"]["query_size"]
    for split in SPLITS:
        t = source.prepared.tasks(scenario, split)
        assert {len(x) for x in t.column("query_items").to_pylist()} == {q}
        assert min(len(x) for x in t.column("support_items").to_pylist()) >= 3


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_support_and_query_are_disjoint_and_match_the_source(source, scenario):
    rating = _raw(source, "rating")
    for split in SPLITS:
        t = source.prepared.tasks(scenario, split).to_pylist()
        for row in t[:40]:
            assert not set(row["support_items"]) & set(row["query_items"])
            for which in ("support", "query"):
                for i, r in zip(row[f"{which}_items"], row[f"{which}_ratings"], strict=True):
                    assert rating(row["user"], i) == r


@pytest.mark.parametrize("scenario", COLD_USERS)
def test_cold_scenarios_never_share_users_across_splits(source, scenario):
    train, valid, test = (_users(source.prepared.tasks(scenario, s)) for s in SPLITS)
    if scenario != "user_item_cold":  # its train split is the warm one: existing users
        assert not train & valid and not train & test
    assert not valid & test
    if scenario == "user_item_cold":
        cold_train = _users(source.prepared.tasks("user_cold", "train"))
        assert not cold_train & (valid | test)


@pytest.mark.parametrize("scenario", ["warm", "item_cold"])
def test_warm_users_are_known_but_their_queries_never_trained(source, scenario):
    train = source.prepared.tasks(scenario, "train")
    seen = _pairs(train, "support") | _pairs(train, "query")
    for split in ("valid", "test"):
        t = source.prepared.tasks(scenario, split)
        assert _users(t) <= _users(source.prepared.tasks("user_cold", "train"))
        assert not _pairs(t, "query") & seen


def test_new_items_never_appear_in_training(source):
    cut = source.prepared.manifest["protocol"]["item_cut_year"]
    year = source.prepared.items().column("year").to_numpy()
    train = source.prepared.tasks("item_cold", "train")
    trained = _items(train, "support") | _items(train, "query")
    assert all(year[i] <= cut for i in trained)
    for scenario in ("item_cold", "user_item_cold"):
        for split in ("valid", "test"):
            t = source.prepared.tasks(scenario, split)
            query = _items(t, "query")
            assert query and all(year[i] > cut for i in query)
            assert not query & trained
            assert all(year[i] <= cut for i in _items(t, "support"))


def test_temporal_queries_are_each_users_latest(source):
    ts = _raw(source, "timestamp")
    for split in SPLITS:
        for row in source.prepared.tasks("temporal", split).to_pylist():
            s = [ts(row["user"], i) for i in row["support_items"]]
            q = [ts(row["user"], i) for i in row["query_items"]]
            assert max(s) <= min(q)
            assert s == sorted(s) and q == sorted(q)  # chronological within each set


def test_same_seed_same_tasks_other_seed_other_tasks(ml100k_dir, ml100k_prepared, tmp_path):
    from metarec.config import load_config
    from metarec.data.prepare import prepare

    for seed, same in ((0, True), (1, False)):
        cfg = load_config(
            None, seed=seed, **{"data.source": "ml-100k", "data.input": str(ml100k_dir)}
        )
        again = prepare(cfg, tmp_path / f"s{seed}", progress=False)
        assert (again.manifest["files"] == ml100k_prepared.manifest["files"]) is same
        tasks = again.tasks("user_cold", "test")
        assert tasks.equals(ml100k_prepared.tasks("user_cold", "test")) is same


# --- property tests on random small data ---------------------------------------------


@st.composite
def ratings_frames(draw):
    n_users = draw(st.integers(1, 30))
    n_items = draw(st.integers(25, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 40, size=n_users)
    rows = [
        (u, i)
        for u in range(n_users)
        for i in rng.choice(n_items, size=min(counts[u], n_items), replace=False)
    ]
    df = pd.DataFrame(rows, columns=["user", "item"]).astype(np.int32)
    df["rating"] = rng.integers(1, 6, size=len(df)).astype(np.float32)
    df["timestamp"] = rng.integers(0, 10_000, size=len(df))
    year = rng.integers(1980, 2000, size=n_items).astype(float)
    return df, year, draw(st.integers(0, 5))


@settings(max_examples=40, deadline=None)
@given(ratings_frames(), st.integers(1, 5), st.integers(1, 4))
def test_builder_partitions_ratings_without_loss_or_overlap(data, q, min_support):
    df, year, seed = data
    p = TaskProtocol(
        query_size=q, min_ratings=q + min_support, max_ratings=10_000, cut_year=1990, seed=seed
    )
    if len(df) == 0:
        return
    out = build_scenarios(df, year, p, SCENARIOS)
    counts = df.groupby("user").size()
    eligible = set(counts[counts >= q + min_support].index)
    for scenario, splits in out.items():
        for t in splits.values():
            for row in t.to_pylist():
                assert len(row["query_items"]) == q
                assert len(row["support_items"]) >= min_support
                assert not set(row["support_items"]) & set(row["query_items"])
        if scenario in ("user_cold", "temporal"):
            # every eligible user's every rating lands in exactly one task of one split
            got = [
                pair for t in splits.values() for pair in _pairs(t, "support") | _pairs(t, "query")
            ]
            assert len(got) == len(set(got))
            assert set(got) == {
                (u, i) for u, i in zip(df["user"], df["item"], strict=True) if u in eligible
            }


def test_tasks_table_orders_support_before_query_by_key():
    df = pd.DataFrame(
        {"user": [7, 7, 7, 3, 3], "item": [1, 2, 3, 4, 5], "rating": [1.0, 2.0, 3.0, 4.0, 5.0]}
    )
    t = tasks_table(
        df,
        is_query=np.array([False, True, False, True, False]),
        order_key=np.array([3.0, 0.0, 1.0, 0.0, 0.0]),
    ).to_pylist()
    assert t == [
        {
            "user": 3,
            "support_items": [5],
            "support_ratings": [5.0],
            "query_items": [4],
            "query_ratings": [4.0],
        },
        {
            "user": 7,
            "support_items": [3, 1],
            "support_ratings": [3.0, 1.0],
            "query_items": [2],
            "query_ratings": [2.0],
        },
    ]
