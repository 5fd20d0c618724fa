"""Per-task evaluation metrics for meta-learned recommenders (users as tasks).

Why per task: a meta-learner adapts once per user, so the quantity of interest is the
*average user's* experience, not the average rating's. Every function here returns one value
per task, shape ``(T,)``, and the caller averages with :func:`mean_metrics` (a NaN-mean:
tasks where a metric is undefined, e.g. no relevant item, are NaN and simply skipped). The
one exception is RMSE: the standard RMSE that papers report is pooled over all query
ratings, so tasks return their sum of squared errors and rating count, and
:func:`mean_metrics` (or :func:`pooled_rmse`, e.g. inside a bootstrap) pools them.

Ties: a predictor that gives several items the same score does not order them. Breaking the
tie by position or item id would make its ranking metrics depend on the luck of that order
(and flatter constant predictors such as a global mean). Every ranking metric here is
therefore the exact *expectation over uniformly random orders of the tied items*, computed
in closed form (no sampling), so a constant predictor scores the same whatever the item
ids or positions are. For untied scores this is the ordinary metric.

Relevance: what counts as a relevant rating depends on the rating scale (4 on 1–5, 4.0 on
0.5–5, ...), so the caller supplies the threshold; there is no default here.

Shapes: ``T`` = tasks (users) in the batch, ``Q`` = query slots per task (padded to the
longest query; ``mask`` marks the real ones), ``I`` = catalogue items, ``K`` = cut-off
positions actually ranked (``min(k, Q)`` or ``min(k, I)``).

Everything is vectorized over tasks with pure PyTorch (no loop over users, tasks or items;
only MRR loops over the ``k`` ranks), so it runs on whatever device the predictions live
on. Padded query slots and excluded catalogue items never influence any metric, whatever
values they hold (NaN and inf included).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "POOLED",
    "catalog_metrics",
    "masked_mae",
    "mean_metrics",
    "pooled_rmse",
    "query_metrics",
    "task_mae",
]

POOLED: dict[str, tuple[str, str]] = {"rmse": ("sse", "count")}
"""The metric pooled over ratings rather than averaged over tasks: name -> the two per-task
keys :func:`pooled_rmse` takes. :func:`mean_metrics` replaces those keys by the pooled value."""


def task_mae(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """(T,) each task's mean absolute error over its valid query slots: the one MAE, both
    the reported metric and the validation criterion of early stopping and tuning."""
    err = torch.where(mask, pred - target, torch.zeros((), dtype=pred.dtype, device=pred.device))
    return err.abs().sum(1) / mask.sum(1).to(err.dtype)


def masked_mae(pred: Tensor, tasks: Any) -> float:
    """Mean over ``tasks`` (a ``TaskBatch``) of their query MAE, predictions ``pred`` (T, Q)."""
    return float(task_mae(pred, tasks.query_ratings, tasks.query_mask).mean())


def pooled_rmse(sse: Tensor, count: Tensor) -> Tensor:
    """RMSE pooled over every rating: ``sqrt(sum(sse) / sum(count))`` over the last dim.

    Why a function: the evaluation bootstraps this over resampled users, so the definition
    lives in one place. Leading dims are kept, e.g. ``(B, T) -> (B,)`` for ``B`` resamples.

    Args:
        sse: ``(..., T)`` per-task sums of squared errors (``query_metrics()["sse"]``).
        count: ``(..., T)`` per-task numbers of rated query items (``["count"]``).

    Returns:
        ``(...)`` pooled RMSE; NaN when there is no rating at all.
    """
    return torch.sqrt(sse.sum(-1) / count.sum(-1))


def _discounts(n: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``1 / log2(rank + 1)`` for ranks ``1..n``, shape ``(n,)``."""
    ranks = torch.arange(1, n + 1, device=device, dtype=dtype)
    return 1.0 / torch.log2(ranks + 1.0)


class TiedTopK(NamedTuple):
    """The top-``K`` of each row with its tie structure; see :func:`tied_topk`."""

    idx: Tensor  # (T, K) item index at each position, some order of the top K
    above: Tensor  # (T, K) bool: the item scores strictly above the K-th score v_k
    gid: Tensor  # (T, K) long: index of the position's equality run in the sorted top K
    start: Tensor  # (T, K) first position of that run (0-based rank)
    size: Tensor  # (T, K) number of positions in that run
    in_eq: Tensor  # (T, N) bool: valid items scoring exactly v_k (anywhere in the row)
    n_greater: Tensor  # (T,) valid items scoring above v_k (all of them are in the top K)
    n_equal: Tensor  # (T,) size of the v_k tie group (0 when the row has < K valid items)


def rankable(scores: Tensor, valid: Tensor) -> Tensor:
    """``scores`` ready to rank: valid items clamped to finite values (NaN/-inf -> the lowest
    finite score, +inf -> the highest), invalid ones ``-inf``, so an invalid item always
    ranks last and never ties with a valid one."""
    info = torch.finfo(scores.dtype)
    s = torch.nan_to_num(scores, nan=info.min, neginf=info.min, posinf=info.max)
    return s.masked_fill(~valid, float("-inf"))


def tied_topk(scores: Tensor, valid: Tensor, k: int) -> TiedTopK:
    """Top-``min(k, N)`` of each row of ``scores`` ``(T, N)`` over its ``valid`` items.

    Why this shape: every ranking metric below only needs the top k, and under uniformly
    random tie orders the only uncertainty there is which members of the tie group at the
    k-th score ``v_k`` make the cut (groups strictly above ``v_k`` are wholly inside the top
    and only shuffle among their own positions). Scores are ranked as ``rankable`` makes
    them: an invalid item always ranks last and never ties with a valid one.
    """
    n = scores.shape[1]
    kk = min(k, n)
    s = rankable(scores, valid)
    top_v, idx = torch.topk(s, kk, dim=1)  # (T, K), sorted descending
    v_k = top_v[:, -1] if kk else s.new_full((s.shape[0],), float("-inf"))
    above = top_v > v_k[:, None]  # (T, K)
    new = torch.ones_like(above)
    new[:, 1:] = top_v[:, 1:] != top_v[:, :-1]  # a run of equal scores starts here
    gid = new.long().cumsum(1) - 1  # (T, K)
    pos = torch.arange(kk, device=s.device).expand_as(gid)
    start = torch.where(new, pos, 0).cummax(1).values  # (T, K)
    ones = torch.ones_like(top_v)
    size = torch.zeros_like(top_v).scatter_add(1, gid, ones).gather(1, gid)  # (T, K)
    in_eq = valid & (s == v_k[:, None])  # (T, N); empty when v_k = -inf (few valid items)
    n_greater = above.sum(1).to(scores.dtype)
    n_equal = in_eq.sum(1).to(scores.dtype)
    return TiedTopK(idx, above, gid, start, size, in_eq, n_greater, n_equal)


def _expected_gains(tk: TiedTopK, gains: Tensor) -> Tensor:
    """Expected gain of the item at each top position, ``(T, K)``, over random tie orders.

    Why per position: with the item at rank ``p`` uniformly drawn from its tie group, its
    expected gain is the group's mean gain, so ``E[sum_p gain_p * w_p]`` is
    ``sum_p mean_p * w_p`` for any position weights ``w`` (1 for hits, ``1/log2(p+2)`` for
    DCG). A group above ``v_k`` lies wholly in the top; the ``v_k`` group's mean runs over all
    its members in the row, including those cut off. Untied rows give back each item's gain.

    Args:
        gains: ``(T, N)`` gain of every item; invalid items' values are ignored.
    """
    zero = torch.zeros((), dtype=gains.dtype, device=gains.device)
    g_top = torch.where(tk.above, gains.gather(1, tk.idx), zero)  # (T, K)
    group_sum = torch.zeros_like(g_top).scatter_add(1, tk.gid, g_top).gather(1, tk.gid)
    eq_sum = torch.where(tk.in_eq, gains, zero).sum(1)  # (T,)
    eq_mean = torch.where(tk.n_equal > 0, eq_sum / tk.n_equal.clamp(min=1), zero)
    return torch.where(tk.above, group_sum / tk.size, eq_mean[:, None])


def _expected_rr(tk: TiedTopK, relevant: Tensor, k: int) -> Tensor:
    """``E[1 / rank of the first relevant item, 0 beyond rank k]``, ``(T,)``.

    Why not per position: the reciprocal rank is not linear in the gains. Under random tie
    orders, the first relevant item lies in the first tie group (in rank order) holding a
    relevant item: ``a`` items before it, ``g`` members, ``r`` of them relevant. Its rank is
    ``a + J`` where ``P(J = j) = C(g-j, r-1) / C(g, r)``, ``j = 1..g-r+1``, computed by the
    ratio ``P(J = j+1) / P(J = j) = (g-j-r+1) / (g-j)`` (exact, no large binomials).
    0 when no valid item is relevant.
    """
    dtype = tk.n_equal.dtype
    rel_top = relevant.gather(1, tk.idx) & tk.above  # (T, K)
    r_group = torch.zeros_like(tk.size).scatter_add(1, tk.gid, rel_top.to(dtype))
    first = rel_top.to(torch.uint8).argmax(1, keepdim=True)  # first relevant position above
    in_top = rel_top.any(1)
    a = torch.where(in_top, tk.start.gather(1, first).squeeze(1).to(dtype), tk.n_greater)
    g = torch.where(in_top, tk.size.gather(1, first).squeeze(1), tk.n_equal)
    r_eq = (relevant & tk.in_eq).sum(1).to(dtype)
    r = torch.where(in_top, r_group.gather(1, tk.gid.gather(1, first)).squeeze(1), r_eq)
    prob = torch.where(r > 0, r / g.clamp(min=1), torch.zeros_like(r))  # P(J = 1)
    rr = torch.zeros_like(prob)
    for j in range(1, k + 1):  # ranks beyond k earn nothing; k <= 10 in practice
        rank = a + j
        rr = rr + torch.where(rank <= k, prob / rank, torch.zeros_like(prob))
        prob = prob * (g - j - r + 1).clamp(min=0) / (g - j).clamp(min=1)
    return rr


def _check_query_inputs(pred: Tensor, target: Tensor, mask: Tensor, threshold: float) -> None:
    if pred.dim() != 2 or pred.shape != target.shape or pred.shape != mask.shape:
        raise ValueError(
            f"pred/target/mask: got shapes {tuple(pred.shape)}, {tuple(target.shape)}, "
            f"{tuple(mask.shape)}; expected three equal (T, Q) shapes."
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: got dtype {mask.dtype}; expected torch.bool.")
    if not math.isfinite(threshold):
        raise ValueError(
            f"relevance_threshold: got {threshold}; expected a finite rating. "
            "Derive it from the rating scale (e.g. 4 on 1-5)."
        )


def _ndcg3_linear(pred: Tensor, target: Tensor, mask: Tensor, n_valid: Tensor) -> Tensor:
    """Expected nDCG@3 with the true rating as (linear) gain, MeLU's protocol; ``(T,)``."""
    k = min(3, target.shape[1])
    disc = _discounts(k, device=target.device, dtype=target.dtype)
    dcg = (_expected_gains(tied_topk(pred, mask, 3), target) * disc).sum(1)
    in_k = torch.arange(k, device=target.device) < n_valid.unsqueeze(1)  # (T, k)
    zero = torch.zeros((), dtype=target.dtype, device=target.device)
    neg_inf = torch.full((), float("-inf"), dtype=target.dtype, device=target.device)
    ideal = torch.sort(torch.where(mask, target, neg_inf), dim=1, descending=True).values
    idcg = torch.where(in_k, ideal[:, :k] * disc, zero).sum(1)
    return dcg / idcg  # 0/0 = NaN for tasks with no valid slot (or all-zero ratings)


def binary_topk(
    scores: Tensor, valid: Tensor, relevant: Tensor, k: int, *, tk: TiedTopK | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Expected hits, binary nDCG@k and MRR@k, and the relevant count; each ``(T,)``.

    nDCG and MRR are NaN for tasks with no relevant valid item (undefined, not 0). ``tk``:
    ``tied_topk(scores, valid, k)`` when the caller already has it.
    """
    dtype = scores.dtype
    relevant = relevant & valid
    tk = tied_topk(scores, valid, k) if tk is None else tk
    gain = _expected_gains(tk, relevant.to(dtype))  # (T, K)
    disc = _discounts(k, device=scores.device, dtype=dtype)
    hits = gain.sum(1)
    dcg = (gain * disc[: gain.shape[1]]).sum(1)
    n_rel = relevant.sum(1).to(dtype)
    idcg = torch.cumsum(disc, 0)[(n_rel.clamp(1, k) - 1).long()]  # first min(n_rel, k) ranks
    nan = torch.full((), float("nan"), dtype=dtype, device=scores.device)
    ndcg = torch.where(n_rel > 0, dcg / idcg, nan)
    mrr = torch.where(n_rel > 0, _expected_rr(tk, relevant, k), nan)
    return hits, ndcg, mrr, n_rel


def query_metrics(
    pred: Tensor, target: Tensor, mask: Tensor, *, relevance_threshold: float
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
            Required: it depends on the rating scale, which only the caller knows.

    Returns:
        ``(T,)`` tensors (NaN where undefined for that task, e.g. no valid slot at all):
        ``"mae"``; ``"user_rmse"`` (this task's RMSE; its mean over tasks is *not* the
        standard RMSE); ``"sse"`` and ``"count"`` (sum of squared errors and number of
        valid slots, which :func:`mean_metrics` pools into ``"rmse"``); ``"ndcg@3"`` (rank by
        ``pred``, gain = true rating, linear not ``2^r - 1``, discount ``1/log2(rank+1)``,
        ideal from sorting by true rating, over ``min(3, n_valid)`` items; NaN if the ideal
        DCG is 0); and with binary relevance: ``"p@5"`` (hits in top 5 / ``min(5,
        n_valid)``), ``"ndcg@5"`` and ``"mrr@5"`` (0 when no relevant item reaches the top
        5), both NaN when the task has no relevant item.

    Tied predictions: every ranking metric is its exact expectation over uniformly random
    orders of the tied items (see the module docstring), never a position tie-break. A valid
    NaN or ``-inf`` prediction ranks below every finite one but above padding.
    """
    _check_query_inputs(pred, target, mask, relevance_threshold)
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=pred.device)
    n_valid = mask.sum(1).to(dtype)
    err = torch.where(mask, pred - target, zero)
    sse = err.square().sum(1)
    mae = task_mae(pred, target, mask)
    target = torch.where(mask, target, zero)  # padding may hold NaN; never read as a gain

    ndcg3 = _ndcg3_linear(pred, target, mask, n_valid)
    relevant = mask & (target >= relevance_threshold)
    hits, ndcg5, mrr5, _ = binary_topk(pred, mask, relevant, 5)
    p5 = hits / n_valid.clamp(max=5)  # 0/0 = NaN for tasks with no valid slot
    return {
        "mae": mae,
        "user_rmse": torch.sqrt(sse / n_valid),
        "sse": sse,
        "count": n_valid,
        "ndcg@3": ndcg3,
        "p@5": p5,
        "ndcg@5": ndcg5,
        "mrr@5": mrr5,
    }


def catalog_metrics(
    scores: Tensor, positives: Tensor, exclude: Tensor, *, k: int = 10
) -> dict[str, Tensor]:
    """Top-k retrieval quality when each user's whole catalogue is ranked.

    Why: query-set ranking (:func:`query_metrics`) only orders items the user already rated;
    a recommender must instead surface them among all ``I`` items. Items seen in the support
    set are excluded (they occupy no rank) so the model gets no credit for recalling what it
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

    Tied scores: both are exact expectations over uniformly random orders of the tied items
    (see the module docstring), so e.g. a constant scorer gets ``recall@k = k / n_candidates``
    in expectation whatever the item ids.
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
    hits, ndcg, _, n_pos = binary_topk(scores.to(dtype), ~exclude, positives, k)
    nan = torch.full((), float("nan"), dtype=dtype, device=scores.device)
    recall = torch.where(n_pos > 0, hits / n_pos, nan)
    return {f"recall@{k}": recall, f"ndcg@{k}": ndcg}


def mean_metrics(per_task: dict[str, Tensor]) -> dict[str, float]:
    """Average per-task metrics into Python floats, ignoring NaN (undefined) tasks.

    Why NaN-mean: a task without a relevant item has no meaningful nDCG/MRR; counting it as 0
    would penalise the model for the data, counting it as 1 would flatter it.
    Returns NaN for a metric only when every task is NaN (or there are no tasks).

    Pooled metrics (:data:`POOLED`): when both per-task parts are present (``"sse"`` and
    ``"count"``), ``"rmse"`` is :func:`pooled_rmse` over all tasks' ratings, and the parts
    themselves are not returned (they are sums, not metrics).
    """
    num, den = POOLED["rmse"]
    pool = num in per_task and den in per_task
    out: dict[str, float] = {}
    for name, v in per_task.items():
        if pool and name == num:
            out["rmse"] = float(pooled_rmse(v.detach().double(), per_task[den].detach().double()))
        elif not (pool and name == den):
            out[name] = float(torch.nanmean(v.detach().to(torch.float64)))
    return out
