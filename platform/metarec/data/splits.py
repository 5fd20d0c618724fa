"""Other user splits of a prepared dataset: re-split by seed, or a split given from outside.

Why: one split of ~90 test users cannot tell a 0.01 MAE edge from noise, and the published
protocols (MeLU, RecBole-MetaRec) re-split users per seed. ``prepare`` keeps every encoded
rating (``ratings.parquet``), so evaluation rebuilds another split in memory with the same
protocol and the same code as ``prepare`` (``build_scenarios``): split seed N here is, task
for task, what ``prepare --split-seed N`` writes. A split file from outside (a paper's exact
users and query items) becomes the ``user_cold`` scenario the same way.

Both return a ``PreparedDataset`` whose tasks live in memory and whose ``dataset_hash``
names the split, so a model trained on one split is never scored on another's test users.

Split file format (JSON; ids are the raw ids of the source files, strings or integers)::

    {"train": [user, ...], "valid": [user, ...], "test": [user, ...],
     "query": {"<valid or test user>": [item, ...], ...}}

Valid and test users are adapted on every rating of theirs not in their query. Train users
are meta-training tasks whose query is redrawn each epoch (as in every split).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from metarec.data.prepared import PreparedDataset
from metarec.data.tasks import (
    SPLITS,
    TaskProtocol,
    build_scenarios,
    filter_users,
    group_rank,
    random_keys,
    tasks_table,
)
from metarec.errors import DataError

__all__ = ["external_split", "resplit"]


def _item_year(ds: PreparedDataset) -> np.ndarray:
    year = ds.items().column("year").to_numpy().astype(float)
    return np.where(year > 0, year, np.nan)  # prepare stores an unknown year as 0


def _protocol(ds: PreparedDataset, seed: int) -> TaskProtocol:
    p = ds.manifest["protocol"]
    return TaskProtocol(
        query_size=p["query_size"],
        min_ratings=p["min_ratings"],
        max_ratings=p["max_ratings"],
        split=tuple(p["split"]),
        cut_year=p["item_cut_year"],
        seed=seed,
    )


def _view(
    ds: PreparedDataset, tasks: dict[str, dict[str, pa.Table]], tag: str, protocol: dict
) -> PreparedDataset:
    manifest = {
        **ds.manifest,
        "protocol": {**ds.manifest["protocol"], **protocol},
        "dataset_hash": f"{ds.manifest['dataset_hash']}-{tag}",
        "split_of": ds.manifest["dataset_hash"],
        "scenarios": {
            name: {split: {"tasks": t.num_rows} for split, t in splits.items()}
            for name, splits in tasks.items()
        },
    }
    return dataclasses.replace(ds, manifest=manifest, split=tasks)


def resplit(ds: PreparedDataset, seed: int) -> PreparedDataset:
    """``ds`` with users split (and queries drawn) under split seed ``seed``.

    The seed ``prepare`` used gives ``ds`` itself (same files, same hash), so a model
    trained on it is still recognised as fitting that split.
    """
    if seed == ds.manifest["protocol"]["seed"]:
        return ds
    protocol = _protocol(ds, seed)
    ratings, _ = filter_users(
        ds.ratings().to_pandas(),
        min_ratings=protocol.min_ratings,
        max_ratings=protocol.max_ratings,
    )
    tasks = build_scenarios(ratings, _item_year(ds), protocol, tuple(ds.scenarios))
    return _view(ds, tasks, f"split{seed}", {"seed": seed})


def external_split(ds: PreparedDataset, path: str | Path) -> PreparedDataset:
    """``ds``'s ``user_cold`` scenario with the users and queries of a split file.

    Raises ``DataError`` naming the file and the first id that does not match the data.
    """
    path = Path(path)
    spec = _read_spec(path)
    user_of = _index(ds.users(), "user")
    item_of = _index(ds.items(), "item")
    ratings = ds.ratings().to_pandas()
    part = np.full(len(user_of), -1, dtype=np.int8)
    for i, split in enumerate(SPLITS):
        for raw in spec[split]:
            u = user_of.get(str(raw))
            if u is None:
                raise DataError(f"{path}: {split} user {raw!r} is not in the data")
            if part[u] >= 0:
                raise DataError(
                    f"{path}: user {raw!r} is in both {SPLITS[part[u]]} and {split}; "
                    "expected disjoint user lists"
                )
            part[u] = i
    raw_user = ds.users().column("raw_id").to_pylist()  # internal user id -> raw id
    is_query = _query_flags(spec["query"], ratings, part, user_of, item_of, raw_user, path)
    users = ratings["user"].to_numpy()
    r = ratings.assign(part=part[users])
    q = ds.manifest["protocol"]["query_size"]
    train = r[r.part == 0]
    tasks = {"train": _train_tasks(train, q, np.random.default_rng(0), path, raw_user)}
    for i, split in enumerate(SPLITS[1:], start=1):
        rows = (r.part == i).to_numpy()
        key = np.arange(int(rows.sum()), dtype=np.int64)  # support and query in file order
        tasks[split] = tasks_table(r[rows], is_query=is_query[rows], order_key=key)
    return _view(ds, {"user_cold": tasks}, f"file-{path.name}", {"split_file": str(path)})


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"--splits {path}: no such file") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(spec, dict):
        raise DataError(f"{path}: expected a JSON object with train, valid, test and query")
    for key, kind in (("train", list), ("valid", list), ("test", list), ("query", dict)):
        if not isinstance(spec.get(key), kind):
            raise DataError(
                f"{path}: {key!r} is missing or not a {kind.__name__}; expected "
                '{"train": [...], "valid": [...], "test": [...], "query": {user: [items]}}'
            )
    return spec


def _index(table: pa.Table, column: str) -> dict[str, int]:
    """raw id -> internal id."""
    return dict(
        zip(table.column("raw_id").to_pylist(), table.column(column).to_pylist(), strict=True)
    )


def _query_flags(
    query: dict[str, Any],
    ratings: pd.DataFrame,
    part: np.ndarray,
    user_of: dict[str, int],
    item_of: dict[str, int],
    raw_ids: list[str],
    path: Path,
) -> np.ndarray:
    """(ratings,) bool: the rating is in its user's query. Every check names the first bad id."""
    users = ratings["user"].to_numpy(np.int64)
    n_items = len(item_of)
    keys = users * n_items + ratings["item"].to_numpy(np.int64)
    order = np.argsort(keys)
    wanted = []
    for raw_user, items in query.items():
        u = user_of.get(str(raw_user))
        if u is None or part[u] < 1:
            raise DataError(f"{path}: query for user {raw_user!r}, who is not a valid or test user")
        for raw_item in items:
            i = item_of.get(str(raw_item))
            if i is None:
                raise DataError(f"{path}: query item {raw_item!r} (user {raw_user!r}) is unknown")
            wanted.append((u * n_items + i, raw_user, raw_item))
    flags = np.zeros(len(ratings), dtype=bool)
    if wanted:
        want = np.array([k for k, _, _ in wanted], dtype=np.int64)
        pos = np.searchsorted(keys, want, sorter=order).clip(max=len(keys) - 1)
        found = keys[order[pos]] == want
        if not found.all():
            _, raw_user, raw_item = wanted[int(np.argmin(found))]
            raise DataError(f"{path}: user {raw_user!r} never rated query item {raw_item!r}")
        flags[order[pos]] = True
    evaluated = part[users] >= 1
    n_query = np.bincount(users[flags], minlength=len(part))
    n_all = np.bincount(users[evaluated], minlength=len(part))
    for bad, why in (
        ((part >= 1) & (n_query == 0), "has no query items"),
        ((part >= 1) & (n_query > 0) & (n_query == n_all), "has no rating left for support"),
    ):
        if bad.any():
            raise DataError(f"{path}: user {raw_ids[int(np.argmax(bad))]!r} {why}")
    return flags


def _train_tasks(
    df: pd.DataFrame, q: int, rng: np.random.Generator, path: Path, raw_user: list[str]
) -> pa.Table:
    """Train users' tasks: a random query of up to ``q`` ratings, at least one support."""
    users = df["user"].to_numpy()
    counts = np.bincount(users, minlength=1)
    if (single := (counts == 1)).any():
        raw = raw_user[int(np.argmax(single))]
        raise DataError(f"{path}: train user {raw!r} has one rating; a task needs two")
    key = random_keys(rng, len(df))
    rank, count = group_rank(users, key)
    return tasks_table(df, is_query=rank < np.minimum(q, count - 1), order_key=key)
