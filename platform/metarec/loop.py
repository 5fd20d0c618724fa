"""In-process meta-training: epochs of meta-batches, validation, early stopping.

A plain function of (config, dataset): Ray Train's per-worker loop runs the same
``run_epochs`` (``train_epoch``, ``predict_query``) on the model the driver built with
``build_learner``, so one process and N workers run identical code. Deterministic under
``cfg.seed``: batching draws from its own ``torch.Generator``; ``build_learner`` seeds
torch's global RNG for the parameter initialisation only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from metarec.batch import (
    RaggedTasks,
    TaskBatch,
    Tasks,
    bucketed_batches,
    from_table,
    ragged_from_table,
)
from metarec.config import MetarecConfig
from metarec.data.prepared import PreparedDataset
from metarec.heap import HeapCeiling
from metarec.implicit_metrics import score_implicit, valid_ndcg
from metarec.initialise import build_learner
from metarec.meta import MetaLearner, meta_gradients, predict, split_shift
from metarec.metrics import masked_mae, task_mae
from metarec.mf import MFFoldIn
from metarec.negatives import keep_negatives
from metarec.train_state import TrainState

__all__ = [
    "VALID_KEYS",
    "EpochPass",
    "FitResult",
    "Shard",
    "TaskCoverageError",
    "allreduce_bytes",
    "best_key",
    "check_coverage",
    "fit",
    "item_tables",
    "predict_items",
    "predict_query",
    "rank_rows",
    "resolve_device",
    "run_epochs",
    "shard_summary",
    "synced_parameters",
    "train_epoch",
    "valid_key",
    "valid_label",
    "valid_objective",
    "with_support_negatives",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cfg_dtype(cfg: MetarecConfig) -> torch.dtype:
    return getattr(torch, cfg.train.dtype)


@dataclass(frozen=True)
class Shard:
    """The tasks one worker holds, placed in the global list meta-batches are cut from.

    Meta-batches are drawn from *all* tasks in a canonical order (by user id) with the
    seeded generator, so every worker draws the same batches; each worker computes the part
    of a batch it holds, and the summed gradients are exactly those of one process holding
    everything. That makes N workers train like 1 (up to float summation order).
    """

    tasks: Tasks  # this worker's tasks (a flat store on Ray workers)
    lengths: Tensor  # (N,) rating count (support + query) of every task, canonical order
    local: Tensor  # (N,) row of each task in ``tasks``, -1 where another worker holds it
    query_size: int  # the largest query of any task (what resampling draws)

    @classmethod
    def whole(cls, tasks: Tasks) -> Shard:
        """All tasks in one process."""
        return cls.gathered(tasks, [shard_summary(tasks)])

    @classmethod
    def gathered(cls, tasks: Tasks, summaries: list[tuple[Tensor, Tensor, int]]) -> Shard:
        """This worker's tasks and every worker's ``(users, lengths, query size)``."""
        users = torch.cat([u for u, _, _ in summaries])
        lengths = torch.cat([n for _, n, _ in summaries])
        order = users.argsort()
        users, lengths = users[order], lengths[order]
        if len(users) > 1 and bool((users[1:] == users[:-1]).any()):
            raise ValueError("a user's task is held by two workers: the data split overlaps")
        mine, mine_order = tasks.users.sort()
        pos = torch.searchsorted(mine, users).clamp_max(max(len(mine) - 1, 0))
        hit = (mine[pos] == users) if len(mine) else torch.zeros_like(users, dtype=torch.bool)
        local = torch.where(hit, mine_order[pos] if len(mine) else pos, -1)
        return cls(tasks, lengths, local, max(q for _, _, q in summaries))


def rank_rows(users: Tensor, rank: int, world: int) -> Tensor:
    """Rows (into ``users``, (T,)) of the tasks worker ``rank`` of ``world`` trains on.

    Every ``world``-th task in user-id order, starting at ``rank``: a partition (each task
    goes to exactly one rank, whatever T and world are), balanced to within one task, and a
    function of the task ids alone, so it is the same whatever order or blocks the tasks
    were read in, and the same again after a worker group restarts.
    """
    return users.argsort(stable=True)[rank::world]


def shard_summary(tasks: Tasks) -> tuple[Tensor, Tensor, int]:
    """What a worker shares with the others to build its ``Shard`` (all-gather this)."""
    support, query = tasks.lengths()
    return tasks.users, support + query, int(query.max()) if tasks.num_tasks else 0


# in-place sum across workers; one with a ``start(t)`` method, which returns what waits for
# the sum, lets a step's collective run while the next meta-batch is cut
AllReduce = Callable[[Tensor], None]
ITEM_PARAMETERS = ("model.emb.item", "model.item_bias")  # one row per item


class TaskCoverageError(RuntimeError):
    """An epoch did not train on every training task exactly once: the split lost tasks."""


def check_coverage(
    seen: Tensor, expected: int, *, epoch: int, all_reduce: AllReduce | None = None
) -> int:
    """Sum every worker's per-task visit counts; raise unless each of ``expected`` tasks
    was trained on exactly once this epoch. Returns the tasks trained on.

    Args:
        seen: (N,) int64, how often this worker trained on each task of the canonical list.
        expected: the training tasks the prepared dataset holds (its manifest's count).
    """
    if all_reduce is not None:
        all_reduce(seen)  # every worker gets the same sum, so all raise or none does
    missed, repeated = int((seen == 0).sum()), int((seen > 1).sum())
    if len(seen) != expected or missed or repeated:
        raise TaskCoverageError(
            f"epoch {epoch}: of the {len(seen)} tasks the workers hold, {missed} were not "
            f"trained on and {repeated} more than once; expected each of the {expected} "
            "training tasks exactly once. The data split across workers lost or duplicated tasks."
        )
    return int(seen.sum())


def synced_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """What a step can move, so what is all-reduced and clipped: a frozen group (lr 0: the
    pretrained item table, most of the parameters of a large catalogue) is neither."""
    return [
        p for g in optimizer.param_groups if g["lr"] > 0 for p in g["params"] if p.requires_grad
    ]


def allreduce_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes a worker sends into a meta-batch's all-reduce with every gradient dense (and
    the loss): what ``train.item_sync: dense`` sends, and the sparse sync's upper bound."""
    params = synced_parameters(optimizer)
    if not params:
        return 0
    return (sum(p.numel() for p in params) + 1) * params[0].element_size()


def item_tables(learner: MetaLearner) -> list[Tensor]:
    """The item-id parameters: one row per item, so a meta-batch's gradient touches only
    the rows of the items its tasks hold (and their negatives)."""
    named = dict(learner.named_parameters())
    return [named[n] for n in ITEM_PARAMETERS if n in named]


def _start_sum(
    params: list[Tensor], loss: Tensor, all_reduce: AllReduce, sparse: list[bool]
) -> Callable[[], tuple[Tensor, int]]:
    """Start summing every gradient and the loss over workers; returns what finishes it
    (writes the summed gradients, returns the loss and the bytes sent).

    The flat collective runs in the background where ``all_reduce`` can (its ``start``
    method returns what waits for it), so the caller cuts the next meta-batch meanwhile.
    Gradients a batch did not produce become zeros (as on a worker that held none of the
    batch), so Adam sees the same thing in 1 or N processes. A ``sparse`` parameter (an item
    table) travels as the rows any worker touched: one all-reduce of a uint8 mask per row
    (the union: a count of the workers that touched it) and then, in the one collective of
    the rest, those rows alone, scattered back into zeros. The sums are the dense ones bit
    for bit (an untouched row is exactly zero everywhere); what shrinks is (rows x dim) to
    (rows + touched x dim).
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    rows: dict[int, Tensor] = {}
    sent = 0
    if any(sparse):
        tables = [i for i, s in enumerate(sparse) if s]
        touched = torch.cat([(grads[i].reshape(len(grads[i]), -1) != 0).any(1) for i in tables])
        touched = touched.to(torch.uint8)
        all_reduce(touched)
        sent += touched.numel()
        for i, part in zip(tables, touched.split([len(grads[i]) for i in tables]), strict=True):
            rows[i] = part.nonzero().squeeze(1)
    parts = [grads[i][rows[i]] if i in rows else g for i, g in enumerate(grads)]
    flat = torch.cat([g.reshape(-1) for g in parts] + [loss.reshape(1).to(grads[0])])
    start, wait = getattr(all_reduce, "start", None), None
    if start is not None:
        wait = start(flat)
    else:
        all_reduce(flat)
    sent += flat.numel() * flat.element_size()

    def finish() -> tuple[Tensor, int]:
        if wait is not None:
            wait()
        offset = 0
        for i, (p, part) in enumerate(zip(params, parts, strict=True)):
            values = flat[offset : offset + part.numel()].view_as(part)
            if i in rows:
                p.grad = torch.zeros_like(p).index_copy_(0, rows[i], values)
            else:
                p.grad = values
            offset += part.numel()
        return flat[-1], sent

    return finish


@dataclass(frozen=True)
class EpochPass:
    """What ``train_epoch`` returns: the loss, the coverage, and where the time went."""

    loss: float  # mean query loss over every task of the epoch
    seen: Tensor  # (N,) int64: this worker's visits to each task (``check_coverage`` sums)
    seconds: float  # the pass alone: no validation, checkpoint or report
    sync_s: float  # blocked in the collectives: the transfer plus waiting for the slowest
    sent_bytes: float  # a meta-batch's mean bytes into the collectives (0 in one process)
    steps: int  # meta-batches


def train_epoch(
    learner: MetaLearner,
    optimizer: torch.optim.Optimizer,
    shard: Shard,
    generator: torch.Generator,
    *,
    all_reduce: AllReduce | None = None,
    item_sync: Literal["sparse", "dense"] = "sparse",
) -> EpochPass:
    """One pass over every task in bucketed meta-batches.

    Every worker runs the same sequence of batches (and of ``all_reduce`` calls: per
    meta-batch the gradients and loss in one flat tensor, after the touched-row mask when a
    training item table syncs ``sparse``); a worker holding none of a batch contributes
    zeros.
    """
    cfg = learner.cfg
    device = _device(learner)
    params = synced_parameters(optimizer)
    moved = {id(p) for p in params}
    # a frozen group's gradients (the pretrained item table): dropped before the step, so
    # Adam, which skips a parameter without one, does no work on what lr 0 cannot move
    frozen = [p for p in learner.parameters() if p.requires_grad and id(p) not in moved]
    sparse = [False] * len(params)
    if all_reduce is not None and item_sync == "sparse":
        tables = {id(t) for t in item_tables(learner)}
        sparse = [id(p) in tables for p in params]
    total = torch.zeros((), dtype=torch.float64)
    seen = torch.zeros(len(shard.lengths), dtype=torch.int64)
    start, sync_s, sent, steps = time.perf_counter(), 0.0, 0, 0
    batches = _cut_batches(learner, shard, generator, seen)
    upcoming = next(batches, None)
    while upcoming is not None:
        size, batch = upcoming
        optimizer.zero_grad(set_to_none=False)
        loss = torch.zeros((), device=device)
        if batch is not None:
            loss = meta_gradients(learner, batch, denominator=size)["query_loss"]
        began = time.perf_counter()
        finish = _start_sum(params, loss, all_reduce or _alone, sparse)
        cut = time.perf_counter()
        upcoming = next(batches, None)  # cut while the collective runs: it reads no weights
        waited = time.perf_counter()
        loss, size_sent = finish()
        sync_s += (cut - began) + (time.perf_counter() - waited)
        sent, steps = sent + size_sent, steps + 1
        for p in frozen:
            p.grad = None
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        total += float(loss) * size
    seconds = time.perf_counter() - start
    sent_bytes = sent / max(steps, 1) if all_reduce is not None else 0.0
    return EpochPass(float(total / len(shard.lengths)), seen, seconds, sync_s, sent_bytes, steps)


def _alone(_: Tensor) -> None:
    """One process: nothing to sum."""


def _cut_batches(
    learner: MetaLearner, shard: Shard, generator: torch.Generator, seen: Tensor
) -> Iterator[tuple[int, TaskBatch | None]]:
    """The epoch's meta-batches as this worker computes them: (the batch's size over all
    workers, this worker's part of it on the learner's device, or None if it holds none).

    Every draw comes from ``generator`` in batch order and none reads the weights, so a
    batch can be cut while the previous step's collective runs. Counts each task this
    worker trains on into ``seen``.
    """
    cfg, device = learner.cfg, _device(learner)
    longest = int(shard.lengths.max())
    for index in bucketed_batches(shard.lengths, cfg.meta_batch_size, generator):
        keys = torch.rand(len(index), longest, generator=generator) if cfg.resample_query else None
        short = None
        if cfg.short_supports > 0:  # this share of tasks keeps a uniform fraction of its support
            draw = torch.rand(len(index), 2, generator=generator)
            short = torch.where(draw[:, 0] < cfg.short_supports, draw[:, 1], 1.0)
        cand = None  # implicit: negatives drawn for the whole batch, so every worker draws alike
        if learner.loss != "mse":
            cand = learner.negative_candidates(len(index), 2 * cfg.negatives, generator)
        rows = shard.local[index]
        mine = rows >= 0
        if not bool(mine.any()):
            yield len(index), None
            continue
        batch = shard.tasks.select(rows[mine])
        seen.index_add_(0, index[mine], torch.ones(len(batch.users), dtype=torch.int64))
        if keys is not None:
            batch = batch.resampled(shard.query_size, keys[mine])
        if cfg.support_window is not None:
            batch = batch.windowed(cfg.support_window)
        if short is not None:
            batch = batch.shortened(short[mine])
        if cand is not None:  # half of each task's negatives to its support, half to its query
            items, _, mask = batch.merged()
            neg, ok = keep_negatives(cand[mine], items, mask, 2 * cfg.negatives)
            batch = batch.with_negatives(*zip(neg.chunk(2, 1), ok.chunk(2, 1), strict=True))
        yield len(index), batch.to(device)


def _device(learner: MetaLearner) -> torch.device:
    return next(learner.parameters()).device


def with_support_negatives(learner: MetaLearner, tasks: TaskBatch) -> TaskBatch:
    """Implicit tasks as the learner adapts on them (``MetaLearner.support_negatives``
    beside each support); ratings tasks as they are."""
    if learner.loss == "mse":
        return tasks
    return tasks.with_negatives(learner.support_negatives(tasks.support_items, tasks.support_mask))


def predict_items(
    learner: MetaLearner,
    tasks: TaskBatch,
    items: Tensor,
    *,
    steps: int | None = None,
    inner_lr: float | dict[str, Tensor] | None = None,
    support_prior: float | None = None,
    prior_scale: float = 1.0,
    chunk: int = 256,
) -> Tensor:
    """Adapt on each task's support set, then score ``items`` (T, N): (T, N), chunked.

    The one evaluation/serving path: the same ``learner.adapt`` as training, with the
    learner's own steps, (meta-learned) step sizes and support prior unless overridden (the
    fine-tune baseline; evaluation's adaptation tuning). Chunks hold ``chunk`` tasks, fewer
    where a long support would pad them past ``chunk`` x ``PADDED_SUPPORT`` rows.
    """
    params = {n: p.detach() for n, p in learner.params().items()}
    lrs = learner.lrs() if inner_lr is None else inner_lr
    lrs = {n: v.detach() for n, v in lrs.items()} if isinstance(lrs, dict) else lrs
    device = _device(learner)
    out = []
    for idx in row_chunks(tasks.support_mask.sum(1), chunk, chunk * PADDED_SUPPORT):
        b = with_support_negatives(learner, tasks.select(idx)).to(device)
        support = (b.users, b.support_items, b.support_ratings, b.support_mask)
        chunk_items = items[idx].to(device)
        with torch.no_grad():  # inference: gradient-based adaptation re-enables what it needs
            fast = learner.adapt(
                params,
                support,
                steps=steps,
                inner_lr=lrs,
                support_prior=support_prior,
                prior_scale=prior_scale,
                at=chunk_items,
            )
            if learner.model.shares_item_side(fast):  # the MLP once per item, not per pair
                fast, shift = split_shift(fast, chunk_items)
                out.append(learner.model.predict_shared(fast, chunk_items, shift=shift).cpu())
            else:
                out.append(predict(learner.model, fast, chunk_items, b.users).cpu())
    return torch.cat(out)


# Support rows per task a chunk may pad to, on average. Sets the peak of a validating
# worker (and of evaluation) once heavy users exist: a chunk of a few long supports costs
# as much as 256 short ones. Every chunk of supports this short or shorter is whole.
PADDED_SUPPORT = 128


def row_chunks(lengths: Tensor, most: int, max_rows: int) -> list[Tensor]:
    """Consecutive task index chunks of at most ``most`` tasks, each cut earlier where its
    longest task times its size would pass ``max_rows`` (at least one task a chunk): a user
    with 8,000 support ratings pads a few others, not 255. Short supports (every chunk
    under the budget) give exactly ``range(0, T, most)``'s chunks."""
    out, lo, n = [], 0, len(lengths)
    while lo < n:
        longest = lengths[lo : lo + most].cummax(0).values
        fits = (longest * torch.arange(1, len(longest) + 1)) <= max_rows
        k = max(1, int(fits.sum()) if bool(fits.all()) else int(fits.int().argmin()))
        out.append(torch.arange(lo, lo + k))
        lo += k
    return out


def predict_query(learner: MetaLearner, tasks: TaskBatch, *, chunk: int = 256) -> Tensor:
    """Adapted predictions of every task's query: (T, Q)."""
    return predict_items(learner, tasks, tasks.query_items, chunk=chunk)


# What early stopping minimises, by the dataset's feedback kind (``valid_objective``).
VALID_KEYS = {"explicit": "valid/mae", "implicit": "valid/1-ndcg_at_10"}


def valid_key(feedback: str) -> str:
    """The per-epoch history (and MLflow) key of ``valid_objective``."""
    return VALID_KEYS[feedback]


def valid_label(key: str) -> str:
    """How a person reads ``key`` (a ``VALID_KEYS`` value) in a progress line."""
    return "valid MAE" if key == "valid/mae" else "valid 1-NDCG@10"


def best_key(feedback: str) -> str:
    """The key of the best ``valid_objective`` so far: ``best/valid_mae`` on ratings, what
    Tune ranks trials by and the model registry compares champions on."""
    return "best/" + valid_key(feedback).replace("/", "_")


def valid_objective(learner: MetaLearner, valid: TaskBatch, *, chunk: int = 256) -> float:
    """What early stopping minimises: the query MAE on ratings; on implicit data
    1 - NDCG@10 of the adapted ranking of the whole catalogue (support items excluded),
    the metric the implicit baselines are chosen by."""
    if learner.loss == "mse":
        return masked_mae(predict_query(learner, valid, chunk=chunk), valid)
    n = learner.model.item_genres.shape[0]
    return 1.0 - valid_ndcg(_Adapted(learner, chunk), valid, n)


def valid_totals(learner: MetaLearner, valid: Tasks, *, chunk: int = 256) -> Tensor:
    """A worker's share of ``valid_objective``: (sum of the per-user values it averages,
    users counted), float64, to be summed across workers: validation sharded like training,
    so no worker idles while one validates every user.

    ``valid`` may be flat (``RaggedTasks``, what a Ray worker holds): on ratings each chunk
    is padded only as it is scored, the chunks ``predict_items`` would cut.
    """
    if valid.num_tasks == 0:
        return torch.zeros(2, dtype=torch.float64)
    if learner.loss == "mse":
        parts = []
        ceiling = HeapCeiling()  # chunks of every shape: their freed pages go back
        for idx in row_chunks(valid.lengths()[0], chunk, chunk * PADDED_SUPPORT):
            part = valid.select(idx)
            pred = predict_query(learner, part, chunk=chunk)
            parts.append(task_mae(pred, part.query_ratings, part.query_mask))
            del part, pred
            ceiling.check()
        per_user = torch.cat(parts)
    else:
        if isinstance(valid, RaggedTasks):  # the ranking metrics score whole tasks
            valid = valid.select(torch.arange(valid.num_tasks))
        n = learner.model.item_genres.shape[0]
        per_user = 1.0 - score_implicit(_Adapted(learner, chunk), valid, n)[0]["ndcg@10"]
    per_user = per_user.double()
    counted = ~per_user.isnan()
    return torch.stack([per_user[counted].sum(), counted.sum().double()])


@dataclass(frozen=True)
class _Adapted:
    learner: MetaLearner
    chunk: int

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        return predict_items(self.learner, tasks, items, chunk=self.chunk)


def build_optimizer(learner: MetaLearner, cfg: MetarecConfig) -> torch.optim.Optimizer:
    """Adam over the meta-parameters; item-id parameters get ``item_lr_scale`` x the lr
    (0 freezes pretrained item factors and biases, see ``model.pretrain_items``).

    A frozen table no task adapts also stops taking gradients: its backward (a dense
    items x dim tensor every meta-batch) and Adam's pass over it would move nothing.
    """
    item = set(ITEM_PARAMETERS)
    named = list(learner.named_parameters())
    if cfg.meta.item_lr_scale == 0:
        adapted = {f"model.{n}" for n in learner.personal}
        for n, p in named:
            if n in item and n not in adapted:
                p.requires_grad_(False)
    groups = [
        {"params": [p for n, p in named if n not in item], "lr": cfg.meta.outer_lr},
        {
            "params": [p for n, p in named if n in item],
            "lr": cfg.meta.outer_lr * cfg.meta.item_lr_scale,
        },
    ]
    return torch.optim.Adam(groups, lr=cfg.meta.outer_lr, weight_decay=cfg.meta.weight_decay)


def run_epochs(
    cfg: MetarecConfig,
    learner: MetaLearner,
    optimizer: torch.optim.Optimizer,
    shard: Shard,
    valid: Tasks | None,  # flat only with all_reduce (each worker's share)
    state: TrainState,
    *,
    all_reduce: AllReduce | None = None,
    on_epoch: Callable[[TrainState, dict[str, float]], None] | None = None,
    expected_tasks: int | None = None,
) -> TrainState:
    """Epochs from ``state.epoch`` on, validation after each, early stopping on valid MAE.

    The one training loop: ``fit`` runs it in-process, each Ray Train worker runs it on its
    shard (``metarec.train``). With ``all_reduce`` each worker validates its own share of the
    validation users (``valid_totals``) and the sums give every worker the same objective,
    so all take the same early-stopping decision.

    Each epoch checks that the workers together trained on every one of ``expected_tasks``
    (default: the tasks in ``shard``) exactly once, and raises ``TaskCoverageError`` if not:
    a data split that drops tasks must fail, not train on less data unnoticed.
    """
    expected = len(shard.lengths) if expected_tasks is None else expected_tasks
    if len(shard.lengths) != expected:
        raise TaskCoverageError(
            f"the workers hold {len(shard.lengths)} tasks; expected all {expected} training "
            "tasks. The data split across workers lost tasks."
        )
    generator = torch.Generator()
    if state.rng is None:
        generator.manual_seed(cfg.seed)
    else:
        generator.set_state(state.rng)
    for epoch in range(state.epoch, cfg.train.epochs):
        if state.stopped:
            break
        learner.train()
        done = train_epoch(
            learner,
            optimizer,
            shard,
            generator,
            all_reduce=all_reduce,
            item_sync=cfg.train.item_sync,
        )
        tasks = check_coverage(done.seen, expected, epoch=epoch, all_reduce=all_reduce)
        chunk, validated = cfg.train.eval_batch_size, time.perf_counter()
        if all_reduce is not None:  # every worker's share, summed
            totals = torch.zeros(2, dtype=torch.float64)
            if valid is not None:
                totals = valid_totals(learner, valid, chunk=chunk)
            all_reduce(totals)
            mae = float(totals[0] / totals[1].clamp_min(1))
        else:
            mae = valid_objective(learner, valid, chunk=chunk) if valid is not None else 0.0
        row = {
            "epoch": epoch,
            "train/query_loss": done.loss,
            valid_key(learner.feedback): mae,
            "train/tasks": tasks,
            "train/allreduce_bytes": done.sent_bytes,
            "train/allreduce_bytes_dense": float(allreduce_bytes(optimizer)),
            "train/pass_s": done.seconds,
            "train/pass_tasks_per_s": tasks / done.seconds,
            "train/sync_s": done.sync_s,
            "train/valid_s": time.perf_counter() - validated,
        }
        state.history.append(row)
        state.epoch, state.rng = epoch + 1, generator.get_state()
        if mae < state.best_valid_mae:
            state.best_epoch, state.best_valid_mae = epoch, mae
            state.best_params = {k: v.detach().clone() for k, v in learner.state_dict().items()}
        state.stopped = epoch - state.best_epoch >= cfg.train.patience
        if on_epoch is not None:
            on_epoch(state, row)
    return state


@dataclass
class FitResult:
    learner: MetaLearner
    best_epoch: int
    best_valid_mae: float
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    *,
    scenario: str | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
    tuned_mf: MFFoldIn | None = None,
) -> FitResult:
    """Meta-train in this process on ``scenario``'s train split (see ``run_epochs``).

    Returns the learner with the weights of its best validation epoch. ``tuned_mf``: see
    ``build_learner``.
    """
    scenario = scenario or cfg.train.scenario
    train = ragged_from_table(ds.tasks(scenario, "train"))  # flat, as Ray workers hold it
    valid = from_table(ds.tasks(scenario, "valid"))
    learner = build_learner(cfg, ds, train, valid, tuned_mf=tuned_mf)
    learner = learner.to(resolve_device(cfg.train.device), cfg_dtype(cfg))
    optimizer = build_optimizer(learner, cfg)
    state = run_epochs(
        cfg,
        learner,
        optimizer,
        Shard.whole(train),
        valid,
        TrainState(),
        on_epoch=None if progress is None else (lambda _, row: progress(row)),
    )
    assert state.best_params is not None
    learner.load_state_dict(state.best_params)
    return FitResult(learner, state.best_epoch, state.best_valid_mae, state.history)
