"""In-process meta-training: epochs of meta-batches, validation, early stopping.

A plain function of (config, dataset): Ray Train's per-worker loop calls the same pieces
(``build_learner``, ``train_epoch``, ``predict_query``), so one process and N workers run
identical code. Deterministic under ``cfg.seed`` (explicit ``torch.Generator``s, no global
RNG state in the core).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metarec.baselines import MFFoldIn
from metarec.batch import TaskBatch, bucketed_batches, from_table
from metarec.config import MetarecConfig
from metarec.data.prepared import PreparedDataset
from metarec.meta import MetaLearner, meta_gradients, predict
from metarec.model import Recommender, dataset_features

__all__ = [
    "FitResult",
    "build_learner",
    "fit",
    "predict_items",
    "predict_query",
    "resolve_device",
    "train_epoch",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_ratings_mean(train: TaskBatch) -> float:
    _, ratings, mask = train.merged()
    return float(ratings[mask].mean())


def build_learner(cfg: MetarecConfig, ds: PreparedDataset, train: TaskBatch) -> MetaLearner:
    """The model sized for ``ds``, initialised from ``cfg.seed``; items rated in ``train``
    get id embeddings, all others fall back to their features."""
    torch.manual_seed(cfg.seed)  # parameter init only; batching uses its own generator
    items, _, mask = train.merged()
    seen = torch.zeros(ds.manifest["counts"]["items"], dtype=torch.bool)
    seen[items[mask]] = True
    m = cfg.model
    model = Recommender(
        dataset_features(ds, seen_items=seen),
        embedding_dim=m.embedding_dim,
        hidden=m.hidden,
        item_id_embedding=m.item_id_embedding,
        use_user_features=m.user_features,
        global_mean=train_ratings_mean(train),
    )
    with torch.no_grad():  # start item biases at shrunk item means: hours of Adam saved
        model.item_bias.copy_(_item_bias_init(train, len(seen), model.global_mean))
        if m.pretrain_items and m.item_id_embedding:
            _pretrain_item_embeddings(model, train, seed=cfg.seed)
    return MetaLearner(model, cfg.meta)


def _pretrain_item_embeddings(model: Recommender, train: TaskBatch, *, seed: int) -> None:
    """Start item-id embeddings (and biases) at biased-MF item factors of the training users.

    ALS sees every training rating at once and regularizes rare items toward zero, which a
    few hundred meta-batches cannot match; meta-training then refines the factors for
    few-step adaptation instead of discovering them.
    """
    table = model.emb["item"]
    mf = MFFoldIn(dim=table.shape[1], reg=10.0, iters=8, seed=seed)
    mf.fit(train, n_items=table.shape[0] - 1)
    factors = mf.item_factors_.to(table.dtype)
    scale = table[1:].std() / factors.std().clamp_min(1e-8)
    table[1:] = factors * scale
    model.item_bias.copy_(mf.item_bias_.to(model.item_bias.dtype))


def _item_bias_init(train: TaskBatch, n_items: int, mu: Tensor, shrinkage: float = 5.0) -> Tensor:
    items, ratings, mask = train.merged()
    sums = torch.zeros(n_items).index_add_(0, items[mask], ratings[mask] - mu)
    counts = torch.zeros(n_items).index_add_(0, items[mask], torch.ones_like(ratings[mask]))
    return sums / (counts + shrinkage)


def train_epoch(
    learner: MetaLearner,
    optimizer: torch.optim.Optimizer,
    train: TaskBatch,
    generator: torch.Generator,
) -> float:
    """One pass over ``train`` in bucketed meta-batches; returns the mean query loss."""
    cfg = learner.cfg
    lengths = train.support_mask.sum(1) + train.query_mask.sum(1)
    query_size = int(train.query_mask.sum(1).max())
    total, n = torch.zeros(()), 0
    for index in bucketed_batches(lengths, cfg.meta_batch_size, generator):
        batch = train.select(index)
        if cfg.resample_query:
            batch = batch.resampled(query_size, generator)
        optimizer.zero_grad(set_to_none=True)
        metrics = meta_gradients(learner, batch.to(_device(learner)))
        torch.nn.utils.clip_grad_norm_(learner.parameters(), cfg.grad_clip)
        optimizer.step()
        total += metrics["query_loss"].cpu() * batch.num_tasks
        n += batch.num_tasks
    return float(total / max(n, 1))


def _device(learner: MetaLearner) -> torch.device:
    return next(learner.parameters()).device


def predict_items(
    learner: MetaLearner,
    tasks: TaskBatch,
    items: Tensor,
    *,
    steps: int | None = None,
    inner_lr: float | None = None,
    chunk: int = 256,
) -> Tensor:
    """Adapt on each task's support set, then score ``items`` (T, N): (T, N), chunked.

    The one evaluation/serving path: the same ``learner.adapt`` as training, with the
    learner's own steps and (meta-learned) step sizes unless overridden (fine-tune baseline).
    """
    params = {n: p.detach() for n, p in learner.params().items()}
    lrs = learner.lrs() if inner_lr is None else inner_lr
    lrs = {n: v.detach() for n, v in lrs.items()} if isinstance(lrs, dict) else lrs
    device = _device(learner)
    out = []
    for lo in range(0, tasks.num_tasks, chunk):
        idx = torch.arange(lo, min(lo + chunk, tasks.num_tasks))
        b = tasks.select(idx).to(device)
        support = (b.users, b.support_items, b.support_ratings, b.support_mask)
        fast = learner.adapt(params, support, steps=steps, inner_lr=lrs)
        with torch.no_grad():
            out.append(predict(learner.model, fast, items[idx].to(device), b.users).cpu())
    return torch.cat(out)


def predict_query(learner: MetaLearner, tasks: TaskBatch, *, chunk: int = 256) -> Tensor:
    """Adapted predictions of every task's query: (T, Q)."""
    return predict_items(learner, tasks, tasks.query_items, chunk=chunk)


def masked_mae(pred: Tensor, tasks: TaskBatch) -> float:
    m = tasks.query_mask
    per_task = ((pred - tasks.query_ratings).abs() * m).sum(1) / m.sum(1).clamp_min(1)
    return float(per_task.mean())


def build_optimizer(learner: MetaLearner, cfg: MetarecConfig) -> torch.optim.Optimizer:
    """Adam over the meta-parameters; item-id parameters get ``item_lr_scale`` x the lr
    (0 freezes pretrained item factors and biases, see ``model.pretrain_items``)."""
    item = {"model.emb.item", "model.item_bias"}
    named = list(learner.named_parameters())
    groups = [
        {"params": [p for n, p in named if n not in item], "lr": cfg.meta.outer_lr},
        {
            "params": [p for n, p in named if n in item],
            "lr": cfg.meta.outer_lr * cfg.meta.item_lr_scale,
        },
    ]
    return torch.optim.Adam(groups, lr=cfg.meta.outer_lr, weight_decay=cfg.meta.weight_decay)


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
) -> FitResult:
    """Meta-train on ``scenario``'s train split with early stopping on valid MAE.

    Returns the learner with the weights of its best validation epoch.
    """
    scenario = scenario or cfg.train.scenario
    train = from_table(ds.tasks(scenario, "train"))
    valid = from_table(ds.tasks(scenario, "valid"))
    learner = build_learner(cfg, ds, train).to(resolve_device(cfg.train.device))
    optimizer = build_optimizer(learner, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    best = FitResult(learner, -1, math.inf)
    best_state = copy.deepcopy(learner.state_dict())
    for epoch in range(cfg.train.epochs):
        learner.train()
        loss = train_epoch(learner, optimizer, train, generator)
        mae = masked_mae(predict_query(learner, valid, chunk=cfg.train.eval_batch_size), valid)
        row = {"epoch": epoch, "train/query_loss": loss, "valid/mae": mae}
        best.history.append(row)
        if progress is not None:
            progress(row)
        if mae < best.best_valid_mae:
            best.best_epoch, best.best_valid_mae = epoch, mae
            best_state = copy.deepcopy(learner.state_dict())
        elif epoch - best.best_epoch >= cfg.train.patience:
            break
    learner.load_state_dict(best_state)
    return best
