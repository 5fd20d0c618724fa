"""Clean ratings and integer-encode ids and side features.

Every categorical vocabulary reserves index 0 for "unknown / missing", so an item or user
whose feature is absent (or a feature table that is absent altogether) still maps to a
valid embedding row. Vocabularies are stored by *name* in the manifest, so models trained on
one dataset can map features of another by name (cross-domain transfer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from metarec.data.sources import RawData
from metarec.errors import DataError

__all__ = [
    "AGE_EDGES",
    "USER_FEATURES",
    "YEAR_RANGE",
    "Encoded",
    "age_buckets",
    "encode",
    "zip_prefixes",
]

UNK = "<unk>"
YEAR_RANGE = (1920, 2030)  # per-year buckets, clipped at the ends; 0 = unknown year
# The encoded user features, in the column order of users.parquet and the model's table.
USER_FEATURES = ("age_bucket", "gender", "occupation", "zip_prefix")
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens 1M's age groups, used for every source
AGE_NAMES = (UNK, "<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
ZIP_NAMES = (UNK, *"0123456789")


@dataclass
class Encoded:
    """Integer-encoded interactions and feature tables, ready for task building."""

    ratings: pd.DataFrame  # user int32, item int32, rating float32[, timestamp int64]
    items: pa.Table  # item, raw_id, title, genres list<int16>, year int16, year_bucket int16
    users: pa.Table  # user, raw_id, age_bucket, gender, occupation, zip_prefix (int16)
    vocab: dict[str, list[str]]  # feature name -> names by index (index 0 = unknown/padding)
    item_year: np.ndarray  # (n_items,) float, NaN unknown: drives the item-cold split
    cleaning: dict[str, int] = field(default_factory=dict)  # what cleaning dropped, by reason
    has_user_features: bool = False


def encode(raw: RawData) -> Encoded:
    """Validate, de-duplicate and encode ``raw``. Raises ``DataError`` naming file and line."""
    ratings = raw.ratings
    if len(ratings) == 0:
        raise DataError(f"{raw.rating_file}: no ratings; expected at least one")
    item_ids = _sorted_ids(ratings["item"], None if raw.items is None else raw.items["item"])
    user_ids = _sorted_ids(ratings["user"], None)
    enc = pd.DataFrame(
        {
            "user": pd.Index(user_ids).get_indexer(ratings["user"]).astype(np.int32),
            "item": pd.Index(item_ids).get_indexer(ratings["item"]).astype(np.int32),
            "rating": ratings["rating"].to_numpy(dtype=np.float32),
        }
    )
    if "timestamp" in ratings:
        enc["timestamp"] = ratings["timestamp"].to_numpy(dtype=np.int64)
    enc, n_dup = _drop_duplicates(enc, ratings["line"].to_numpy(), n_items=len(item_ids))
    items, item_year, genre_vocab = _encode_items(item_ids, raw.items)
    users, user_vocab = _encode_users(user_ids, raw.users)
    vocab = {"genre": genre_vocab, "year_bucket": _year_names(), **user_vocab}
    return Encoded(
        enc,
        items,
        users,
        vocab,
        item_year,
        {"duplicates": n_dup},
        has_user_features=raw.users is not None,
    )


def _sorted_ids(values: pd.Series, extra: pd.Series | None) -> np.ndarray:
    ids = pd.unique(values.to_numpy())
    if extra is not None:
        ids = np.union1d(ids, extra.to_numpy())
    return np.sort(ids)


def _drop_duplicates(
    df: pd.DataFrame, line: np.ndarray, *, n_items: int
) -> tuple[pd.DataFrame, int]:
    """Policy: a repeated (user, item) keeps its latest rating (by timestamp, then by line)."""
    key = df["user"].to_numpy(np.int64) * n_items + df["item"].to_numpy(np.int64)
    sorted_key = np.sort(key)
    if not (sorted_key[1:] == sorted_key[:-1]).any():  # the common case: one cheap sort
        return df, 0
    ts = df["timestamp"].to_numpy() if "timestamp" in df else np.zeros(len(df), np.int64)
    order = np.lexsort((line, ts, key))  # last row of each key group = latest
    k = key[order]
    last = np.ones(len(k), dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    keep = np.sort(order[last])  # back to file order
    return df.iloc[keep].reset_index(drop=True), int(len(df) - len(keep))


def _unique_check(table: pd.DataFrame, key: str, what: str) -> None:
    dup = table[key].duplicated().to_numpy()
    if dup.any():
        row = int(np.argmax(dup))
        raise DataError(
            f"{what} row {row + 1}: {key} {table[key].iloc[row]!r} appears twice; "
            "expected one row per id"
        )


def _encode_items(
    item_ids: np.ndarray, items: pd.DataFrame | None
) -> tuple[pa.Table, np.ndarray, list[str]]:
    n = len(item_ids)
    titles = np.full(n, "", dtype=object)
    year = np.full(n, np.nan)
    genre_lists: list[list[str]] = [[] for _ in range(n)]
    if items is not None:
        _unique_check(items, "item", "item table")
        pos = pd.Index(item_ids).get_indexer(items["item"])
        titles[pos] = items["title"].fillna("").astype(str).to_numpy()
        year[pos] = items["year"].to_numpy(dtype=float)
        for p, g in zip(pos, items["genres"], strict=True):
            genre_lists[p] = g
    genre_vocab = ["<pad>", *sorted({g for gs in genre_lists for g in gs})]
    gid = {g: i for i, g in enumerate(genre_vocab)}
    flat = [gid[g] for gs in genre_lists for g in gs]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum([len(gs) for gs in genre_lists], out=offsets[1:])
    genres = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int16()))
    known = np.isfinite(year)
    lo, hi = YEAR_RANGE
    bucket = np.where(known, np.clip(np.nan_to_num(year), lo, hi) - lo + 1, 0).astype(np.int16)
    table = pa.table(
        {
            "item": pa.array(np.arange(n, dtype=np.int32)),
            "raw_id": pa.array([str(x) for x in item_ids]),
            "title": pa.array(titles.tolist(), type=pa.string()),
            "genres": genres,
            "year": pa.array(np.where(known, np.nan_to_num(year), 0).astype(np.int16)),
            "year_bucket": pa.array(bucket),
        }
    )
    return table, year, genre_vocab


def _year_names() -> list[str]:
    lo, hi = YEAR_RANGE
    return [UNK, *(str(y) for y in range(lo, hi + 1))]


def _categorical(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Strings -> codes with a sorted vocabulary; empty/None -> 0."""
    clean = np.array(["" if v is None else str(v).strip() for v in values], dtype=object)
    names = sorted(set(clean.tolist()) - {""})
    codes = pd.Index(["", *names]).get_indexer(clean)
    return codes.astype(np.int16), [UNK, *names]


def age_buckets(age: np.ndarray) -> np.ndarray:
    """Ages -> MovieLens 1M age-group codes (``AGE_NAMES``); NaN -> 0 (unknown).

    Public because serving encodes a new user's age with exactly the rule training used.
    """
    age = np.asarray(age, dtype=float)
    known = np.isfinite(age)
    return np.where(known, 1 + np.searchsorted(AGE_EDGES, np.nan_to_num(age), side="right"), 0)


def zip_prefixes(zips: np.ndarray | list[str]) -> np.ndarray:
    """Zip codes -> first-digit codes (``ZIP_NAMES``); no leading digit -> 0 (unknown)."""
    first = [str(z)[:1] for z in zips]
    return np.array([int(c) + 1 if c.isdigit() else 0 for c in first], dtype=np.int16)


def _encode_users(
    user_ids: np.ndarray, users: pd.DataFrame | None
) -> tuple[pa.Table, dict[str, list[str]]]:
    n = len(user_ids)
    age = np.full(n, np.nan)
    gender = np.full(n, "", dtype=object)
    occupation = np.full(n, "", dtype=object)
    zips = np.full(n, "", dtype=object)
    if users is not None:
        _unique_check(users, "user", "user table")
        pos = pd.Index(user_ids).get_indexer(users["user"])
        ok = pos >= 0  # users without ratings are irrelevant to tasks
        age[pos[ok]] = users["age"].to_numpy(dtype=float)[ok]
        gender[pos[ok]] = users["gender"].astype(str).str.upper().to_numpy()[ok]
        occupation[pos[ok]] = users["occupation"].astype(str).str.lower().to_numpy()[ok]
        zips[pos[ok]] = users["zip"].astype(str).to_numpy()[ok]
    age_bucket = age_buckets(age)
    zip_prefix = zip_prefixes(zips)
    gender_codes, gender_vocab = _categorical(gender)
    occ_codes, occ_vocab = _categorical(occupation)
    table = pa.table(
        {
            "user": pa.array(np.arange(n, dtype=np.int32)),
            "raw_id": pa.array([str(x) for x in user_ids]),
            "age_bucket": pa.array(age_bucket.astype(np.int16)),
            "gender": pa.array(gender_codes),
            "occupation": pa.array(occ_codes),
            "zip_prefix": pa.array(zip_prefix),
        }
    )
    vocab = {
        "age_bucket": list(AGE_NAMES),
        "gender": gender_vocab,
        "occupation": occ_vocab,
        "zip_prefix": list(ZIP_NAMES),
    }
    return table, vocab
