"""Non-meta baselines the meta-learner must beat, under scikit-learn's estimator contract
(``metarec.mf.Estimator``; MF fold-in itself lives in ``metarec.mf``). The network
baselines (global model, fine-tune) live in ``evaluate`` since they reuse the meta-learner's
training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metarec.batch import TaskBatch
from metarec.mf import MF_GRID, Estimator, Groups, MFFoldIn, flat_ratings, ridge_rows

__all__ = ["Bias", "GlobalMean", "ItemMean", "MFFoldIn", "UserMean", "classic_baselines"]


class GlobalMean(Estimator):
    """μ, the mean training rating, for everyone."""

    def fit(self, train: TaskBatch, *, n_items: int) -> GlobalMean:
        self.mu_ = float(flat_ratings(train, support_only=False)[2].mean())
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        self._check_fitted()
        return torch.full(items.shape, self.mu_)


def _shrunk_means(index: Tensor, values: Tensor, n: int, prior: Tensor, k: float) -> Tensor:
    """Per-group means shrunk toward ``prior`` with ``k`` pseudo-counts: (n,)."""
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, index, values)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, index, torch.ones_like(values))
    return (sums + k * prior) / (counts + k).clamp_min(1e-12)


class ItemMean(Estimator):
    """Each item's mean training rating, shrunk toward μ (unseen items get μ)."""

    def __init__(self, shrinkage: float = 5.0) -> None:
        self.shrinkage = shrinkage

    def fit(self, train: TaskBatch, *, n_items: int) -> ItemMean:
        _, items, ratings = flat_ratings(train, support_only=False)
        self.mu_ = float(ratings.mean())
        mu = torch.tensor(self.mu_, dtype=torch.float64)
        self.item_means_ = _shrunk_means(items, ratings, n_items, mu, max(self.shrinkage, 1e-6))
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        self._check_fitted()
        return self.item_means_[items].float()


class UserMean(Estimator):
    """The user's mean support rating, shrunk toward μ."""

    def __init__(self, shrinkage: float = 1.0) -> None:
        self.shrinkage = shrinkage

    def fit(self, train: TaskBatch, *, n_items: int) -> UserMean:
        self.mu_ = float(flat_ratings(train, support_only=False)[2].mean())
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        self._check_fitted()
        rows, _, ratings = flat_ratings(tasks, support_only=True)
        mu = torch.tensor(self.mu_, dtype=torch.float64)
        means = _shrunk_means(rows, ratings, tasks.num_tasks, mu, self.shrinkage)
        return means.float().unsqueeze(1).expand(items.shape).clone()


class Bias(Estimator):
    """μ + b_i + b_u: item biases from training users, b_u fitted on the support set.

    Both are regularized least squares, fitted by alternating exact solves.
    """

    def __init__(self, reg_item: float = 10.0, reg_user: float = 5.0, iters: int = 10) -> None:
        self.reg_item, self.reg_user, self.iters = reg_item, reg_user, iters

    def fit(self, train: TaskBatch, *, n_items: int) -> Bias:
        rows, items, ratings = flat_ratings(train, support_only=False)
        self.mu_ = float(ratings.mean())
        b_u = torch.zeros(train.num_tasks, dtype=torch.float64)
        ones = torch.ones(len(ratings), 1, dtype=torch.float64)
        by_item, by_user = Groups(items, n_items), Groups(rows, train.num_tasks)
        for _ in range(self.iters):
            resid = ratings - self.mu_ - b_u[rows]
            self.item_bias_ = ridge_rows(by_item, ones, resid, self.reg_item)[:, 0]
            resid = ratings - self.mu_ - self.item_bias_[items]
            b_u = ridge_rows(by_user, ones, resid, self.reg_user)[:, 0]
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        self._check_fitted()
        rows, s_items, ratings = flat_ratings(tasks, support_only=True)
        resid = ratings - self.mu_ - self.item_bias_[s_items]
        ones = torch.ones(len(resid), 1, dtype=torch.float64)
        b_u = ridge_rows(Groups(rows, tasks.num_tasks), ones, resid, self.reg_user)[:, 0]
        return (self.mu_ + self.item_bias_[items] + b_u[:, None]).float()


@dataclass(frozen=True)
class Grid:
    """A baseline class and the hyperparameter values tried on validation users."""

    cls: type
    grid: list[dict]


def classic_baselines(seed: int = 0) -> dict[str, Grid]:
    """The non-network baselines with their tuning grids (results.json method names)."""
    return {
        "global_mean": Grid(GlobalMean, [{}]),
        "item_mean": Grid(ItemMean, [{"shrinkage": k} for k in (0.0, 2.0, 5.0, 10.0, 25.0)]),
        "user_mean": Grid(UserMean, [{"shrinkage": k} for k in (0.0, 1.0, 3.0, 10.0)]),
        "bias": Grid(
            Bias,
            [
                {"reg_item": a, "reg_user": b}
                for a in (2.0, 5.0, 15.0, 40.0)
                for b in (1.0, 3.0, 10.0)
            ],
        ),
        "mf_foldin": Grid(
            MFFoldIn,
            [{**hp, "seed": seed} for hp in MF_GRID],
        ),
    }
