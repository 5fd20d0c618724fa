"""Biased matrix factorization by ALS, and the estimator contract every baseline follows.

MF fold-in is both a baseline (``metarec.baselines``) and where the meta-learner's item
factors start (``metarec.initialise``), so it lives here, below both: the meta-learning core
never imports the baselines it is compared with.

The contract is scikit-learn's: ``fit(train, n_items=...) -> self`` learns from the
training users' tasks (support and query both: all their ratings); ``predict_items(tasks,
items) -> (T, N)`` scores any items for each evaluation task using only that task's
*support* ratings. Learned state ends in ``_``; ``__init__`` only stores hyperparameters
(``get_params``/``set_params``), which evaluation picks on validation users.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from metarec.batch import RaggedTasks, TaskBatch, Tasks
from metarec.metrics import masked_mae

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = [
    "MF_GRID",
    "MF_GRID_MAX_RATINGS",
    "Estimator",
    "Groups",
    "MFFoldIn",
    "choose_mf",
    "cosine_neighbours",
    "flat_ratings",
    "interaction_counts",
    "interaction_matrix",
    "ridge_rows",
    "svd_item_factors",
]

# MF fold-in's hyperparameters tried on validation users (factor count, penalty); the
# meta-learner's item factors start at the same grid's choice.
MF_GRID: tuple[dict[str, Any], ...] = tuple(
    {"dim": d, "reg": r} for d in (8, 16, 32) for r in (3.0, 10.0, 30.0)
)

# Above this many training ratings, the grid is compared on a random subset of training
# users holding at most this many, and only the chosen point is fitted on all of them: nine
# full ALS fits were most of an evaluation's time at a million ratings and more.
MF_GRID_MAX_RATINGS = 2_000_000

MAX_PADDED = 16_000_000  # elements of one padded (groups, width, F) chunk


def flat_ratings(tasks: Tasks, *, support_only: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(row, item, rating) of every valid rating, rows indexing tasks."""
    rows, items, ratings = tasks.flat(support_only=support_only)
    return rows, items, ratings.double()


def interaction_counts(tasks: Tasks, n_items: int) -> Tensor:
    """``(n_items,)`` float64: how many of ``tasks`` interacted with each item (popularity)."""
    _, items, _ = flat_ratings(tasks, support_only=False)
    return torch.zeros(n_items, dtype=torch.float64).index_add_(
        0, items, torch.ones(len(items), dtype=torch.float64)
    )


def svd_item_factors(tasks: Tasks, n_items: int, dim: int, *, seed: int = 0) -> Tensor:
    """``(n_items, dim)`` item factors of implicit data: the top right singular vectors of
    the binary user x item matrix, scaled by the root of their singular values (PureSVD,
    Cremonesi et al., RecSys 2010), so that ``q_i . q_j`` approximates co-occurrence.

    Where an implicit model's item factors start: one randomized SVD, no labels needed,
    and no baseline involved (the implicit ALS baseline is the ``implicit`` library's).
    """
    rows, items, _ = flat_ratings(tasks, support_only=False)
    x = torch.sparse_coo_tensor(
        torch.stack([rows, items]),
        torch.ones(len(rows)),
        (tasks.num_tasks, n_items),
        check_invariants=True,
    ).coalesce()
    x = torch.sparse_coo_tensor(
        x.indices(), x.values().clamp(max=1.0), x.shape, is_coalesced=True, check_invariants=True
    )
    torch.manual_seed(seed)
    _, s, v = torch.svd_lowrank(x, q=min(dim, *x.shape))
    return v * s.sqrt()


def interaction_matrix(
    tasks: Tasks, n_items: int, *, support_only: bool, binary: bool = False
) -> sp.csr_matrix:
    """``(T, n_items)`` CSR of each task's interactions (its support, or all of them), as
    strengths or as 1 with ``binary``; a repeated item keeps the sum. The implicit
    baselines' input and the neighbour graph's, so it lives below both."""
    import scipy.sparse as sp

    rows, items, values = flat_ratings(tasks, support_only=support_only)
    data = np.ones(len(rows), np.float32) if binary else values.numpy().astype(np.float32)
    return sp.csr_matrix((data, (rows.numpy(), items.numpy())), shape=(tasks.num_tasks, n_items))


BLOCK_ENTRIES = 1 << 24  # similarities held at once while the graph is built (64 MB)
GRAPH_USER_CAP = 500  # interactions a user contributes to the graph, at most


def _at_most(x: sp.csr_matrix, cap: int = GRAPH_USER_CAP, seed: int = 0) -> sp.csr_matrix:
    """``x`` with each row cut to a random ``cap`` of its entries (seeded). The graph's cost
    is the sum over users of their interactions squared, so a user with 8,000 would cost
    as much as 256 users with 500; a heavy user's co-occurrences are also the weakest
    evidence of similarity (inverse user frequency weighs them down for that reason)."""
    import scipy.sparse as sp

    lengths = np.diff(x.indptr)
    if lengths.max(initial=0) <= cap:
        return x
    rows = np.repeat(np.arange(x.shape[0]), lengths)  # sorted, so rows[order] is rows
    order = np.lexsort((np.random.default_rng(seed).random(x.nnz), rows))
    keep = np.zeros(x.nnz, bool)
    keep[order[np.arange(x.nnz) - x.indptr[rows] < cap]] = True
    indptr = np.r_[0, np.cumsum(np.minimum(lengths, cap))]
    return sp.csr_matrix((x.data[keep], x.indices[keep], indptr), shape=x.shape)


def cosine_neighbours(tasks: Tasks, n_items: int, k: int) -> tuple[Tensor, Tensor]:
    """Each item's ``k`` most similar items by cosine over the binary user x item matrix
    (item-KNN's similarity), an item never its own neighbour: indices ``(n_items, k)``
    (int32: half the bytes of a million-item graph) and similarities ``(n_items, k)``,
    zero-padded where an item has fewer.

    The graph of the implicit meta-learner's neighbourhood term
    (``Recommender.neighbour_scores``). It lives here, below both, for the reason MF
    fold-in does: the meta-learning core never imports the baselines it is compared with
    (the item-KNN baseline is the ``implicit`` library's, and the tests check the two agree).
    """
    import scipy.sparse as sp

    x = _at_most(interaction_matrix(tasks, n_items, support_only=False, binary=True))
    x.data[:] = 1.0  # binary: a repeated interaction counts once
    norm = np.sqrt(np.asarray(x.sum(0)).ravel())
    x = (x @ sp.diags(1.0 / np.maximum(norm, 1e-12))).tocsr()
    xt = x.T.tocsr()
    # x.T @ x is all but dense on a popular catalogue (3.6e9 entries at 60,000 items), so
    # it is formed a block of items at a time, keeping each row's top k and its ties.
    block = max(1, BLOCK_ENTRIES // max(n_items, 1))
    parts = []
    for lo in range(0, n_items, block):
        dense = torch.from_numpy((xt[lo : lo + block] @ x).toarray())
        rows = torch.arange(dense.shape[0])
        dense[rows, rows + lo] = 0.0  # never its own neighbour
        kth = dense.topk(min(k, n_items), dim=1).values[:, -1:].clamp_min(1e-30)
        above = dense > kth
        # of the ties at the k-th value, the lowest-indexed, as many as the row has room for
        tie_r, tie_c = (dense == kth).nonzero(as_tuple=True)
        starts = torch.searchsorted(tie_r, torch.arange(dense.shape[0]))
        room = k - above.sum(1)
        keep = (torch.arange(len(tie_r)) - starts[tie_r]) < room[tie_r]
        above[tie_r[keep], tie_c[keep]] = True
        r, c = above.nonzero(as_tuple=True)
        parts.append((r.numpy() + lo, c.numpy(), dense[r, c].numpy()))
    row, col, val = (np.concatenate(p) for p in zip(*parts, strict=True))
    order = np.lexsort((col, -val, row))  # per row: most similar first, ties by index
    row, col, val = row[order], col[order], val[order]
    starts = np.searchsorted(row, np.arange(n_items))
    rank = np.arange(len(row)) - starts[row]
    top = rank < k
    width = max(1, min(k, int(rank.max(initial=-1)) + 1))
    index = torch.zeros(n_items, width, dtype=torch.int32)  # half of int64's bytes
    value = torch.zeros(n_items, width)
    index[row[top], rank[top]] = torch.from_numpy(col[top].astype(np.int32))
    value[row[top], rank[top]] = torch.from_numpy(val[top].astype(np.float32))
    return index, value


class Estimator:
    """What every baseline shares: scikit-learn's parameter access and the fitted check."""

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def set_params(self, **params: Any) -> Estimator:
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"{name}: not a parameter of {type(self).__name__}; expected one of "
                    f"{sorted(valid)}"
                )
            setattr(self, name, value)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "mu_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(train) first")

    def predict(self, tasks: TaskBatch) -> Tensor:
        """Query predictions (T, Q)."""
        return self.predict_items(tasks, tasks.query_items)


class Groups:
    """Observations grouped by row, laid out once for every solve over the same rows (an
    ALS fit solves the same user and item groups twice per iteration).

    Each group is padded to the power of two at or above its size, and each width is
    reduced with batched matmuls, ~20x faster on CPU than scattering (N, F, F) outer
    products. One width for all groups would be set by the largest group (the most-rated
    item) and waste most of the padded tensor on a long-tailed catalogue; per-bucket widths
    waste at most half. Chunks of groups bound the padded tensor at any data size.
    """

    def __init__(self, rows: Tensor, n_rows: int) -> None:
        self.n_rows = n_rows
        counts = torch.bincount(rows, minlength=n_rows)
        order = torch.from_numpy(np.argsort(rows.numpy(), kind="stable"))  # torch's thrashes
        grouped = rows[order]
        pos = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[grouped]
        width = torch.zeros_like(counts)
        has = counts > 0
        width[has] = 2 ** torch.ceil(torch.log2(counts[has].double())).long()
        local = torch.zeros_like(counts)
        self.buckets = []  # (group ids, observations, their group within the bucket, slot, width)
        for w in torch.unique(width[has]).tolist():
            ids = torch.nonzero(width == w).squeeze(1)
            local[ids] = torch.arange(len(ids))
            sel = width[grouped] == w  # sorted by row: bucket groups in ids' order
            self.buckets.append((ids, order[sel], local[grouped[sel]], pos[sel], w))

    def normal_equations(
        self, feats: Tensor, target: Tensor, index: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per group: X^T X (n_rows, F, F) and X^T y (n_rows, F); zeros for empty groups.

        ``index``: observation j's features are ``feats[index[j]]`` (a table of users or
        items), gathered chunk by chunk: an (N, F) float64 copy of 25M ratings is 6 GB.
        """
        f = feats.shape[1]
        gram = feats.new_zeros(self.n_rows, f, f)
        rhs = feats.new_zeros(self.n_rows, f)
        for ids, obs, local, pos, w in self.buckets:
            step = max(1, MAX_PADDED // (w * f))
            for lo in range(0, len(ids), step):
                hi = min(lo + step, len(ids))
                a, b = torch.searchsorted(local, torch.tensor([lo, hi])).tolist()
                x = feats.new_zeros(hi - lo, w, f)
                y = target.new_zeros(hi - lo, w)
                rows = obs[a:b] if index is None else index[obs[a:b]]
                x[local[a:b] - lo, pos[a:b]] = feats[rows]
                y[local[a:b] - lo, pos[a:b]] = target[obs[a:b]]
                xt = x.transpose(1, 2)  # (groups, F, w)
                gram[ids[lo:hi]] = xt @ x
                rhs[ids[lo:hi]] = (xt @ y.unsqueeze(-1)).squeeze(-1)
        return gram, rhs


def ridge_rows(
    groups: Groups, feats: Tensor, target: Tensor, reg: float, index: Tensor | None = None
) -> Tensor:
    """Solve one ridge regression per row group at once: min |X w - y|² + reg |w|².

    Args: groups: the row of each observation, grouped; feats (N, F), or with ``index``
        (N,) a table whose row ``index[j]`` is observation j's features; target (N,).
    Returns: (n_rows, F) solutions (zero for groups without observations).
    """
    gram, rhs = groups.normal_equations(feats, target, index)
    gram += reg * torch.eye(feats.shape[1], dtype=torch.float64)  # SPD: Cholesky
    return torch.cholesky_solve(rhs.unsqueeze(-1), torch.linalg.cholesky(gram)).squeeze(-1)


class MFFoldIn(Estimator):
    """Biased matrix factorization by ALS on training users; a new user is *folded in*:
    only their vector and bias are solved (exactly, ridge) from the support set, with item
    factors frozen. The strongest classic cold-start baseline.
    """

    def __init__(self, dim: int = 16, reg: float = 10.0, iters: int = 12, seed: int = 0) -> None:
        self.dim, self.reg, self.iters, self.seed = dim, reg, iters, seed

    def _users(self, by_user: Groups, items: Tensor, ratings: Tensor) -> Tensor:
        """(n_rows, dim + 1): user vectors with the user bias as last coordinate."""
        ones = torch.ones(len(self.item_factors_), 1, dtype=torch.float64)
        table = torch.cat([self.item_factors_, ones], 1)  # (I, dim + 1), gathered per chunk
        resid = ratings - self.mu_ - self.item_bias_[items]
        return ridge_rows(by_user, table, resid, self.reg, index=items)

    def fit(self, train: Tasks, *, n_items: int) -> MFFoldIn:
        rows, items, ratings = flat_ratings(train, support_only=False)
        self.mu_ = float(ratings.mean())
        g = torch.Generator().manual_seed(self.seed)
        self.item_factors_ = torch.randn(n_items, self.dim, generator=g, dtype=torch.float64) * 0.1
        self.item_bias_ = torch.zeros(n_items, dtype=torch.float64)
        by_user, by_item = Groups(rows, train.num_tasks), Groups(items, n_items)
        for _ in range(self.iters):
            users = self._users(by_user, items, ratings)  # (U, dim + 1)
            table = torch.cat([users[:, :-1], torch.ones(len(users), 1, dtype=torch.float64)], 1)
            resid = ratings - self.mu_ - users[rows, -1]
            item = ridge_rows(by_item, table, resid, self.reg, index=rows)
            self.item_factors_, self.item_bias_ = item[:, :-1], item[:, -1]
        return self

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        self._check_fitted()
        rows, s_items, ratings = flat_ratings(tasks, support_only=True)
        users = self._users(Groups(rows, tasks.num_tasks), s_items, ratings)  # (T, dim + 1)
        factors = self.item_factors_
        if items.shape[1] * 4 >= factors.shape[0]:  # most of the catalogue: (T, I), no (T, N, dim)
            dot = (users[:, :-1] @ factors.T).gather(1, items)
        else:
            dot = (factors[items] * users[:, None, :-1]).sum(-1)
        return (self.mu_ + self.item_bias_[items] + users[:, None, -1] + dot).float()


def users_for_grid(tasks: Tasks, max_ratings: int, seed: int) -> Tasks:
    """``tasks`` when they hold at most ``max_ratings`` ratings; else a random subset of
    the users (seeded), in their original order, holding at most that many."""
    rows, _, _ = tasks.flat()
    if len(rows) <= max_ratings:
        return tasks
    total = torch.bincount(rows, minlength=tasks.num_tasks)
    order = torch.randperm(tasks.num_tasks, generator=torch.Generator().manual_seed(seed))
    keep = order[total[order].cumsum(0) <= max_ratings].sort().values
    return tasks.take(keep) if isinstance(tasks, RaggedTasks) else tasks.select(keep)


def choose_mf(
    train: Tasks,
    valid: TaskBatch,
    n_items: int,
    grid: list[dict[str, Any]] | tuple[dict[str, Any], ...] = MF_GRID,
    *,
    seed: int = 0,
    max_ratings: int = MF_GRID_MAX_RATINGS,
) -> MFFoldIn:
    """MF fold-in at the ``grid`` point with the lowest fold-in MAE on ``valid`` users (the
    first on ties), fitted on every training user. Points are compared on
    ``users_for_grid(train, max_ratings)``: all of ``train`` up to that size, so only
    larger data is chosen on a sample. The result keeps every point's validation MAE
    (``grid_maes_``) so that a narrower grid over the same users needs no refit."""
    sample = users_for_grid(train, max_ratings, seed)
    best: tuple[float, MFFoldIn] | None = None
    maes = []
    for hp in grid:
        fitted = MFFoldIn(**hp, seed=seed).fit(sample, n_items=n_items)
        maes.append(masked_mae(fitted.predict(valid), valid))
        if best is None or maes[-1] < best[0]:
            best = (maes[-1], fitted)
    assert best is not None
    chosen = best[1]
    if sample is not train:
        chosen = MFFoldIn(**chosen.get_params()).fit(train, n_items=n_items)
    chosen.grid_maes_ = [
        ({"dim": hp["dim"], "reg": hp["reg"]}, m) for hp, m in zip(grid, maes, strict=True)
    ]
    chosen.grid_sample_ = sample.num_tasks
    return chosen
