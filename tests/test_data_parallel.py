"""Data-parallel meta-training logic without Ray: N shards in threads equal one process.

Each thread plays a Ray Train worker holding part of the tasks; ``all_reduce`` sums through
a barrier. In float64 the trajectories must agree to rounding (1e-9): that proves the
batching and gradient-sum logic is exact, so any larger gap seen on Ray in float32 is
rounding amplified by Adam, not a different computation.
"""

from __future__ import annotations

import threading

import torch

from metarec.batch import from_table
from metarec.config import apply_overrides
from metarec.loop import (
    Shard,
    TrainState,
    build_learner,
    build_optimizer,
    run_epochs,
    shard_summary,
)


class BarrierSum:
    """In-place sum across ``n`` threads, in rank order (deterministic)."""

    def __init__(self, n: int) -> None:
        self.barrier, self.parts = threading.Barrier(n), [None] * n

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> None:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].clone())
            self.barrier.wait()
            t.copy_(total)

        return all_reduce


def _run(cfg, ds, n_workers: int) -> list[dict[str, float]]:
    train = from_table(ds.tasks("user_cold", "train"))
    valid = from_table(ds.tasks("user_cold", "valid"))
    init = build_learner(cfg, ds, train).double().state_dict()
    # Uneven, interleaved shards: worker w holds tasks w, w + n, ...; worker 0 one more.
    parts = [train.select(torch.arange(w, train.num_tasks, n_workers)) for w in range(n_workers)]
    summaries = [shard_summary(p) for p in parts]
    sync = BarrierSum(n_workers)
    histories: list = [None] * n_workers

    def worker(rank: int) -> None:
        learner = build_learner(cfg, ds, train).double()
        learner.load_state_dict(init)
        shard = Shard.gathered(parts[rank].to("cpu", next(learner.parameters()).dtype), summaries)
        state = run_epochs(
            cfg,
            learner,
            build_optimizer(learner, cfg),
            shard,
            valid.to("cpu", next(learner.parameters()).dtype) if rank == 0 else None,
            TrainState(),
            all_reduce=sync.for_rank(rank) if n_workers > 1 else None,
        )
        histories[rank] = state.history

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (
        histories[1:] == histories[:-1]
        or n_workers == 1
        or all(
            [r["valid/mae"] for r in h] == [r["valid/mae"] for r in histories[0]] for h in histories
        )
    )
    return histories[0]


def test_three_workers_take_exactly_the_steps_of_one(synthetic_cfg, synthetic_prepared):
    cfg = apply_overrides(synthetic_cfg, **{"train.epochs": 2, "meta.inner_steps": 2})
    one = _run(cfg, synthetic_prepared, 1)
    three = _run(cfg, synthetic_prepared, 3)
    for a, b in zip(one, three, strict=True):
        assert abs(a["train/query_loss"] - b["train/query_loss"]) < 1e-9
        assert abs(a["valid/mae"] - b["valid/mae"]) < 1e-9
