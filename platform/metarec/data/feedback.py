"""The serving feedback log, read back: how served users' ratings reach the next training.

``metarec serve`` appends every rating a user gives to ``feedback-*.jsonl`` files (one
JSON object per line: user_id, item, rating, timestamp, optional user features);
``metarec prepare --feedback DIR`` folds them into the raw ratings before tasks are built,
so the loop serve -> feedback -> meta-train again is closed.

Identity policy: a served ``user_id`` is the same person as a training user with that id
(the serving application and the training data share one id space), and a repeated
(user, item) keeps its latest rating — the same policy as for any raw ratings file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metarec.data.sources import USER_COLUMNS, RawData
from metarec.errors import DataError

__all__ = [
    "PATTERN",
    "feedback_files",
    "fold_feedback",
    "read_events_at",
    "read_feedback",
    "scan_feedback",
    "segment_of",
    "segment_path",
]

log = logging.getLogger(__name__)
PATTERN = "feedback-*.jsonl"


def segment_path(directory: str | os.PathLike, writer: str, k: int) -> Path:
    """Writer ``writer``'s k-th log file: ``feedback-<writer>.jsonl``, then
    ``feedback-<writer>+000001.jsonl`` and on (the server starts a new segment when one
    passes its size)."""
    return Path(directory) / f"feedback-{writer}{f'+{k:06d}' if k else ''}.jsonl"


def segment_of(path: Path) -> tuple[str, int]:
    """(writer, segment number) of a log file, as ``segment_path`` named it."""
    stem = path.name.removeprefix("feedback-").removesuffix(".jsonl")
    writer, _, segment = stem.partition("+")
    return writer, int(segment) if segment.isdigit() else 0


def feedback_files(directory: str | os.PathLike) -> list[Path]:
    """A log directory's files in replay order: writer by writer, each writer's segments
    in the order written."""
    return sorted(Path(directory).glob(PATTERN), key=segment_of)


def scan_feedback(
    directory: str | os.PathLike,
) -> Iterator[tuple[Path, int, int, dict[str, Any]]]:
    """Every complete event of a log directory: (file, line number, byte offset, event).

    A last line without its newline is a write a crash interrupted — never acknowledged to
    the client — so it is skipped; any other unreadable line is an error naming the line.
    """
    for path in feedback_files(directory):
        with open(path, "rb") as f:
            offset = 0
            for lineno, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    log.warning("%s line %d: incomplete last line skipped", path, lineno)
                    break
                yield path, lineno, offset, _parse(path, lineno, line)
                offset += len(line)


def read_feedback(directory: str | os.PathLike) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """Every complete event of a log directory: (file, line number, event), in replay order."""
    for path, lineno, _, event in scan_feedback(directory):
        yield path, lineno, event


def read_events_at(path: Path, offsets: list[int]) -> list[dict[str, Any]]:
    """The events that start at ``offsets`` of one log file (an index kept from a scan):
    a user's history without reading anyone else's."""
    events = []
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            events.append(_parse(path, None, f.readline()))
    return events


def _parse(path: Path, lineno: int | None, line: bytes) -> dict[str, Any]:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        where = f"line {lineno}" if lineno is not None else "an indexed line"
        raise DataError(f"{path} {where}: not a JSON object ({e.msg})") from e


def fold_feedback(raw: RawData, directory: str | os.PathLike) -> RawData:
    """``raw`` plus the logged feedback ratings (and new users' features, when given).

    Raises:
        DataError: the directory has no log files, or an event is malformed or names an item
            the source does not have (a log written by a model of another dataset).
    """
    if raw.feedback != "explicit":
        raise DataError(
            f"--feedback {directory}: got a log of star ratings for a {raw.feedback} dataset; "
            "expected an explicit one (the serve log holds ratings)"
        )
    files = feedback_files(directory)
    if not files:
        raise DataError(f"--feedback {directory}: no {PATTERN} files there")
    item_ids = _known_items(raw)
    rows, features = [], {}
    for path, lineno, e in read_feedback(directory):
        try:
            user, item, rating = str(e["user_id"]), str(e["item"]), float(e["rating"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{path} line {lineno}: expected user_id, item and rating ({err})"
            ) from err
        if item not in item_ids or not np.isfinite(rating):
            why = f"item {item!r} is not in the source" if item not in item_ids else "rating"
            raise DataError(f"{path} line {lineno}: {why}; was it logged by another model?")
        rows.append((user, item_ids[item], rating, int(e.get("timestamp") or 0)))
        if e.get("user"):
            features[user] = e["user"]
    fb = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    ratings, users = raw.ratings, raw.users
    if _all_integers(fb["user"]) and pd.api.types.is_integer_dtype(ratings["user"]):
        fb["user"] = fb["user"].astype(ratings["user"].dtype)
    else:  # mixed id kinds: compare everything as strings (3 == "3")
        ratings = ratings.assign(user=ratings["user"].astype(str))
        users = None if users is None else users.assign(user=users["user"].astype(str))
    fb["line"] = ratings["line"].max() + 1 + np.arange(len(fb))  # later than any raw rating
    if "timestamp" not in ratings:
        fb = fb.drop(columns="timestamp")
    fb = fb.astype({"rating": ratings["rating"].dtype})
    merged = pd.concat([ratings, fb], ignore_index=True)
    if users is not None and features:
        new = pd.DataFrame(
            [{"user": u, **{k: f.get(k) for k in USER_COLUMNS}} for u, f in features.items()]
        )
        new["user"] = new["user"].astype(merged["user"].dtype)
        users = pd.concat([users[~users["user"].isin(new["user"])], new], ignore_index=True)
    return RawData(
        ratings=merged,
        items=raw.items,
        users=users,
        files=[*raw.files, *files],
        rating_file=raw.rating_file,
    )


def _known_items(raw: RawData) -> dict[str, Any]:
    """Raw item id as served (its string form) -> the id as the source has it."""
    ids = raw.items["item"] if raw.items is not None else raw.ratings["item"]
    return {str(i): i for i in pd.unique(ids.to_numpy())}


def _all_integers(ids: pd.Series) -> bool:
    return bool(ids.str.fullmatch(r"-?\d{1,18}").all())
