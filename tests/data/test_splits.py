"""Re-split by seed and external split files: the protocol holds, bad files are refused."""

from __future__ import annotations

import json

import pytest

from metarec.config import apply_overrides
from metarec.data.prepare import prepare
from metarec.data.splits import external_split, resplit
from metarec.errors import DataError


def _users(ds, scenario, split):
    return set(ds.tasks(scenario, split).column("user").to_pylist())


def test_resplit_of_prepared_seed_is_the_dataset(synthetic_prepared):
    assert resplit(synthetic_prepared, synthetic_prepared.manifest["protocol"]["seed"]) is (
        synthetic_prepared
    )


def test_resplit_equals_prepare_with_that_split_seed(synthetic_cfg, synthetic_prepared, tmp_path):
    view = resplit(synthetic_prepared, 3)
    direct = prepare(apply_overrides(synthetic_cfg, **{"data.split_seed": 3}), tmp_path / "d")
    assert view.manifest["dataset_hash"] != synthetic_prepared.manifest["dataset_hash"]
    for scenario in synthetic_prepared.scenarios:
        for split in direct.manifest["scenarios"][scenario]:
            assert view.tasks(scenario, split).equals(direct.tasks(scenario, split)), (
                scenario,
                split,
            )


def test_resplit_keeps_the_protocol(synthetic_prepared):
    a, b = synthetic_prepared, resplit(synthetic_prepared, 1)
    test_a, test_b = _users(a, "user_cold", "test"), _users(b, "user_cold", "test")
    assert test_a != test_b  # other users
    for ds in (a, b):
        splits = [_users(ds, "user_cold", s) for s in ("train", "valid", "test")]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        t = ds.tasks("user_cold", "test").to_pandas()
        ratings = ds.ratings().to_pandas()
        own = set(zip(ratings.user, ratings.item, strict=True))
        for row in t.itertuples():
            assert len(row.query_items) == ds.manifest["protocol"]["query_size"]
            assert not set(row.query_items) & set(row.support_items)
            assert all((row.user, i) in own for i in row.query_items)


def _raw(ds, table, column):
    t = getattr(ds, table)()
    return dict(zip(t.column(column).to_pylist(), t.column("raw_id").to_pylist(), strict=True))


def _spec_from(ds):
    """The prepared split itself, written as a split file in raw ids."""
    users, items = _raw(ds, "users", "user"), _raw(ds, "items", "item")
    spec = {
        s: [users[u] for u in sorted(_users(ds, "user_cold", s))]
        for s in ("train", "valid", "test")
    }
    spec["query"] = {}
    for s in ("valid", "test"):
        for row in ds.tasks("user_cold", s).to_pylist():
            spec["query"][users[row["user"]]] = [items[i] for i in row["query_items"]]
    return spec


def test_external_split_round_trip(synthetic_prepared, tmp_path):
    ds = synthetic_prepared
    path = tmp_path / "split.json"
    path.write_text(json.dumps(_spec_from(ds)))
    view = external_split(ds, path)
    assert view.scenarios == ["user_cold"]
    for s in ("valid", "test"):
        got = view.tasks("user_cold", s).to_pandas().set_index("user")
        want = ds.tasks("user_cold", s).to_pandas().set_index("user")
        assert list(got.index) == list(want.index)
        for u in want.index:
            assert sorted(got.loc[u, "query_items"]) == sorted(want.loc[u, "query_items"])
            assert sorted(got.loc[u, "support_items"]) == sorted(want.loc[u, "support_items"])
    assert _users(view, "user_cold", "train") == _users(ds, "user_cold", "train")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["test"].append("no-such-user"), "test user 'no-such-user' is not in the data"),
        (lambda s: s["valid"].append(s["train"][0]), "is in both train and valid"),
        (lambda s: s["query"].__setitem__(s["test"][0], ["no-such-item"]), "'no-such-item'"),
        (lambda s: s["query"].pop(s["test"][0]), "has no query items"),
        (lambda s: s["query"].__setitem__(s["train"][0], []), "not a valid or test user"),
        (lambda s: s.pop("query"), "'query' is missing"),
    ],
)
def test_external_split_rejects_mismatch(synthetic_prepared, tmp_path, edit, message):
    spec = _spec_from(synthetic_prepared)
    edit(spec)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=message) as e:
        external_split(synthetic_prepared, path)
    assert str(path) in str(e.value)


def test_external_split_rejects_an_item_the_user_never_rated(synthetic_prepared, tmp_path):
    ds = synthetic_prepared
    spec = _spec_from(ds)
    user = spec["test"][0]
    ratings = ds.ratings().to_pandas()
    users, items = _raw(ds, "users", "user"), _raw(ds, "items", "item")
    internal = {v: k for k, v in users.items()}[user]
    rated = set(ratings.item[ratings.user == internal])
    unrated = next(i for i in range(len(items)) if i not in rated)
    spec["query"][user] = [items[unrated]]
    path = tmp_path / "split.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=f"never rated query item '{items[unrated]}'"):
        external_split(ds, path)
