"""Session state of users who send feedback: a bounded LRU in memory, a durable log on disk.

The log is the source of truth; the LRU is a cache of it. Every feedback event is appended
to a JSON-lines file and fsync'd *before* the request is answered, so an acknowledged
rating survives a crash or a restart of the server. A replica rebuilds its sessions from
the log when it starts, and a session evicted from the LRU is rebuilt from the log when its
user comes back: from that user's lines alone, found by a per-user index of byte offsets
kept from the start-up scan and every append (never a rescan of the log).
``metarec prepare --feedback DIR`` folds the same files into the next training round
(serve -> feedback -> meta-train again).

Each process appends to its own files (``feedback-<name>.jsonl``, and once that passes
``segment_bytes`` the next segment, ``feedback-<name>+000001.jsonl`` and on): no two
writers share a file, so lines never interleave, and no file grows without bound. A crash
can leave at most one torn last line, which was never acknowledged; it is cut off when the
file is next opened for writing and skipped when read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from array import array
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from metarec.data.feedback import (
    feedback_files,
    read_events_at,
    read_feedback,
    scan_feedback,
    segment_of,
    segment_path,
)

__all__ = ["FeedbackLog", "Session", "Sessions", "read_feedback"]

log = logging.getLogger(__name__)


class FeedbackLog:
    """Append-only, fsync'd JSON-lines log of feedback events (one writer's segments).

    ``append`` is thread-safe: a server calls it from worker threads, so the fsync never
    blocks the event loop that accepts requests.
    """

    def __init__(
        self, directory: str | os.PathLike, name: str, *, segment_bytes: int = 64 << 20
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._base = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        segments = (segment_of(p) for p in feedback_files(self.directory))
        self._segment = max((k for w, k in segments if w == self._base), default=0)
        self.path = segment_path(self.directory, self._base, self._segment)
        _cut_torn_tail(self.path)
        self._file = open(self.path, "ab")  # noqa: SIM115 (held open for the server's life)
        self._lock = threading.Lock()

    def append(self, events: list[dict[str, Any]]) -> tuple[Path, list[int]]:
        """Write ``events`` and fsync: once this returns, they are on disk. Returns the file
        and the byte offset of each event's line (for the sessions' index)."""
        lines = [json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in events]
        with self._lock:
            start = self._file.tell()
            if start >= self.segment_bytes:  # the next segment: files stay bounded
                self._file.close()
                self._segment += 1
                self.path = segment_path(self.directory, self._base, self._segment)
                self._file = open(self.path, "ab")  # noqa: SIM115
                start = 0
            offsets, at = [], start
            for line in lines:
                offsets.append(at)
                at += len(line)
            self._file.write(b"".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())
            return self.path, offsets

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
        # the logged record's value this model replays (and the service logs): ratings, or
        # implicit strengths
        self.value_key, self._add_up = ("strength", True) if implicit else ("rating", False)
        self.max_sessions, self.max_ratings = max_sessions, max_ratings
        self._index = index
        self._lru: OrderedDict[str, Session] = OrderedDict()
        # Where each user's events are: file number << 40 | byte offset, in log order.
        self._files: list[Path] = []
        self._file_no: dict[Path, int] = {}
        self._where: defaultdict[str, array] = defaultdict(lambda: array("q"))
        recent: OrderedDict[str, None] = OrderedDict()  # users by last activity
        for path, _, offset, event in scan_feedback(self.log_dir):
            u = event["user_id"]
            self._where[u].append(self._file_number(path) << 40 | offset)
            recent[u] = None
            recent.move_to_end(u)
        for u in list(recent)[-max_sessions:] if max_sessions else []:
            if (session := self._rebuild(u)) is not None:
                self._put(u, session)

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, user_id: str) -> Session | None:
        """The session, from memory or rebuilt from the log; None for an unknown user."""
        if user_id in self._lru:
            self._lru.move_to_end(user_id)
            return self._lru[user_id]
        session = self._rebuild(user_id) if user_id in self._where else None
        if session is not None:
            self._put(user_id, session)
        return session

    def _rebuild(self, user_id: str) -> Session | None:
        """Replay one user's logged events, read at their indexed offsets."""
        by_file: defaultdict[int, list[int]] = defaultdict(list)
        for key in self._where[user_id]:
            by_file[key >> 40].append(key & ((1 << 40) - 1))
        session = None
        for no in sorted(by_file):  # file numbers follow replay order
            for event in read_events_at(self._files[no], by_file[no]):
                session = self._replay_one(session, event)
        return session

    def _file_number(self, path: Path) -> int:
        if path not in self._file_no:
            self._file_no[path] = len(self._files)
            self._files.append(path)
        return self._file_no[path]

    def record(
        self, user_id: str, session: Session, logged: tuple[Path, list[int]] | None = None
    ) -> None:
        """Put ``session`` in the LRU; ``logged``: where its new events were appended
        (``FeedbackLog.append``), so an eviction can rebuild it."""
        if logged is not None:
            no = self._file_number(logged[0])
            self._where[user_id].extend(no << 40 | offset for offset in logged[1])
        self._put(user_id, session)

    def _put(self, user_id: str, session: Session) -> None:
        self._lru[user_id] = session
        self._lru.move_to_end(user_id)
        while len(self._lru) > self.max_sessions:
            self._lru.popitem(last=False)

    def _replay_one(self, session: Session | None, event: dict[str, Any]) -> Session | None:
        item = self._index.get(event["item"])
        if item is None or self.value_key not in event:  # another model's catalog or kind
            return session
        session = session or Session()
        if event.get("user"):
            session.features = event["user"]
        session.add([item], [float(event[self.value_key])], self.max_ratings, add_up=self._add_up)
        return session
