"""Session state of users who send feedback: a bounded LRU in memory, a durable log on disk.

The log is the source of truth; the LRU is a cache of it. Every feedback event is appended
to a JSON-lines file and fsync'd *before* the request is answered, so an acknowledged
rating survives a crash or a restart of the server. A replica rebuilds its sessions from
the log when it starts, and a session evicted from the LRU is rebuilt from the log when its
user comes back. ``metarec prepare --feedback DIR`` folds the same files into the next
training round (serve -> feedback -> meta-train again).

Each process appends to its own file (``feedback-<name>.jsonl``): no two writers share a
file, so lines never interleave. A crash can leave at most one torn last line, which was
never acknowledged; it is cut off when the file is next opened for writing and skipped
when read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from metarec.data.feedback import read_feedback

__all__ = ["FeedbackLog", "Session", "Sessions", "read_feedback"]

log = logging.getLogger(__name__)


class FeedbackLog:
    """Append-only, fsync'd JSON-lines log of feedback events (one file per writer)."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        self.path = self.directory / f"feedback-{safe}.jsonl"
        _cut_torn_tail(self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115 (held open for the server's life)

    def append(self, events: list[dict[str, Any]]) -> None:
        """Write ``events`` and fsync: once this returns, they are on disk."""
        data = b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _cut_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("%s: cutting an incomplete last line (%d bytes)", path, len(data) - keep)
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Session:
    """One user's ratings (latest per item, most recent last), or for an implicit model
    interaction strengths (summed per item), and cached fast weights."""

    features: dict[str, Any] | None = None
    ratings: dict[int, float] = field(default_factory=dict)  # item index -> rating
    weights: dict[str, Tensor] | None = None  # valid for exactly these ratings
    version: int = 0  # bumped by every change, so a slow adaptation never caches stale weights

    def add(
        self, items: list[int], ratings: list[float], max_ratings: int, *, add_up: bool = False
    ) -> None:
        """Record ratings; a re-rated item keeps its latest rating (the training policy), or
        with ``add_up`` (implicit strengths) its strengths add up, as events did in training.

        Only the ``max_ratings`` most recent are kept: the support set stays the size the
        model was meta-trained for, and a drifting taste is followed, not averaged away.
        """
        for i, r in zip(items, ratings, strict=True):
            before = self.ratings.pop(i, 0.0)
            self.ratings[i] = before + r if add_up else r
        while len(self.ratings) > max_ratings:
            del self.ratings[next(iter(self.ratings))]
        self.weights = None
        self.version += 1


class Sessions:
    """Bounded LRU of sessions backed by the feedback log.

    Args:
        max_sessions: sessions held in memory (each caches one user's fast weights).
        index: raw item id -> catalog index, to replay logged events.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        max_sessions: int,
        max_ratings: int,
        index: dict[str, int],
        implicit: bool = False,
    ) -> None:
        self.log_dir = Path(log_dir)
        # which logged records this model replays: ratings, or implicit strengths
        self._value, self._add_up = ("strength", True) if implicit else ("rating", False)
        self.max_sessions, self.max_ratings = max_sessions, max_ratings
        self._index = index
        self._lru: OrderedDict[str, Session] = OrderedDict()
        # Two passes: find the most recently active users, then replay only theirs (a
        # session evicted half-way through one pass would come back missing ratings).
        recent: OrderedDict[str, None] = OrderedDict()
        for _, _, event in read_feedback(self.log_dir):
            recent[event["user_id"]] = None
            recent.move_to_end(event["user_id"])
        self._logged = set(recent)  # users with events on disk (rebuilt on a miss)
        keep = set(list(recent)[-max_sessions:]) if max_sessions else set()
        replayed: dict[str, Session] = {}
        for _, _, event in read_feedback(self.log_dir):
            u = event["user_id"]
            if u in keep and (s := self._replay_one(replayed.get(u), event)) is not None:
                replayed[u] = s
        for u in recent:  # LRU order = order of last activity
            if u in replayed:
                self._put(u, replayed[u])

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, user_id: str) -> Session | None:
        """The session, from memory or rebuilt from the log; None for an unknown user."""
        if user_id in self._lru:
            self._lru.move_to_end(user_id)
            return self._lru[user_id]
        if user_id not in self._logged:
            return None
        session = None
        for _, _, event in read_feedback(self.log_dir):  # an evicted user: O(log) once
            if event["user_id"] == user_id:
                session = self._replay_one(session, event)
        if session is not None:
            self._put(user_id, session)
        return session

    def record(self, user_id: str, session: Session) -> None:
        self._logged.add(user_id)
        self._put(user_id, session)

    def _put(self, user_id: str, session: Session) -> None:
        self._lru[user_id] = session
        self._lru.move_to_end(user_id)
        while len(self._lru) > self.max_sessions:
            self._lru.popitem(last=False)

    def _replay_one(self, session: Session | None, event: dict[str, Any]) -> Session | None:
        item = self._index.get(event["item"])
        if item is None or self._value not in event:  # another model's catalog or kind
            return session
        session = session or Session()
        if event.get("user"):
            session.features = event["user"]
        session.add([item], [float(event[self._value])], self.max_ratings, add_up=self._add_up)
        return session
