"""Implicit feedback sources: event logs (view, cart, purchase, play, ...) and interaction counts.

A shop or a streaming service has no star ratings, only what users did. Each (user, item)
pair becomes one interaction whose *strength* is the sum of its events' weights
(``data.event_weights``; a ``value`` column, such as a play count, multiplies the weight),
stored where an explicit dataset stores its rating; its time is the pair's first event, when
the item entered the user's history. The manifest's ``feedback: implicit`` tells every later
stage which kind of dataset it reads. No event is dropped quietly: an unknown event name, a
value that is not a positive number, or a time that cannot be read is an error naming the
file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from metarec.data.readers import ColumnSpec, check_finite, read_table_file, row_location
from metarec.data.sources import RawData, with_lines_and_times
from metarec.errors import DataError

__all__ = [
    "IMPLICIT_SOURCES",
    "interactions",
    "load_events",
    "load_implicit",
    "load_interactions",
]

FLOAT, STR = pa.float64(), pa.string()
IMPLICIT_SOURCES = ("events", "interactions")


def load_implicit(source: str, input: str | None, weights: Mapping[str, float]) -> RawData:
    """``--source events`` or ``interactions`` from the file ``input``."""
    if input is None:
        columns = (
            "user, item, event[, value], timestamp"
            if source == "events"
            else ("user, item, count[, timestamp]")
        )
        raise DataError(
            f"--input: required for --source {source}; expected a CSV/TSV/Parquet file with "
            f"columns {columns}"
        )
    if source == "events":
        return load_events(Path(input), weights)
    return load_interactions(Path(input))


def load_events(path: Path, weights: Mapping[str, float]) -> RawData:
    """``user,item,event[,value],timestamp`` rows -> one interaction per (user, item)."""
    table, header = _read(
        path,
        ColumnSpec("event", STR),
        ColumnSpec("value", FLOAT, required=False),
        ColumnSpec("timestamp", STR),
    )
    frame = table.to_pandas()
    known = pd.Series(weights, dtype=np.float64)
    weight = frame["event"].map(known)
    unknown = weight.isna().to_numpy()
    if unknown.any():
        row = int(np.argmax(unknown))
        raise DataError(
            f"{path} {row_location(path, row, header=header)}: event "
            f"{frame['event'].iloc[row]!r} has no weight; expected one of {sorted(weights)} "
            "(set data.event_weights to weigh it)"
        )
    strength = weight.to_numpy()
    if "value" in frame:
        _check_positive(table, "value", path, header)
        strength = strength * frame["value"].to_numpy()
    frame["rating"] = strength
    return _implicit(frame, path, header)


def load_interactions(path: Path) -> RawData:
    """``user,item,count[,timestamp]`` rows (e.g. play counts) -> interactions of that strength."""
    table, header = _read(
        path, ColumnSpec("count", FLOAT), ColumnSpec("timestamp", STR, required=False)
    )
    _check_positive(table, "count", path, header)
    return _implicit(table.to_pandas().rename(columns={"count": "rating"}), path, header)


def _implicit(rows: pd.DataFrame, path: Path, header: bool) -> RawData:
    """Rows with a ``rating`` strength -> the file's interactions, one per (user, item)."""
    rows = with_lines_and_times(rows, path, header)
    return RawData(interactions(rows), None, None, [path], str(path), feedback="implicit")


def _read(path: Path, *columns: ColumnSpec) -> tuple[pa.Table, bool]:
    """``user`` and ``item`` as text (any id scheme), then ``columns``."""
    return read_table_file(path, [ColumnSpec("user", STR), ColumnSpec("item", STR), *columns])


def _check_positive(table: pa.Table, column: str, path: Path, header: bool) -> None:
    """A value or count must be a finite number > 0 (a zero count is not an interaction)."""
    check_finite(table, column, path=path, header=header)
    values = table.column(column).to_numpy(zero_copy_only=False)
    bad = values <= 0
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{path} {row_location(path, row, header=header)}: {column} {values[row]:g} is not "
            "positive; expected a number > 0 (remove the line if nothing happened)"
        )


def interactions(events: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, item): the sum of its events' strengths (``rating``), its first
    time and its first line; rows in the order of their first line."""
    agg: dict[str, tuple[str, str]] = {"rating": ("rating", "sum"), "line": ("line", "min")}
    if "timestamp" in events:
        agg["timestamp"] = ("timestamp", "min")
    pairs = events.groupby(["user", "item"], sort=False).agg(**agg).reset_index()
    return pairs.sort_values("line", kind="stable").reset_index(drop=True)
