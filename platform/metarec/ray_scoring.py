"""Scoring test users with Ray Data: ``evaluate --workers N``.

The driver fits and tunes every method (``evaluate.fit_methods``); what grows with the test
users and the catalogue is scoring them, every method against every item. That part is
spread here: the test split's task table becomes a Ray Dataset of chunks of users (at least
one per worker), ``map_batches`` runs ``ScoreBatch`` actors (each holds every method's
scorer, put once in the object store), and each chunk comes back as per-task metric
columns. The driver puts the rows back in split order by a row number, so the results are
those of ``evaluate.score_methods`` in one process (equal to float rounding: a chunk pads
to its own longest support).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from metarec.batch import from_table
from metarec.evaluate import ScoreMethods, score_chunk

__all__ = ["ScoreBatch", "ray_score_methods"]

ROW = "__row"
CHUNK = 1024  # users scored at once by a worker (``evaluate.score_tasks``'s chunk)


class ScoreBatch:
    """One Ray Data actor: every method's per-task metrics for a chunk of test tasks."""

    def __init__(self, scorers: list[Any], n_items: int, threshold: float):
        import ray

        torch.set_num_threads(1)  # one CPU (or less, on a small node) per actor
        # [ObjectRef]: put once by the driver, read by every actor (a ref inside a list is
        # not resolved by Ray, so the actor's constructor arguments stay small)
        self.scorers: dict[str, Any] = ray.get(scorers[0])
        self.n_items, self.threshold = n_items, threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        tasks = from_table(batch)
        columns: dict[str, Any] = {ROW: batch.column(ROW)}
        for method, scorer in self.scorers.items():
            for metric, values in score_chunk(scorer, tasks, self.n_items, self.threshold).items():
                columns[f"{method}\t{metric}"] = values.numpy()
        return pa.table(columns)


def ray_score_methods(workers: int, *, chunk: int = CHUNK) -> ScoreMethods:
    """``evaluate.score_methods`` on ``workers`` Ray Data actors (Ray already connected):
    they read the Arrow ``table``; the padded ``tasks`` stay in the driver."""

    def score(
        scorers: dict[str, Any],
        tasks: Any,
        table: pa.Table,
        *,
        n_items: int,
        relevance_threshold: float,
        desc: str = "",
    ) -> dict[str, dict[str, Tensor]]:
        import ray

        cpus = ray.cluster_resources().get("CPU", 1.0)
        share = min(1.0, cpus / workers)  # < 1 on a small node: the actors still start
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # evaluate logs its own ETA
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = table.append_column(ROW, pa.array(np.arange(table.num_rows)))
        size = max(1, min(chunk, -(-rows.num_rows // workers)))  # every worker gets a block
        blocks = [rows.slice(lo, size) for lo in range(0, rows.num_rows, size)]
        out = (
            ray.data.from_arrow(blocks)
            .map_batches(
                ScoreBatch,
                fn_constructor_kwargs={
                    "scorers": [ray.put(scorers)],
                    "n_items": n_items,
                    "threshold": relevance_threshold,
                },
                batch_size=size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=share,
            )
            .to_arrow_refs()
        )
        scored = pa.concat_tables(ray.get(out))
        got = scored.column(ROW).to_numpy()
        if not np.array_equal(np.sort(got), np.arange(table.num_rows)):
            raise RuntimeError(f"{desc}: Ray Data returned {len(got)} of {table.num_rows} tasks")
        order = np.argsort(got, kind="stable")
        result: dict[str, dict[str, Tensor]] = {m: {} for m in scorers}
        for name in scored.column_names:
            if name != ROW:
                method, metric = name.split("\t")
                result[method][metric] = torch.from_numpy(scored.column(name).to_numpy()[order])
        return result

    return score
