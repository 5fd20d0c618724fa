"""Per-task evaluation metrics for meta-learned recommenders (users as tasks).

Why per task: a meta-learner adapts once per user, so the quantity of interest is the
*average user's* experience, not the average rating's. Every function here returns one value
per task, shape ``(T,)``, and the caller averages with :func:`mean_metrics` (a NaN-mean:
tasks where a metric is undefined, e.g. no relevant item, are NaN and simply skipped).

Shapes: ``T`` = tasks (users) in the batch, ``Q`` = query slots per task (padded to the
longest query; ``mask`` marks the real ones), ``I`` = catalogue items.

Everything is vectorized over tasks with pure PyTorch (no loop over users, tasks or items),
so it runs on whatever device the predictions live on. Padded query slots never influence
any metric, whatever values they hold (NaN and inf included).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["catalog_metrics", "mean_metrics", "query_metrics"]


def _discounts(n: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``1 / log2(rank + 1)`` for ranks ``1..n``, shape ``(n,)``."""
    ranks = torch.arange(1, n + 1, device=device, dtype=dtype)
    return 1.0 / torch.log2(ranks + 1.0)


def _rank_valid_first(pred: Tensor, mask: Tensor) -> Tensor:
    """Order each row by ``pred`` descending, valid slots before padded ones.

    Two stable sorts make the key lexicographic (valid first, then ``pred`` descending, then
    position), so tied predictions keep their original left-to-right order and a padded slot
    can never outrank a valid one, even a valid ``-inf``. Returns indices, shape ``(T, Q)``.
    """
    filled = torch.where(mask, pred, torch.zeros((), dtype=pred.dtype, device=pred.device))
    order = torch.sort(filled, dim=1, descending=True, stable=True).indices
    valid_first = torch.sort(
        mask.gather(1, order).to(torch.uint8), dim=1, descending=True, stable=True
    )
    return order.gather(1, valid_first.indices)


def _check_query_inputs(pred: Tensor, target: Tensor, mask: Tensor) -> None:
    if pred.dim() != 2 or pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(
            f"pred/target/mask: got shapes {tuple(pred.shape)}, {tuple(target.shape)}, "
            f"{tuple(mask.shape)}; expected three equal (T, Q) shapes."
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: got dtype {mask.dtype}; expected torch.bool.")


def _ndcg3_linear(t_sorted: Tensor, target: Tensor, mask: Tensor, n_valid: Tensor) -> Tensor:
    """nDCG@3 with the true rating as (linear) gain, MeLU's protocol; shape ``(T,)``."""
    k = min(3, target.shape[1])
    disc = _discounts(k, device=target.device, dtype=t_sorted.dtype)
    in_k = torch.arange(k, device=target.device) < n_valid.unsqueeze(1)  # (T, k)
    zero = torch.zeros((), dtype=t_sorted.dtype, device=target.device)
    dcg = torch.where(in_k, t_sorted[:, :k] * disc, zero).sum(1)
    neg_inf = torch.full((), float("-inf"), dtype=t_sorted.dtype, device=target.device)
    ideal = torch.sort(torch.where(mask, target, neg_inf), dim=1, descending=True).values
    idcg = torch.where(in_k, ideal[:, :k] * disc, zero).sum(1)
    return dcg / idcg  # 0/0 = NaN for tasks with no valid slot (or all-zero ratings)


def _binary_topk(rel_sorted: Tensor, n_rel: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Hits, binary nDCG@k and MRR@k from relevance in ranked order ``(T, Q)``; each ``(T,)``."""
    dtype = n_rel.dtype
    top = rel_sorted[:, :k].to(dtype)  # (T, min(k, Q))
    disc = _discounts(k, device=top.device, dtype=dtype)
    hits = top.sum(1)
    dcg = (top * disc[: top.shape[1]]).sum(1)
    idcg = torch.cumsum(disc, 0)[(n_rel.clamp(1, k) - 1).long()]  # sum of the first min(n_rel,k)
    nan = torch.full((), float("nan"), dtype=dtype, device=top.device)
    ndcg = torch.where(n_rel > 0, dcg / idcg, nan)
    ranks = torch.arange(1, top.shape[1] + 1, device=top.device, dtype=dtype)
    rr = (top / ranks).amax(1) if top.shape[1] else torch.zeros_like(hits)  # 1/first-hit rank
    mrr = torch.where(n_rel > 0, rr, nan)
    return hits, ndcg, mrr


def query_metrics(
    pred: Tensor, target: Tensor, mask: Tensor, *, relevance_threshold: float = 4.0
) -> dict[str, Tensor]:
    """Rating and ranking quality on each task's query set (the items the user really rated).

    Why: after adapting on a user's support set, the model is judged on how well it scores and
    orders that user's held-out query ratings, the protocol of MeLU (Lee et al., KDD 2019,
    "MeLU: Meta-Learned User Preference Estimator for Cold-Start Recommendation").

    Args:
        pred: ``(T, Q)`` predicted ratings.
        target: ``(T, Q)`` true ratings.
        mask: ``(T, Q)`` bool, True on real query slots; padded (False) slots are ignored.
        relevance_threshold: an item is relevant when ``target >= relevance_threshold``.

    Returns:
        ``(T,)`` tensors (NaN where undefined for that task, e.g. no valid slot at all):
        ``"mae"``, ``"rmse"`` (per-task RMSE); ``"ndcg@3"`` (rank by ``pred``, gain = true
        rating, linear not ``2^r - 1``, discount ``1/log2(rank+1)``, ideal from sorting by true
        rating, over ``min(3, n_valid)`` items; NaN if the ideal DCG is 0); and with binary
        relevance: ``"p@5"`` (hits in top 5 / ``min(5, n_valid)``), ``"ndcg@5"`` and
        ``"mrr@5"`` (0 when no relevant item reaches the top 5), both NaN when the task has
        no relevant item.

    Ties in ``pred`` are broken by position: the earlier query slot ranks higher (stable sort).
    """
    _check_query_inputs(pred, target, mask)
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=pred.device)
    n_valid = mask.sum(1).to(dtype)
    err = torch.where(mask, pred - target, zero)
    mae = err.abs().sum(1) / n_valid
    rmse = torch.sqrt(err.square().sum(1) / n_valid)

    order = _rank_valid_first(pred, mask)
    ndcg3 = _ndcg3_linear(target.gather(1, order), target, mask, n_valid)
    relevant = mask & (target >= relevance_threshold)
    n_rel = relevant.sum(1).to(dtype)
    hits, ndcg5, mrr5 = _binary_topk(relevant.gather(1, order), n_rel, 5)
    p5 = hits / n_valid.clamp(max=5)  # 0/0 = NaN for tasks with no valid slot
    return {"mae": mae, "rmse": rmse, "ndcg@3": ndcg3, "p@5": p5, "ndcg@5": ndcg5, "mrr@5": mrr5}


def catalog_metrics(
    scores: Tensor, positives: Tensor, exclude: Tensor, *, k: int = 10
) -> dict[str, Tensor]:
    """Top-k retrieval quality when each user's whole catalogue is ranked.

    Why: query-set ranking (:func:`query_metrics`) only orders items the user already rated;
    a recommender must instead surface them among all ``I`` items. Items seen in the support
    set are excluded (score set to ``-inf``) so the model gets no credit for recalling what it
    was adapted on.

    Args:
        scores: ``(T, I)`` model score for every catalogue item.
        positives: ``(T, I)`` bool, items the user rated ``>=`` the threshold in the query.
        exclude: ``(T, I)`` bool, items rated in the support set; never ranked, never hits.
            A positive that is also excluded is dropped from the positives.
        k: cut-off; clamped to ``I`` for ranking, the key names keep the requested ``k``.

    Returns:
        ``(T,)`` tensors ``f"recall@{k}"`` (hits in top-k / number of positives) and
        ``f"ndcg@{k}"`` (binary gain, ideal DCG over ``min(n_positives, k)`` hits), both NaN
        for tasks with no positive.

    Ranking uses :func:`torch.topk`; the order among exactly tied scores is whatever topk
    returns (implementation-defined), which only matters for ties straddling the cut-off.
    """
    if scores.dim() != 2 or scores.shape != positives.shape or scores.shape != exclude.shape:
        raise ValueError(
            f"scores/positives/exclude: got shapes {tuple(scores.shape)}, "
            f"{tuple(positives.shape)}, {tuple(exclude.shape)}; expected three equal (T, I)."
        )
    if positives.dtype != torch.bool or exclude.dtype != torch.bool:
        raise TypeError("positives/exclude: expected torch.bool tensors.")
    if k < 1:
        raise ValueError(f"k: got {k}; expected >= 1.")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    pos = positives & ~exclude
    masked = scores.to(dtype).masked_fill(exclude, float("-inf"))
    idx = torch.topk(masked, min(k, scores.shape[1]), dim=1).indices  # (T, k')
    hit = pos.gather(1, idx).to(dtype)  # excluded items are never positive, so never hits
    n_pos = pos.sum(1).to(dtype)
    disc = _discounts(k, device=scores.device, dtype=dtype)
    dcg = (hit * disc[: hit.shape[1]]).sum(1)
    idcg = torch.cumsum(disc, 0)[(n_pos.clamp(1, k) - 1).long()]
    nan = torch.full((), float("nan"), dtype=dtype, device=scores.device)
    recall = torch.where(n_pos > 0, hit.sum(1) / n_pos, nan)
    ndcg = torch.where(n_pos > 0, dcg / idcg, nan)
    return {f"recall@{k}": recall, f"ndcg@{k}": ndcg}


def mean_metrics(per_task: dict[str, Tensor]) -> dict[str, float]:
    """Average per-task metrics into Python floats, ignoring NaN (undefined) tasks.

    Why NaN-mean: a task without a relevant item has no meaningful nDCG/MRR; counting it as 0
    would penalise the model for the data, counting it as 1 would flatter it.
    Returns NaN for a metric only when every task is NaN (or there are no tasks).
    """
    return {
        name: float(torch.nanmean(v.detach().to(torch.float64))) for name, v in per_task.items()
    }
