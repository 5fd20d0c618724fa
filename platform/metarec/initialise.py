"""Building a learner: the network sized for a dataset, and where its weights start.

The one place a ``Recommender`` is built from a config (training, and checkpoints rebuilt
without their dataset), and the one place its item factors start from MF (ALS on the
training users, ``metarec.mf``), so that the untrained model is MF fold-in (plus, with
``model.neighbours``, item-KNN's estimate from the support, weighed per user).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metarec.batch import TaskBatch, Tasks
from metarec.config import DEFAULT_PRIOR_PRECISION, MetarecConfig
from metarec.data.features import USER_FEATURES
from metarec.data.prepared import PreparedDataset
from metarec.meta import MetaLearner
from metarec.mf import (
    MF_GRID,
    MFFoldIn,
    choose_mf,
    cosine_neighbours,
    interaction_counts,
    svd_item_factors,
)
from metarec.model import Features, Recommender

__all__ = [
    "blank_features",
    "build_learner",
    "build_recommender",
    "dataset_features",
]


def dataset_features(ds: PreparedDataset, *, seen_items: Tensor | None = None) -> Features:
    """The network's ``Features`` from a prepared dataset's item and user tables."""
    items = ds.items()
    sizes = dict(ds.manifest["vocab_sizes"])
    n_items = items.num_rows
    genres = items.column("genres").combine_chunks()  # list<int16>, one list per item
    lengths = torch.from_numpy(np.diff(genres.offsets.to_numpy()).astype(np.int64))
    rows = torch.repeat_interleave(torch.arange(n_items), lengths)
    cols = torch.from_numpy(genres.flatten().to_numpy().astype(np.int64))
    multi_hot = torch.zeros(n_items, sizes["genre"])
    multi_hot[rows, cols] = 1.0
    multi_hot /= multi_hot.sum(1, keepdim=True).clamp_min(1.0)
    user_table = None
    if ds.manifest["features"]["has_user_features"]:
        users = ds.users()
        user_table = torch.stack(
            [torch.as_tensor(users.column(c).to_numpy().astype("int64")) for c in USER_FEATURES], 1
        )
    return Features(
        item_genres=multi_hot,
        item_year=torch.as_tensor(items.column("year_bucket").to_numpy().astype("int64")),
        item_seen=seen_items if seen_items is not None else torch.ones(n_items, dtype=torch.bool),
        user_table=user_table,
        vocab_sizes=sizes,
        user_names=USER_FEATURES if user_table is not None else (),
    )


def blank_features(spec: dict[str, Any]) -> Features:
    """Zero tables of a checkpoint's shapes (``spec``): its saved state fills them in."""
    sizes = spec["vocab_sizes"]
    n_items, n_users, k = spec["n_items"], spec["n_users"], spec.get("neighbours", 0)
    return Features(
        item_genres=torch.zeros(n_items, sizes["genre"]),
        item_year=torch.zeros(n_items, dtype=torch.long),
        item_seen=torch.ones(n_items, dtype=torch.bool),
        user_table=torch.zeros(n_users, len(USER_FEATURES), dtype=torch.long) if n_users else None,
        vocab_sizes=sizes,
        user_names=USER_FEATURES if n_users else (),
        neighbour_index=torch.zeros(n_items, k, dtype=torch.int32) if k else None,
        neighbour_sim=torch.zeros(n_items, k) if k else None,
    )


def build_recommender(
    cfg: MetarecConfig, features: Features, global_mean: float = 0.0
) -> Recommender:
    m = cfg.model
    return Recommender(
        features,
        embedding_dim=m.embedding_dim,
        hidden=m.hidden,
        item_id_embedding=m.item_id_embedding,
        use_user_features=m.user_features,
        global_mean=global_mean,
        factor_head=cfg.factor_head,
    )


def build_learner(
    cfg: MetarecConfig,
    ds: PreparedDataset,
    train: Tasks,
    valid: TaskBatch | None = None,
    *,
    tuned_mf: MFFoldIn | None = None,
) -> MetaLearner:
    """The model sized for ``ds``, initialised from ``cfg.seed``; items rated in ``train``
    get id embeddings, all others fall back to their features.

    Implicit data (``ds.feedback``): the output is a logit, item biases start at centred
    log popularity and item factors (``pretrain_items``) at PureSVD of the training users'
    interactions (``mf.svd_item_factors``); the popularity is kept in the learner, for the
    negatives it draws wherever it adapts.

    Explicit data: with ``model.pretrain_items``, item factors start at biased ALS on
    ``train``. With a factor head and ``meta.prior_precision: null`` (the default), the ALS
    dimension and penalty are chosen on ``valid`` users from the ``mf_foldin`` baseline's
    grid, and the penalty becomes the head prior's initial precision: the untrained model
    is then the tuned MF fold-in, whatever the data's scale or taste dynamics, plus
    item-KNN's estimate from the support (``model.neighbours``), weighed per user.
    ``tuned_mf``: that choice, already made on these ``train`` and ``valid`` users
    (evaluation tunes the ``mf_foldin`` baseline on the same grid), so that it is not
    fitted twice.
    """
    torch.manual_seed(cfg.seed)  # parameter init only; batching uses its own generator
    seen = torch.zeros(ds.manifest["counts"]["items"], dtype=torch.bool)
    _, items, ratings = train.flat()
    seen[items] = True
    m, meta = cfg.model, cfg.meta
    features = dataset_features(ds, seen_items=seen)
    if cfg.neighbours:  # the neighbourhood term's graph: item-KNN's, from the training users
        index, sim = cosine_neighbours(train, len(seen), cfg.neighbours)
        features = dataclasses.replace(features, neighbour_index=index, neighbour_sim=sim)
    if ds.feedback == "implicit":
        return _implicit_learner(cfg, features, train)
    model = build_recommender(cfg, features, float(ratings.mean()))
    with torch.no_grad():  # start item biases at shrunk item means: hours of Adam saved
        model.item_bias.copy_(_item_bias_init(train, len(seen), model.global_mean))
        if m.pretrain_items and m.item_id_embedding:
            mf = _item_factors(cfg, train, valid, len(seen), tuned_mf)
            _set_item_embeddings(model, mf.item_factors_, mf.item_bias_)
            if cfg.factor_head:  # the ALS penalty is the head prior's initial precision
                meta = dataclasses.replace(meta, prior_precision=mf.reg)
    learner = MetaLearner(model, meta)
    spread = float(ratings.float().std()) if len(ratings) > 1 else 0.0
    learner.rating_std.fill_(spread if spread > 0 else 1.0)  # one rating value: any δ works
    return learner


def _implicit_learner(cfg: MetarecConfig, features: Features, train: Tasks) -> MetaLearner:
    n_items = features.item_genres.shape[0]
    model = build_recommender(cfg, features, 0.0)
    counts = interaction_counts(train, n_items)
    with torch.no_grad():
        log_pop = counts.log1p()
        bias = (log_pop - log_pop.mean()).float()
        if cfg.model.pretrain_items and cfg.model.item_id_embedding:
            dim = cfg.model.embedding_dim
            _set_item_embeddings(model, svd_item_factors(train, n_items, dim, seed=cfg.seed), bias)
        else:
            model.item_bias.copy_(bias)
    learner = MetaLearner(model, cfg.meta, feedback="implicit")
    learner.item_popularity.copy_(counts)
    return learner


def _item_factors(
    cfg: MetarecConfig,
    train: Tasks,
    valid: TaskBatch | None,
    n_items: int,
    tuned: MFFoldIn | None = None,
) -> MFFoldIn:
    """Biased ALS on the training users: at ``meta.prior_precision`` if set (or without a
    factor head, or without validation users), else the ``mf_foldin`` grid point with the
    lowest fold-in MAE on ``valid`` (dimensions up to ``model.embedding_dim``): ``tuned``
    when given and inside that grid."""
    dim, fixed = cfg.model.embedding_dim, cfg.meta.prior_precision
    if fixed is not None or not cfg.factor_head or valid is None:
        reg = fixed if fixed is not None and cfg.factor_head else DEFAULT_PRIOR_PRECISION
        return MFFoldIn(dim=dim, reg=reg, seed=cfg.seed).fit(train, n_items=n_items)
    grid = [hp for hp in MF_GRID if hp["dim"] <= dim]
    if tuned is None:
        return choose_mf(train, valid, n_items, grid, seed=cfg.seed)
    # the grid was compared on these users already: its best point inside this one
    maes = [m for hp, m in tuned.grid_maes_ if hp in grid]
    best = grid[maes.index(min(maes))]
    if best == {"dim": tuned.dim, "reg": tuned.reg}:
        return tuned
    return MFFoldIn(**best, seed=cfg.seed).fit(train, n_items=n_items)


def _set_item_embeddings(model: Recommender, factors: Tensor, bias: Tensor) -> None:
    """Item-id embeddings (and biases) from item factors of the training users.

    ALS sees every training rating at once and regularizes rare items toward zero, which a
    few hundred meta-batches cannot match; meta-training then refines the factors for
    few-step adaptation instead of discovering them. A factor head uses the factors as they
    are (their scale is part of MF's solution; fewer factors than embedding dimensions are
    zero-padded); otherwise they are rescaled to the MLP input scale of a fresh embedding.
    """
    table = model.emb["item"]
    factors = factors.to(table.dtype)
    if not model.has_factor_head:
        factors = factors * (table[1:].std() / factors.std().clamp_min(1e-8))
    table[1:] = 0.0
    table[1:, : factors.shape[1]] = factors
    model.item_bias.copy_(bias.to(model.item_bias.dtype))


def _item_bias_init(train: Tasks, n_items: int, mu: Tensor, shrinkage: float = 5.0) -> Tensor:
    _, items, ratings = train.flat()
    sums = torch.zeros(n_items).index_add_(0, items, ratings - mu)
    counts = torch.zeros(n_items).index_add_(0, items, torch.ones_like(ratings))
    return sums / (counts + shrinkage)
