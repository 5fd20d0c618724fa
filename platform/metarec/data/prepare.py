"""``metarec prepare``: raw ratings -> validated, encoded, task-split prepared directory."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from metarec import __version__
from metarec.config import SCENARIOS, MetarecConfig
from metarec.data import synthetic
from metarec.data.events import IMPLICIT_SOURCES, load_implicit
from metarec.data.features import USER_FEATURES, encode
from metarec.data.feedback import fold_feedback
from metarec.data.prepared import PreparedDataset, open_prepared, write_prepared
from metarec.data.shop import generate_shop
from metarec.data.sources import RawData, load_source
from metarec.data.tasks import TaskProtocol, auto_cut_year, build_scenarios, filter_users
from metarec.errors import DataError

__all__ = ["prepare"]

log = logging.getLogger(__name__)


def prepare(cfg: MetarecConfig, out: str | Path, *, progress: bool = True) -> PreparedDataset:
    """Build the prepared dataset for ``cfg.data`` into ``out`` (atomically) and open it."""
    d = cfg.data
    # disable=None: a bar on terminals only, so logs and CI output stay clean.
    with tqdm(total=5, desc="prepare", disable=None if progress else True, unit="stage") as bar:

        def step(upcoming: str) -> None:
            bar.update(1)
            bar.set_postfix_str(upcoming)

        bar.set_postfix_str("read")
        if d.source == "synthetic" and d.synthetic.feedback == "implicit":
            raw, _ = generate_shop(d.synthetic, d.event_weights, seed=cfg.seed)
        elif d.source == "synthetic":
            raw = synthetic.generate(d.synthetic, seed=cfg.seed)
        elif d.source in IMPLICIT_SOURCES:
            raw = load_implicit(d.source, d.input, d.event_weights)
        else:
            raw = load_source(
                d.source, input=d.input, download=d.download, items=d.items, users=d.users
            )
        if d.feedback:
            raw = fold_feedback(raw, d.feedback)
        step("encode")
        enc = encode(raw)
        source = _source_info(cfg, raw)
        n_raw, rating_file, feedback = len(raw.ratings), raw.rating_file, raw.feedback
        del raw  # the raw frame is the largest one; free it before building tasks
        ratings, dropped_users = filter_users(
            enc.ratings, min_ratings=d.min_ratings, max_ratings=d.max_ratings
        )
        if len(ratings) == 0:
            raise DataError(
                f"{rating_file}: no user has {d.min_ratings}-{d.max_ratings} "
                "ratings; expected at least one. Lower --min-ratings or raise "
                "--max-ratings."
            )
        step("tasks")
        scenarios, skipped = _available(d.scenarios, ratings, enc.item_year)
        cut = d.item_cut_year
        if cut is None and {"warm", "item_cold", "user_item_cold"} & set(scenarios):
            cut = auto_cut_year(ratings, enc.item_year, d.new_item_share)
        protocol = TaskProtocol(
            query_size=d.query_size,
            min_ratings=d.min_ratings,
            max_ratings=d.max_ratings,
            split=d.split,
            cut_year=cut if cut is not None else 0,
            seed=cfg.seed if d.split_seed is None else d.split_seed,
        )
        tasks = build_scenarios(ratings, enc.item_year, protocol, scenarios)
        step("write")
        manifest = _manifest(
            source,
            n_raw,
            enc.cleaning | dropped_users,
            ratings,
            enc,
            protocol,
            tasks,
            skipped,
            cut_auto=d.item_cut_year is None,
            feedback=feedback,
            # what an event weighs, for serving events (interactions carry their count)
            event_weights=dict(d.event_weights) if d.source != "interactions" else {},
        )
        write_prepared(
            Path(out),
            items=enc.items,
            users=enc.users,
            ratings=pa.Table.from_pandas(enc.ratings, preserve_index=False),
            tasks=tasks,
            manifest=manifest,
        )
        step("verify")
        ds = open_prepared(out)
        step("done")
    return ds


def _available(
    requested: tuple[str, ...], ratings: Any, item_year: np.ndarray
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Drop scenarios the data cannot support, but only when the user asked for the default
    (all of them); an explicit request for an impossible scenario is an error."""
    explicit = tuple(requested) != SCENARIOS
    skipped: dict[str, str] = {}
    if "temporal" in requested and "timestamp" not in ratings:
        skipped["temporal"] = "the source has no timestamps"
    years_known = np.isfinite(item_year[ratings["item"].to_numpy()]).any()
    if not years_known:
        for s in ("warm", "item_cold", "user_item_cold"):
            if s in requested:
                skipped[s] = "no item has a known release year"
    if skipped and explicit:
        name, why = next(iter(skipped.items()))
        raise DataError(
            f"--scenarios {name}: cannot be built because {why}; drop it from --scenarios"
        )
    return tuple(s for s in requested if s not in skipped), skipped


def _source_info(cfg: MetarecConfig, raw: RawData) -> dict[str, Any]:
    source: dict[str, Any] = {
        "name": cfg.data.source,
        "files": {p.name: _file_info(p) for p in raw.files},
    }
    if cfg.data.source == "synthetic":
        source["generator"] = cfg.to_dict()["data"]["synthetic"]
    return source


def _file_info(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return {
            "sha256": hashlib.file_digest(f, "sha256").hexdigest(),
            "bytes": path.stat().st_size,
        }


def _manifest(
    source: dict[str, Any],
    n_raw: int,
    dropped: dict[str, int],
    ratings: Any,
    enc: Any,
    protocol: TaskProtocol,
    tasks: dict,
    skipped: dict[str, str],
    *,
    cut_auto: bool,
    feedback: str,
    event_weights: dict[str, float],
) -> dict[str, Any]:
    r = ratings["rating"].to_numpy()
    duplicates = "a repeated (user, item) keeps its latest rating"
    if feedback == "implicit":
        duplicates = "a (user, item) pair's events sum into one interaction at its first time"
    return {
        "metarec_version": __version__,
        "source": source,
        "feedback": feedback,
        **({"event_weights": event_weights} if feedback == "implicit" else {}),
        "protocol": {
            "query_size": protocol.query_size,
            "min_ratings": protocol.min_ratings,
            "max_ratings": protocol.max_ratings,
            "min_support": protocol.min_support,
            "split": list(protocol.split),
            "item_cut_year": protocol.cut_year,
            "item_cut_auto": cut_auto,
            "seed": protocol.seed,
            "duplicates": duplicates,
        },
        "counts": {
            "ratings_raw": n_raw,
            "ratings_kept": len(ratings),
            "users_kept": int(ratings["user"].nunique()),
            "users": enc.users.num_rows,
            "items": enc.items.num_rows,
            "items_rated": int(ratings["item"].nunique()),
        },
        "dropped": dropped,
        "ratings": {
            "min": float(r.min()),
            "max": float(r.max()),
            "mean": float(r.mean()),
            "has_timestamps": "timestamp" in ratings,
        },
        "features": {
            "item": ["genre", "year_bucket"],
            "user": list(USER_FEATURES) if enc.has_user_features else [],
            "has_user_features": enc.has_user_features,
        },
        "vocab_sizes": {k: len(v) for k, v in enc.vocab.items()},
        "vocab": enc.vocab,
        "scenarios": {
            name: {
                split: {
                    "tasks": t.num_rows,
                    "support_ratings": int(_list_len(t, "support_items")),
                    "query_ratings": int(_list_len(t, "query_items")),
                }
                for split, t in splits.items()
            }
            for name, splits in tasks.items()
        },
        "skipped_scenarios": skipped,
    }


def _list_len(table: Any, column: str) -> int:
    return pc.sum(pc.list_value_length(table.column(column))).as_py() or 0
