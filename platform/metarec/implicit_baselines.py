"""Baselines for implicit feedback, each a new user's ranking from their support items.

What a shop would otherwise use: popularity, item-KNN (cosine), ALS and BPR from the
``implicit`` library (used, not rewritten), and EASE (closed form). Each is fitted on the
training users' interactions (``rating`` holds an interaction's strength) and scores the
whole catalogue for users it never saw, from their support set alone:

- ALS folds a new user in exactly (``recalculate_user``: the least-squares user factors
  against the fitted item factors, confidence weighted);
- item-KNN and EASE score by the support items' rows of their item-item matrix;
- BPR has no fold-in in ``implicit``, so its "partial fit" is a fit on the training users
  plus the scored users' supports (never their queries).

Every class follows the same small contract as ``metarec.baselines``: hyperparameters in
``__init__`` (``get_params``/``set_params``), ``fit(train, n_items=...)``, and
``predict_items(tasks, items)`` -> ``(T, n)`` scores (higher = more likely), so the same
tuning and scoring code drives them. Grids are chosen on validation users (``GRIDS``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from metarec.batch import TaskBatch
from metarec.mf import Estimator, interaction_counts, interaction_matrix

__all__ = ["ALS", "BPR", "EASE", "GRIDS", "ItemKNN", "Popularity"]


def _support(tasks: TaskBatch, n_items: int, **kw: Any) -> sp.csr_matrix:
    return interaction_matrix(tasks, n_items, support_only=True, **kw)


def _all(tasks: TaskBatch, n_items: int, **kw: Any) -> sp.csr_matrix:
    return interaction_matrix(tasks, n_items, support_only=False, **kw)


def _gather(scores: np.ndarray | Tensor, items: Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(scores), dtype=torch.float64).gather(1, items)


class Popularity(Estimator):
    """How many training users interacted with each item: the same list for everyone."""

    def __init__(self) -> None:  # no hyperparameters (get_params: {})
        pass

    def fit(self, train: TaskBatch, *, n_items: int) -> Popularity:
        self.counts_ = interaction_counts(train, n_items)
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        return self.counts_[items]


class ItemKNN(Estimator):
    """Cosine item-item neighbours (``implicit``'s ``CosineRecommender``), each item keeping
    its ``neighbours`` most similar; a user's score is the sum of their support items'
    similarities."""

    def __init__(self, neighbours: int = 100) -> None:
        self.neighbours = neighbours

    def fit(self, train: TaskBatch, *, n_items: int) -> ItemKNN:
        from implicit.nearest_neighbours import CosineRecommender

        model = CosineRecommender(K=self.neighbours, num_threads=1)
        model.fit(_all(train, n_items, binary=True), show_progress=False)
        self.similarity_ = model.similarity.tocsr()
        self.n_items_ = n_items
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        scores = (_support(tasks, self.n_items_, binary=True) @ self.similarity_).toarray()
        return _gather(scores, items)


class ALS(Estimator):
    """Implicit ALS (Hu, Koren & Volinsky), confidence ``1 + alpha x strength``, with
    ``implicit``'s exact fold-in of new users."""

    def __init__(
        self, factors: int = 64, regularization: float = 0.05, alpha: float = 1.0, seed: int = 0
    ) -> None:
        self.factors, self.regularization, self.alpha, self.seed = (
            factors,
            regularization,
            alpha,
            seed,
        )

    def fit(self, train: TaskBatch, *, n_items: int) -> ALS:
        from implicit.cpu.als import AlternatingLeastSquares

        self.model_ = AlternatingLeastSquares(
            factors=self.factors,
            regularization=self.regularization,
            alpha=self.alpha,
            iterations=15,
            random_state=self.seed,
            num_threads=1,
        )
        self.model_.fit(_all(train, n_items), show_progress=False)
        self.n_items_ = n_items
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        support = _support(tasks, self.n_items_)
        users = self.model_.recalculate_user(np.arange(tasks.num_tasks), support)
        return _gather(np.asarray(users) @ np.asarray(self.model_.item_factors).T, items)


class BPR(Estimator):
    """Bayesian personalized ranking (``implicit``); ``implicit`` cannot fold a user in, so
    it is fit on the training users plus the scored users' supports (``fit_with``)."""

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.05,
        regularization: float = 0.01,
        seed: int = 0,
    ) -> None:
        self.factors, self.learning_rate = factors, learning_rate
        self.regularization, self.seed = regularization, seed

    def fit(self, train: TaskBatch, *, n_items: int) -> BPR:
        self.train_, self.n_items_, self.fitted_for_ = train, n_items, None
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        key = tuple(tasks.users.tolist())
        if self.fitted_for_ != key:  # one fit per set of scored users, not per call
            model = BayesianPersonalizedRanking(
                factors=self.factors,
                learning_rate=self.learning_rate,
                regularization=self.regularization,
                iterations=100,
                random_state=self.seed,
                num_threads=1,
            )
            both = sp.vstack(
                [
                    _all(self.train_, self.n_items_, binary=True),
                    _support(tasks, self.n_items_, binary=True),
                ]
            )
            model.fit(both.tocsr(), show_progress=False)
            users = np.asarray(model.user_factors)[self.train_.num_tasks :]
            self.scores_ = users @ np.asarray(model.item_factors).T
            self.fitted_for_ = key
        return _gather(self.scores_, items)


class EASE(Estimator):
    """Embarrassingly shallow autoencoder (Steck 2019): the item-item weights ``B`` of a
    ridge regression of every item on all others, zero diagonal, in closed form. Dense
    ``I x I``: about ``4 I^2`` bytes (1.6 GB at 20,000 items)."""

    def __init__(self, l2: float = 200.0) -> None:
        self.l2 = l2

    def fit(self, train: TaskBatch, *, n_items: int) -> EASE:
        x = _all(train, n_items, binary=True)
        gram = torch.from_numpy((x.T @ x).toarray()).float()
        gram.diagonal().add_(self.l2)
        p = torch.linalg.inv(gram)
        self.weights_ = -p / p.diagonal()[None, :]
        self.weights_.diagonal().zero_()
        self.n_items_ = n_items
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        x = torch.from_numpy(_support(tasks, self.n_items_, binary=True).toarray())
        return (x @ self.weights_).double().gather(1, items)


# Chosen on validation users by NDCG@10 (``metarec.implicit_evaluate``).
GRIDS: dict[str, tuple[type, list[dict[str, Any]]]] = {
    "popularity": (Popularity, [{}]),
    "item_knn": (ItemKNN, [{"neighbours": k} for k in (50, 200)]),
    "als": (
        ALS,
        [
            {"factors": f, "regularization": r, "alpha": a}
            for f in (32, 64)
            for r in (0.05,)
            for a in (1.0, 10.0)
        ],
    ),
    "bpr": (BPR, [{"factors": 64, "learning_rate": lr} for lr in (0.01, 0.05)]),
    "ease": (EASE, [{"l2": l2} for l2 in (50.0, 500.0)]),
}
