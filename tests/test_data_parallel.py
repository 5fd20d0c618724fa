"""Data-parallel meta-training logic without Ray: N shards in threads equal one process.

Each thread plays a Ray Train worker holding the part of the tasks ``loop.rank_rows`` gives
its rank (the split Ray workers use); ``all_reduce`` sums through a barrier. In float64 the
trajectories must agree to rounding (1e-9): that proves the batching and gradient-sum logic
is exact, so any larger gap seen on Ray in float32 is rounding amplified by Adam, not a
different computation.
"""

from __future__ import annotations

import threading

import pytest
import torch

from metarec.batch import from_table
from metarec.config import apply_overrides
from metarec.initialise import build_learner
from metarec.loop import (
    Shard,
    TaskCoverageError,
    build_optimizer,
    check_coverage,
    rank_rows,
    run_epochs,
    shard_summary,
)
from metarec.train_state import TrainState

TIMEOUT_S = 120  # a worker that fails leaves the others at the barrier: fail, don't hang


class BarrierSum:
    """In-place sum across ``n`` threads, in rank order (deterministic).

    Keeps every int64 tensor each rank contributes: those are the per-task visit counts of
    ``loop.check_coverage``, i.e. which tasks each worker trained on in each epoch.
    """

    def __init__(self, n: int) -> None:
        self.barrier, self.parts = threading.Barrier(n, timeout=TIMEOUT_S), [None] * n
        self.counts: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> None:
            if t.dtype == torch.int64:
                self.counts[rank].append(t.clone())
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.parts[1:], self.parts[0].clone())
            self.barrier.wait()
            t.copy_(total)

        return all_reduce


class Deferred:
    """A worker's all-reduce whose ``start`` sums only when waited on, as a background
    collective may: whatever ``train_epoch`` does between the two (cutting the next
    meta-batch) must not read the sum."""

    def __init__(self, all_reduce) -> None:
        self.all_reduce, self.started = all_reduce, 0

    def __call__(self, t: torch.Tensor) -> None:
        self.all_reduce(t)

    def start(self, t: torch.Tensor):
        self.started += 1
        return lambda: self.all_reduce(t)


def _run(cfg, ds, n_workers: int, *, drop: int = 0, deferred: list | None = None):
    """Train ``n_workers`` threads; ``drop`` tasks are withheld from the last worker (a
    lossy split). Returns rank 0's history, the per-rank users and the visit counts."""
    train = from_table(ds.tasks("user_cold", "train"))
    valid = from_table(ds.tasks("user_cold", "valid"))
    init = build_learner(cfg, ds, train).double().state_dict()
    parts = [train.select(rank_rows(train.users, r, n_workers)) for r in range(n_workers)]
    if drop:
        parts[-1] = parts[-1].select(torch.arange(parts[-1].num_tasks - drop))
    summaries = [shard_summary(p) for p in parts]
    sync = BarrierSum(n_workers)
    reducers = [sync.for_rank(rank) if n_workers > 1 else None for rank in range(n_workers)]
    if deferred is not None:  # collects the Deferred reducers it used
        reducers = [Deferred(r) for r in reducers]
        deferred.extend(reducers)
    histories: list = [None] * n_workers
    errors: list = [None] * n_workers

    def worker(rank: int) -> None:
        learner = build_learner(cfg, ds, train).double()
        learner.load_state_dict(init)
        shard = Shard.gathered(parts[rank].to("cpu", next(learner.parameters()).dtype), summaries)
        try:
            state = run_epochs(
                cfg,
                learner,
                build_optimizer(learner, cfg),
                shard,
                valid.to("cpu", next(learner.parameters()).dtype) if rank == 0 else None,
                TrainState(),
                all_reduce=reducers[rank],
                expected_tasks=train.num_tasks,
            )
            histories[rank] = state.history
        except Exception as e:  # re-raised in the test's thread below
            errors[rank] = e

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT_S * 5)
        assert not t.is_alive(), "a worker thread hung"
    for e in errors:
        if e is not None:
            raise e
    return histories[0], [p.users for p in parts], sync.counts


def test_three_workers_take_exactly_the_steps_of_one(synthetic_cfg, uneven_prepared):
    cfg = apply_overrides(synthetic_cfg, **{"train.epochs": 2, "meta.inner_steps": 2})
    one, _, _ = _run(cfg, uneven_prepared, 1)
    three, users, counts = _run(cfg, uneven_prepared, 3)  # 481 tasks: 161, 160, 160
    # the next meta-batch is cut while a step's sum runs in the background: the same steps
    used: list = []
    later = _run(cfg, uneven_prepared, 3, deferred=used)[0]
    steps = ("train/query_loss", "valid/mae")
    assert [[r[k] for k in steps] for r in later] == [[r[k] for k in steps] for r in three]
    assert all(d.started > 2 * 5 for d in used)  # every meta-batch of both epochs started
    for a, b in zip(one, three, strict=True):
        assert abs(a["train/query_loss"] - b["train/query_loss"]) < 1e-9
        assert abs(a["valid/mae"] - b["valid/mae"]) < 1e-9
    # What each worker trained on, epoch by epoch: its own tasks, each once, and nothing
    # else; together every task (loss and MAE are all-reduced, so they cannot show this).
    canonical = torch.cat(users).sort().values
    n = len(canonical)
    assert [len(u) for u in users] == [161, 160, 160]
    assert [r["train/tasks"] for r in three] == [n, n]
    for epoch in range(2):
        per_rank = [c[epoch] for c in counts]
        for rank, seen in enumerate(per_rank):
            assert set(seen.unique().tolist()) <= {0, 1}
            assert canonical[seen == 1].tolist() == users[rank].sort().values.tolist()
        assert torch.equal(sum(per_rank), torch.ones(n, dtype=torch.int64))


def test_a_training_item_table_syncs_its_touched_rows_with_the_dense_sums(
    synthetic_cfg, uneven_prepared
):
    """``train.item_sync: sparse`` sends a row mask and the rows any worker touched: the
    same sums as the whole table, so the same steps bit for bit, and as one worker's."""
    cfg = apply_overrides(
        synthetic_cfg, **{"train.epochs": 2, "meta.inner_steps": 2, "meta.item_lr_scale": 0.1}
    )
    one, _, _ = _run(cfg, uneven_prepared, 1)
    sparse, _, _ = _run(cfg, uneven_prepared, 3)
    dense, _, _ = _run(apply_overrides(cfg, **{"train.item_sync": "dense"}), uneven_prepared, 3)
    for a, b, c in zip(one, sparse, dense, strict=True):
        assert b["train/query_loss"] == c["train/query_loss"] and b["valid/mae"] == c["valid/mae"]
        assert abs(a["train/query_loss"] - b["train/query_loss"]) < 1e-9
        assert abs(a["valid/mae"] - b["valid/mae"]) < 1e-9
        assert c["train/allreduce_bytes"] == c["train/allreduce_bytes_dense"]
        assert b["train/allreduce_bytes"] < c["train/allreduce_bytes"]
        assert a["train/allreduce_bytes"] == 0  # one process sends nothing


@pytest.mark.parametrize(("tasks", "world"), [(481, 2), (480, 7), (5, 5), (1, 1), (10, 3)])
def test_rank_rows_partition_any_count_for_any_worker_count(tasks, world):
    users = torch.randperm(10 * tasks, generator=torch.Generator().manual_seed(tasks))[:tasks]
    parts = [users[rank_rows(users, rank, world)] for rank in range(world)]
    assert sorted(torch.cat(parts).tolist()) == sorted(users.tolist())  # each exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    shuffled = users[torch.randperm(tasks, generator=torch.Generator().manual_seed(1))]
    again = [shuffled[rank_rows(shuffled, rank, world)] for rank in range(world)]
    assert [p.tolist() for p in again] == [p.tolist() for p in parts]  # read order is moot


def test_workers_holding_too_few_tasks_fail_before_training(synthetic_cfg, uneven_prepared):
    cfg = apply_overrides(synthetic_cfg, **{"train.epochs": 1, "meta.inner_steps": 1})
    with pytest.raises(TaskCoverageError, match="hold 480 tasks; expected all 481"):
        _run(cfg, uneven_prepared, 2, drop=1)


@pytest.mark.parametrize(
    ("counts", "message"),
    [([1, 0, 1], "1 were not trained on and 0 more"), ([1, 2, 1], "0 were not .* and 1 more")],
)
def test_an_epoch_that_misses_or_repeats_a_task_fails(counts, message):
    with pytest.raises(TaskCoverageError, match=f"epoch 4: .*{message}"):
        check_coverage(torch.tensor(counts), 3, epoch=4)


def test_coverage_sums_over_workers_and_checks_the_manifest_count():
    halves = {0: torch.tensor([1, 0, 1]), 1: torch.tensor([0, 1, 0])}

    def all_reduce(t: torch.Tensor) -> None:  # as if rank 0's counts met rank 1's
        t += halves[1]

    assert check_coverage(halves[0].clone(), 3, epoch=0, all_reduce=all_reduce) == 3
    with pytest.raises(TaskCoverageError, match="expected each of the 4 training tasks"):
        check_coverage(torch.ones(3, dtype=torch.int64), 4, epoch=0)


@pytest.mark.integration  # two float64 epochs of the shop
def test_implicit_training_with_two_workers_takes_the_steps_of_one(shop_cfg, shop_prepared):
    """Negatives are drawn for a whole meta-batch from the shared generator and rejected
    against each worker's own tasks, so sharding leaves them, and the steps, unchanged."""
    cfg = apply_overrides(shop_cfg, **{"train.epochs": 1})
    one, _, _ = _run(cfg, shop_prepared, 1)
    two, _, _ = _run(cfg, shop_prepared, 2)
    for a, b in zip(one, two, strict=True):
        assert abs(a["train/query_loss"] - b["train/query_loss"]) < 1e-9
        assert abs(a["valid/1-ndcg_at_10"] - b["valid/1-ndcg_at_10"]) < 1e-9
