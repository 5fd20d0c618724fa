"""The loop each Ray Train worker runs (``metarec.train`` is its driver).

Rebuild the learner from the driver's initial checkpoint, restore the latest checkpoint if
the group restarted (or a resumed run's), keep this rank's share of the training tasks
(``loop.rank_rows``), then ``loop.run_epochs`` with one all-reduce of the meta-gradients per
meta-batch; every worker validates its share of the users (all-reduced), and rank 0
checkpoints and logs every epoch.
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from metarec.batch import RaggedTasks, TaskBatch, ragged_from_blocks
from metarec.checkpoint import (
    learner_from_checkpoint,
    load_checkpoint,
    make_checkpoint,
    save_checkpoint,
)
from metarec.config import MetarecConfig
from metarec.errors import ConfigError
from metarec.loop import (
    Shard,
    best_key,
    build_optimizer,
    cfg_dtype,
    rank_rows,
    run_epochs,
    shard_summary,
    valid_key,
)
from metarec.train_state import TrainState

__all__ = ["worker_loop"]


def worker_loop(config: dict[str, Any]) -> None:
    """Per-worker: rebuild, restore, read the shard, ``run_epochs``, report every epoch."""
    import ray.train
    import torch.distributed as dist

    from metarec.tracking import EpochLogger

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    init = config["init"]
    cfg = MetarecConfig.from_dict(init["config"], where="run config")
    device = ray.train.torch.get_device()
    learner = learner_from_checkpoint(init, best=False).to(device, cfg_dtype(cfg)).train()
    # the weights now live in the learner: held for the whole run, a copy would only cost RSS
    config["init"] = init = {k: v for k, v in init.items() if k != "learner"}
    optimizer = build_optimizer(learner, cfg)
    state = TrainState()
    if (restored := ray.train.get_checkpoint()) is not None:
        with restored.as_directory() as d:
            ckpt = load_checkpoint(d, dataset_hash=init["dataset_hash"])
    elif config["resume_from"]:
        ckpt = load_checkpoint(config["resume_from"], dataset_hash=init["dataset_hash"])
    else:
        ckpt = None
    if ckpt is not None:
        learner.load_state_dict(ckpt["learner"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = TrainState.from_dict(ckpt["state"])
        del ckpt  # (its weights' copy, as above)

    tasks = _read(ray.train.get_dataset_shard("train"), rank=rank, world=world, flat=True)
    summaries = [shard_summary(tasks)]
    all_reduce = None
    if world > 1:
        summaries = [None] * world
        dist.all_gather_object(summaries, shard_summary(tasks))
        all_reduce = _Collective(device)

    shard = Shard.gathered(tasks, summaries)
    # each worker validates its share of the users (every world-th, as for training), flat:
    # padded only chunk by chunk (``loop.valid_totals``); one worker validates as in process
    valid = _read(ray.train.get_dataset_shard("valid"), rank=rank, world=world, flat=world > 1)
    read_peak = _largest_peak_rss_mb(world)
    key = valid_key(learner.feedback)
    logger = EpochLogger(config["tracking_uri"], config["run_id"], key) if rank == 0 else None
    if logger is not None:
        logger.log(state.history)  # epochs a crash left unlogged
    clock = [time.perf_counter()]

    def on_epoch(state: TrainState, row: dict[str, float]) -> None:
        now = time.perf_counter()
        row["train/epoch_s"] = now - clock[0]
        row["train/tasks_per_s"] = len(shard.lengths) / row["train/epoch_s"]
        # the largest worker's peak RSS once it held its data, and so far
        row["train/worker_read_peak_mb"] = read_peak
        row["train/worker_peak_mb"] = _largest_peak_rss_mb(world)
        clock[0] = now
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                ck = make_checkpoint(
                    cfg,
                    learner,
                    optimizer,
                    state,
                    dataset_hash=init["dataset_hash"],
                    catalog=init.get("catalog"),
                )
                save_checkpoint(ck, d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            finished = state.stopped or state.epoch >= cfg.train.epochs
            # epochs_done/finished: for Tune's scheduler and the sweep summary (not MLflow)
            # best/valid_mae (ratings): the best so far, what metarec ranks trials by (Tune's)
            report = {
                **row,
                best_key(learner.feedback): state.best_valid_mae,
                "epochs_done": state.epoch,
                "finished": float(finished),
            }
            ray.train.report(report, checkpoint=checkpoint)
        if logger is not None:
            logger.log([row])

    run_epochs(
        cfg,
        learner,
        optimizer,
        shard,
        valid,
        state,
        all_reduce=all_reduce,
        on_epoch=on_epoch,
        expected_tasks=config["expected_tasks"],
    )


def _largest_peak_rss_mb(world: int) -> float:
    """The largest peak resident memory (MB) of any worker so far (``ru_maxrss``; all
    workers must call it together)."""
    import torch.distributed as dist

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


class _Collective:
    """Sum a tensor across the workers in place (gloo on CPU, NCCL on GPU); ``start``
    begins it in the background and returns what waits for it (``loop.train_epoch`` cuts
    the next meta-batch meanwhile)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, t: torch.Tensor) -> None:
        self.start(t)()

    def start(self, t: torch.Tensor) -> Callable[[], None]:
        import torch.distributed as dist

        on_device = t.to(self.device)
        work = dist.all_reduce(on_device, async_op=True)

        def wait() -> None:
            work.wait()
            if on_device is not t:
                t.copy_(on_device)

        return wait


def _read(
    iterator: Any, *, rank: int = 0, world: int = 1, flat: bool = False
) -> TaskBatch | RaggedTasks:
    """``rank``'s tasks (``loop.rank_rows``; all of them when ``world`` is 1) from Ray Data:
    padded (the same tensors ``batch.from_table`` gives), or ``flat`` (training: heavy
    users pad nobody).

    The blocks come zero-copy from Ray's object store; this rank's rows of each (``rank_rows``
    needs every block's user ids first) are copied straight into the flat store
    (``batch.ragged_from_blocks``), so what this worker holds is its share, once.
    """
    blocks = list(iterator.iter_batches(batch_format="pyarrow", batch_size=None))
    if not blocks:
        raise ConfigError("train: a worker received no tasks; use fewer workers")
    mine = None
    if world > 1:
        ids = np.concatenate([b.column("user").to_numpy() for b in blocks]).astype(np.int64)
        users = torch.as_tensor(ids)
        mine = users[rank_rows(users, rank, world)].numpy()
    # user-id order when split, as rank_rows lists them
    tasks = ragged_from_blocks(blocks, mine, by_user=world > 1)
    return tasks if flat else tasks.select(torch.arange(tasks.num_tasks))
