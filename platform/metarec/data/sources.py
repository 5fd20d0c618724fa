"""Loaders: every source becomes the same ``RawData`` (ratings + optional feature tables).

Canonical columns, whatever the source:
- ratings: ``user``, ``item`` (raw ids), ``rating`` (float64), ``timestamp`` (int64 seconds,
  absent when the source has none), ``line`` (where the rating came from, for error messages).
- items (optional): ``item``, ``title`` (str), ``genres`` (list of str), ``year`` (float, NaN
  when unknown).
- users (optional): ``user``, ``age`` (float, NaN unknown), ``gender``, ``occupation``, ``zip``
  (str, "" unknown).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from metarec.data.download import resolve_movielens_dir
from metarec.data.readers import (
    ColumnSpec,
    check_finite,
    read_delimited,
    read_table_file,
    row_location,
)
from metarec.errors import DataError

__all__ = [
    "LOADERS",
    "USER_COLUMNS",
    "RawData",
    "load_source",
    "parse_timestamps",
    "with_lines_and_times",
]

INT, FLOAT, STR = pa.int64(), pa.float64(), pa.string()

# MovieLens 1M codes its occupations (README of ml-1m); names make them comparable to 100K's.
ML1M_OCCUPATIONS = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]
NO_GENRE = {"", "unknown", "(no genres listed)"}
USER_COLUMNS = ("age", "gender", "occupation", "zip")  # a raw user table's feature columns


@dataclass
class RawData:
    """Ratings and side tables in canonical columns, plus the files they came from."""

    ratings: pd.DataFrame
    items: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    files: list[Path] = field(default_factory=list)
    rating_file: str = ""  # for "file line N" messages in later validation
    feedback: str = "explicit"  # implicit: ``rating`` is an interaction's strength (events.py)


def load_source(
    source: str,
    *,
    input: str | None,
    download: bool = False,
    items: str | None = None,
    users: str | None = None,
) -> RawData:
    """Load a non-synthetic source by name (``ml-100k``, ``ml-1m``, ``ml-latest``, ``ratings``)."""
    if source == "ratings":
        if input is None:
            raise DataError(
                "--input: required for --source ratings; expected a CSV/TSV/Parquet "
                "file with columns user, item, rating[, timestamp]"
            )
        return load_ratings_file(Path(input), items=items, users=users)
    return LOADERS[source](resolve_movielens_dir(source, input, download=download))


def _ratings(path: Path, sep: str, names: list[str], *, header: bool) -> pd.DataFrame:
    """Read a ratings file and check ratings are finite numbers."""
    cols = [
        ColumnSpec("user", INT),
        ColumnSpec("item", INT),
        ColumnSpec("rating", FLOAT),
        ColumnSpec("timestamp", INT),
    ]
    table = read_delimited(path, cols, sep=sep, header=header, names=None if header else names)
    check_finite(table, "rating", path=path, header=header)
    df = table.to_pandas()
    df["line"] = np.arange(len(df), dtype=np.int64)  # file order, for "keep the latest"
    return df


def _headerless(
    path: Path, fields: dict[str, pa.DataType | None], *, sep: str, encoding: str = "utf8"
) -> pd.DataFrame:
    """Read a headerless file whose lines hold ``fields`` in order (type None: not read)."""
    specs = [ColumnSpec(n, t) for n, t in fields.items() if t is not None]
    table = read_delimited(
        path, specs, sep=sep, header=False, names=list(fields), encoding=encoding
    )
    return table.to_pandas()


def _year_from_title(titles: pd.Series) -> pd.Series:
    return pd.to_numeric(titles.str.extract(r"\((\d{4})\)\s*$", expand=False), errors="coerce")


def _split_genres(genres: pd.Series) -> pd.Series:
    return genres.map(lambda g: [x for x in g.split("|") if x not in NO_GENRE])


def load_ml100k(root: Path) -> RawData:
    ratings = _ratings(root / "u.data", "\t", ["user", "item", "rating", "timestamp"], header=False)
    genre_path = root / "u.genre"
    genre_tab = _headerless(genre_path, {"name": STR, "idx": INT}, sep="|", encoding="latin-1")
    genre_names = genre_tab.sort_values("idx", kind="stable")["name"].tolist()
    flag_names = [f"g{i}" for i in range(len(genre_names))]
    item_path = root / "u.item"
    fields = {"item": INT, "title": STR, "release": STR, "video_release": None, "url": None}
    it = _headerless(
        item_path, fields | dict.fromkeys(flag_names, INT), sep="|", encoding="latin-1"
    )
    flags = it[flag_names].to_numpy(dtype=bool)
    vocab = np.array(genre_names, dtype=object)
    genres = [[g for g in vocab[row] if g not in NO_GENRE] for row in flags]
    year = pd.to_numeric(it["release"].str[-4:], errors="coerce")
    year = year.fillna(_year_from_title(it["title"]))
    items = pd.DataFrame(
        {"item": it["item"], "title": it["title"], "genres": genres, "year": year.astype(float)}
    )
    user_path = root / "u.user"
    ut = _headerless(
        user_path, {"user": INT, "age": INT, "gender": STR, "occupation": STR, "zip": STR}, sep="|"
    )
    ut["age"] = ut["age"].astype(float)
    return RawData(
        ratings,
        items,
        ut,
        [root / "u.data", genre_path, item_path, user_path],
        str(root / "u.data"),
    )


def load_ml1m(root: Path) -> RawData:
    ratings = _ratings(
        root / "ratings.dat", "::", ["user", "item", "rating", "timestamp"], header=False
    )
    movie_path = root / "movies.dat"
    mv = _headerless(
        movie_path, {"item": INT, "title": STR, "genres": STR}, sep="::", encoding="latin-1"
    )
    items = pd.DataFrame(
        {
            "item": mv["item"],
            "title": mv["title"],
            "genres": _split_genres(mv["genres"]),
            "year": _year_from_title(mv["title"]).astype(float),
        }
    )
    user_path = root / "users.dat"
    us = _headerless(
        user_path, {"user": INT, "gender": STR, "age": INT, "occupation": INT, "zip": STR}, sep="::"
    )
    occ = np.array(ML1M_OCCUPATIONS, dtype=object)
    codes = us["occupation"].to_numpy()
    users = pd.DataFrame(
        {
            "user": us["user"],
            "age": us["age"].astype(float),
            "gender": us["gender"],
            "occupation": np.where(
                (codes >= 0) & (codes < len(occ)), occ[np.clip(codes, 0, len(occ) - 1)], ""
            ),
            "zip": us["zip"],
        }
    )
    return RawData(
        ratings,
        items,
        users,
        [root / "ratings.dat", movie_path, user_path],
        str(root / "ratings.dat"),
    )


def load_mllatest(root: Path) -> RawData:
    """MovieLens latest / latest-small / 20M / 25M (same CSV layout; no user features)."""
    path = root / "ratings.csv"
    cols = [
        ColumnSpec("userId", INT),
        ColumnSpec("movieId", INT),
        ColumnSpec("rating", FLOAT),
        ColumnSpec("timestamp", INT),
    ]
    table = read_delimited(path, cols, sep=",", header=True)
    check_finite(table, "rating", path=path, header=True)
    ratings = table.rename_columns(["user", "item", "rating", "timestamp"]).to_pandas()
    ratings["line"] = np.arange(len(ratings), dtype=np.int64)
    movie_path = root / "movies.csv"
    mv = read_delimited(
        movie_path,
        [ColumnSpec("movieId", INT), ColumnSpec("title", STR), ColumnSpec("genres", STR)],
        sep=",",
        header=True,
        quoted=True,
    ).to_pandas()
    items = pd.DataFrame(
        {
            "item": mv["movieId"],
            "title": mv["title"].str.strip(),
            "genres": _split_genres(mv["genres"]),
            "year": _year_from_title(mv["title"].str.strip()).astype(float),
        }
    )
    return RawData(ratings, items, None, [path, movie_path], str(path))


def load_ratings_file(path: Path, *, items: str | None = None, users: str | None = None) -> RawData:
    """Generic source: ratings (user, item, rating[, timestamp]) + optional feature tables.

    Ids are read as text so that any id scheme works; feature tables join on the same text.
    """
    table, header = read_table_file(
        path,
        [
            ColumnSpec("user", STR),
            ColumnSpec("item", STR),
            ColumnSpec("rating", FLOAT),
            ColumnSpec("timestamp", STR, required=False),
        ],
    )
    check_finite(table, "rating", path=path, header=header)
    ratings = with_lines_and_times(table.to_pandas(), path, header)
    files = [path]
    item_df = user_df = None
    if items is not None:
        item_df = _generic_items(Path(items))
        files.append(Path(items))
    if users is not None:
        user_df = _generic_users(Path(users))
        files.append(Path(users))
    return RawData(ratings, item_df, user_df, files, str(path))


def with_lines_and_times(rows: pd.DataFrame, path: Path, header: bool) -> pd.DataFrame:
    """``rows`` of a file read by ``read_table_file``, plus each row's ``line`` index (for
    error messages later) and its ``timestamp``, where there is one, as int64 seconds."""
    rows["line"] = np.arange(len(rows), dtype=np.int64)
    if "timestamp" in rows:
        rows["timestamp"] = parse_timestamps(rows["timestamp"], path, header)
    return rows


def parse_timestamps(raw: pd.Series, path: Path, header: bool) -> pd.Series:
    """Unix seconds or ISO-8601 datetimes -> int64 seconds; anything else is an error."""
    numeric = pd.to_numeric(raw, errors="coerce")
    out = numeric.to_numpy(dtype=np.float64, copy=True)
    text = numeric.isna().to_numpy()
    if text.any():
        parsed = pd.to_datetime(raw[text], errors="coerce", utc=True, format="ISO8601")
        seconds = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        out[text] = seconds.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(out)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{path} {row_location(path, row, header=header)}: timestamp "
            f"{raw.iloc[row]!r} is neither unix seconds nor an ISO-8601 datetime"
        )
    return pd.Series(out.astype(np.int64), index=raw.index)


def _feature_table(path: Path, key: str, optional: tuple[str, ...]) -> pd.DataFrame:
    """A generic feature table: the id column plus whichever optional columns it has, as text
    (each loader parses its own columns leniently: unparseable features become unknown)."""
    columns = [ColumnSpec(key, STR), *(ColumnSpec(c, STR, required=False) for c in optional)]
    return read_table_file(path, columns)[0].to_pandas()


def _generic_items(path: Path) -> pd.DataFrame:
    df = _feature_table(path, "item", ("title", "genres", "year"))
    year = pd.Series(np.nan, index=df.index)
    if "year" in df:
        year = pd.to_numeric(df["year"], errors="coerce")
    if "title" in df:  # an empty year falls back to a "(1995)" suffix of the title
        year = year.fillna(_year_from_title(df["title"]))
    return pd.DataFrame(
        {
            "item": df["item"],
            "title": df.get("title", ""),
            "genres": _split_genres(df["genres"])
            if "genres" in df
            else [[] for _ in range(len(df))],
            "year": year.astype(float),
        }
    )


def _generic_users(path: Path) -> pd.DataFrame:
    df = _feature_table(path, "user", USER_COLUMNS)
    out = pd.DataFrame({"user": df["user"]})
    out["age"] = pd.to_numeric(df["age"], errors="coerce") if "age" in df else np.nan
    for col in ("gender", "occupation", "zip"):
        out[col] = df.get(col, "")
    return out


LOADERS: dict[str, Callable[[Path], RawData]] = {
    "ml-100k": load_ml100k,
    "ml-1m": load_ml1m,
    "ml-latest": load_mllatest,
}
