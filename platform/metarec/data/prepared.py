"""The prepared dataset directory: atomic writer, schema-checked reader, manifest summary.

Layout::

    DIR/manifest.json                      schema version, protocol, counts, vocab, checksums
    DIR/items.parquet, DIR/users.parquet   integer-encoded side features
    DIR/ratings.parquet                    every encoded rating before the user filter
                                           (what `evaluate --split-seeds/--splits` re-split)
    DIR/tasks/<scenario>/<split>.parquet   one row per user task (list columns)

Training reads this directory only; it never sees raw files, so every run of every stage
agrees on the same tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from metarec.errors import DataError

__all__ = [
    "MANIFEST",
    "SCHEMA_VERSION",
    "PreparedDataset",
    "open_prepared",
    "summarize",
    "write_prepared",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def write_prepared(
    out: Path,
    *,
    items: pa.Table,
    users: pa.Table,
    ratings: pa.Table,
    tasks: dict[str, dict[str, pa.Table]],
    manifest: dict[str, Any],
) -> Path:
    """Write everything into a temp dir beside ``out``, then swap it in with renames.

    A crash or bad input leaves ``out`` exactly as it was: either the old dataset or nothing.
    """
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise DataError(
            f"--out {out}: exists and is not a metarec dataset (no {MANIFEST}); "
            "refusing to replace it. Choose a new or empty directory."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        files: dict[str, str] = {}
        tables = {"items.parquet": items, "users.parquet": users, "ratings.parquet": ratings}
        for scenario, splits in tasks.items():
            for split, table in splits.items():
                tables[f"tasks/{scenario}/{split}.parquet"] = table
        for rel, table in tables.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path, compression="zstd")
            files[rel] = _sha256(path)
        manifest = {
            **manifest,
            "schema_version": SCHEMA_VERSION,
            "files": files,
            "dataset_hash": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[
                :16
            ],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class PreparedDataset:
    """Read access to a prepared directory; tables load lazily, one file each.

    ``split`` holds task tables built in memory (``metarec.data.splits``: another user
    split of the same ratings); when set, ``tasks`` serves them instead of the files.
    """

    root: Path
    manifest: dict[str, Any]
    split: dict[str, dict[str, pa.Table]] | None = None

    @property
    def scenarios(self) -> list[str]:
        return list(self.manifest["scenarios"])

    @property
    def feedback(self) -> str:
        """``explicit`` (ratings) or ``implicit`` (interaction strengths); older manifests
        predate implicit data and are explicit."""
        return self.manifest.get("feedback", "explicit")

    def task_path(self, scenario: str, split: str) -> Path:
        if scenario not in self.manifest["scenarios"]:
            raise DataError(
                f"scenario: got {scenario!r}; expected one of {self.scenarios} "
                f"(prepared in {self.root})"
            )
        if split not in self.manifest["scenarios"][scenario]:
            raise DataError(
                f"split: got {split!r}; expected one of "
                f"{list(self.manifest['scenarios'][scenario])}"
            )
        return self.root / "tasks" / scenario / f"{split}.parquet"

    def tasks(self, scenario: str, split: str) -> pa.Table:
        path = self.task_path(scenario, split)  # also validates the names
        if self.split is not None:
            return self.split[scenario][split]
        return pq.read_table(path)

    def ratings(self) -> pa.Table:
        """Every encoded rating, before the user filter (user, item, rating[, timestamp])."""
        path = self.root / "ratings.parquet"
        if not path.is_file():
            raise DataError(
                f"{self.root}: no ratings.parquet (prepared by an older metarec); re-run "
                "`metarec prepare` to re-split users"
            )
        return pq.read_table(path)

    def items(self) -> pa.Table:
        return pq.read_table(self.root / "items.parquet")

    def users(self) -> pa.Table:
        return pq.read_table(self.root / "users.parquet")


def open_prepared(root: str | Path) -> PreparedDataset:
    """Open a prepared directory, refusing one written under another schema version."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{root}: no {MANIFEST}; expected a directory written by `metarec prepare --out DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            f"{path}: schema_version {version!r}; expected {SCHEMA_VERSION}. It was "
            "written by another metarec version: re-run `metarec prepare` to "
            "rebuild it."
        )
    return PreparedDataset(root, manifest)


def summarize(manifest: dict[str, Any]) -> str:
    """A few lines for humans: source, counts, and tasks per scenario and split."""
    c = manifest["counts"]
    p = manifest["protocol"]
    feedback = manifest.get("feedback", "explicit")
    lines = [
        f"dataset {manifest['source']['name']}  hash {manifest['dataset_hash']}  "
        f"schema v{manifest['schema_version']}  feedback {feedback}",
        f"ratings {c['ratings_kept']:,} of {c['ratings_raw']:,}  users {c['users_kept']:,}  "
        f"items {c['items']:,}  (dropped: "
        + ", ".join(f"{k} {v:,}" for k, v in manifest["dropped"].items())
        + ")",
        f"protocol: query {p['query_size']}, users with {p['min_ratings']}-{p['max_ratings']} "
        f"ratings, split {p['split']}, new items = year > {p['item_cut_year']}, seed {p['seed']}",
        f"{'scenario':<16}{'train':>10}{'valid':>10}{'test':>10}   (tasks)",
    ]
    for name, splits in manifest["scenarios"].items():
        lines.append(
            f"{name:<16}"
            + "".join(
                f"{splits.get(s, {}).get('tasks', 0):>10,}" for s in ("train", "valid", "test")
            )
        )
    for name, why in manifest.get("skipped_scenarios", {}).items():
        lines.append(f"{name:<16}skipped: {why}")
    return "\n".join(lines)
