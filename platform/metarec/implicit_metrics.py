"""Full-catalogue metrics for implicit feedback: did the top of the ranking hold what the
user went on to view, cart or buy?

Why full catalogue: ranking a user's positives against a few sampled negatives can reorder
methods (Krichene & Rendle, KDD 2020), so every item the user has not interacted with in
their support set competes; support items are excluded (they occupy no rank, and no credit
goes to recalling what the model was adapted on). Beyond accuracy, a shop cares which part
of the catalogue gets shown: ``coverage`` (the share of items that reach anyone's top k)
and ``pop_pct`` (how far toward the head the recommended items sit).

Ties are treated as in ``metarec.metrics``: every figure is the exact expectation over
uniformly random orders of tied items, so a popularity ranking with many equal counts is
scored fairly. Vectorized over users; shapes ``T`` users, ``I`` catalogue items.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metarec.batch import TaskBatch, item_marks
from metarec.metrics import TiedTopK, binary_topk, rankable, tied_topk

__all__ = [
    "coverage",
    "implicit_metrics",
    "popularity_percentile",
    "score_implicit",
    "topk_membership",
    "valid_ndcg",
]

CATALOGUE_BLOCK = 1 << 20  # (users x items) pairs per block; a network's activations grow with it


def score_implicit(
    scorer: Any, tasks: TaskBatch, n_items: int, popularity_pct: Tensor | None = None
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-user metrics ``(T,)`` of ``scorer`` (anything with ``predict_items``) ranking the
    whole catalogue, and per item ``sum over users of log(1 - P(in top 10))`` (for
    ``coverage``); users go through in blocks that bound the (users, catalogue) scores.
    ``popularity_pct``: see ``implicit_metrics`` (None: not measured, zeros).

    Support items are not ranked; query items are the positives, except those with
    target 0 (``TaskBatch.cut_support``'s known-but-not-asked history), which are not
    ranked either."""
    pct = torch.zeros(n_items) if popularity_pct is None else popularity_pct
    out: dict[str, list[Tensor]] = {}
    log_not_shown = torch.zeros(n_items, dtype=torch.float64)
    block = max(1, CATALOGUE_BLOCK // n_items)
    for lo in range(0, tasks.num_tasks, block):
        part = tasks.select(torch.arange(lo, min(lo + block, tasks.num_tasks)))
        scores = scorer.predict_items(part, torch.arange(n_items).expand(part.num_tasks, -1))
        asked = part.query_mask & (part.query_ratings > 0)
        exclude = item_marks(part.support_items, part.support_mask, n_items)
        exclude |= item_marks(part.query_items, part.query_mask & ~asked, n_items)
        positives = item_marks(part.query_items, asked, n_items) & ~exclude
        for k, v in implicit_metrics(scores, positives, exclude, pct).items():
            out.setdefault(k, []).append(v)
        log_not_shown += torch.log1p(-topk_membership(scores, exclude, 10)).sum(0)
    return {k: torch.cat(v) for k, v in out.items()}, log_not_shown


def valid_ndcg(scorer: Any, tasks: TaskBatch, n_items: int) -> float:
    """Mean full-catalogue NDCG@10 over ``tasks``: what implicit models are chosen by."""
    return float(torch.nanmean(score_implicit(scorer, tasks, n_items)[0]["ndcg@10"].double()))


def implicit_metrics(
    scores: Tensor,
    positives: Tensor,
    exclude: Tensor,
    popularity_pct: Tensor,
    *,
    k: int = 10,
    k_recall: int = 20,
) -> dict[str, Tensor]:
    """Per-user ``hr@k``, ``ndcg@k``, ``recall@k_recall``, ``mrr`` (no cut-off) and
    ``pop_pct@k`` (mean popularity percentile of the top k), each ``(T,)``; NaN for users
    with no positive outside ``exclude`` (``pop_pct`` is defined for every user).

    Args:
        scores: ``(T, I)`` score of every item for every user.
        positives: ``(T, I)`` bool, the user's held-out (query) items.
        exclude: ``(T, I)`` bool, the user's support items: never ranked, never hits.
        popularity_pct: ``(I,)`` each item's popularity percentile (0 = least, 100 = most).
    """
    if not (scores.shape == positives.shape == exclude.shape) or scores.dim() != 2:
        raise ValueError(
            f"scores/positives/exclude: got shapes {tuple(scores.shape)}, "
            f"{tuple(positives.shape)}, {tuple(exclude.shape)}; expected three equal (T, I)"
        )
    dtype = torch.promote_types(scores.dtype, torch.float32)
    s, valid = scores.to(dtype), ~exclude
    relevant = positives & valid
    n_rel = relevant.sum(1).to(dtype)
    nan = torch.full((), float("nan"), dtype=dtype, device=s.device)
    tk = tied_topk(s, valid, k)  # one top k for ndcg, hr and the membership
    _, ndcg, _, _ = binary_topk(s, valid, relevant, k, tk=tk)
    hits_r, _, _, _ = binary_topk(s, valid, relevant, k_recall)
    member = _membership(tk, s)
    shown = member.sum(1).clamp(min=1e-12)
    return {
        f"hr@{k}": torch.where(n_rel > 0, _hit_rate(tk, relevant, s.dtype), nan),
        f"ndcg@{k}": ndcg,
        f"recall@{k_recall}": torch.where(n_rel > 0, hits_r / n_rel.clamp(min=1), nan),
        "mrr": torch.where(n_rel > 0, _full_rr(s, valid, relevant), nan),
        f"pop_pct@{k}": (member * popularity_pct.to(dtype)).sum(1) / shown,
    }


def topk_membership(scores: Tensor, exclude: Tensor, k: int) -> Tensor:
    """``(T, I)`` probability that each item is in the user's top k: 1 above the k-th
    score, ``m / g`` for the ``g`` items tied at it when ``m`` of its places remain."""
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    return _membership(tied_topk(s, ~exclude, k), s)


def _membership(tk: TiedTopK, s: Tensor) -> Tensor:
    member = torch.zeros_like(s)
    member.scatter_(1, tk.idx, tk.above.to(s.dtype))
    places = (tk.idx.shape[1] - tk.n_greater).clamp(min=0)
    share = torch.where(tk.n_equal > 0, places / tk.n_equal.clamp(min=1), torch.zeros_like(places))
    return torch.where(tk.in_eq, share[:, None], member)


def coverage(log_not_shown: Tensor) -> float:
    """Expected share of the catalogue in at least one user's top k, from the per-item sum
    over users of ``log(1 - membership)`` (accumulated batch by batch)."""
    return float((1 - torch.exp(log_not_shown.double())).mean())


def popularity_percentile(counts: Tensor) -> Tensor:
    """``(I,)`` percentile rank of each item's training interaction count (ties share the
    mean rank): 100 for the most popular item, near 0 for the rarest."""
    order = counts.double().argsort()
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks[order] = torch.arange(len(counts), dtype=torch.float64)
    uniq, inverse = torch.unique(counts.double(), return_inverse=True)
    total = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    size = torch.bincount(inverse, minlength=len(uniq)).double()
    return 100.0 * (total / size)[inverse] / max(len(counts) - 1, 1)


def _hit_rate(tk: TiedTopK, relevant: Tensor, dtype: torch.dtype) -> Tensor:
    """``P(at least one relevant item in the top k)``: 1 when one scores above the k-th
    score; else the chance that the tie group's remaining places catch one of its ``r``
    relevant members (hypergeometric, exact). ``relevant`` holds valid items only."""
    above_hit = (relevant.gather(1, tk.idx) & tk.above).any(1)
    g, m = tk.n_equal, (tk.idx.shape[1] - tk.n_greater).clamp(min=0)
    r = (relevant & tk.in_eq).sum(1).to(dtype)
    miss = torch.ones_like(g)
    for j in range(tk.idx.shape[1]):  # k factors: draw j misses in a row from the group
        step = ((g - r - j) / (g - j).clamp(min=1)).clamp(min=0)
        miss = torch.where((j < m) & (g > 0), miss * step, miss)
    return torch.where(above_hit, torch.ones_like(miss), 1 - miss)


def _full_rr(s: Tensor, valid: Tensor, relevant: Tensor) -> Tensor:
    """``E[1 / rank of the first relevant item]`` over the whole catalogue: ``a`` items
    score above the best relevant score, ``g`` share it, ``r`` of them relevant; the first
    relevant one sits at ``a + J``, ``P(J = j) = C(g-j, r-1) / C(g, r)``."""
    s = rankable(s, valid)
    best = s.masked_fill(~relevant, float("-inf")).max(1, keepdim=True).values
    a = (s > best).sum(1).to(s.dtype)
    tie = (s == best) & valid
    g, r = tie.sum(1).to(s.dtype), (tie & relevant).sum(1).to(s.dtype).clamp(min=1)
    span = int((g - r + 1).max().clamp(min=1))
    j = torch.arange(1, span + 1, dtype=s.dtype, device=s.device)[None, :]
    g_, r_ = g[:, None], r[:, None]
    lg = torch.lgamma
    log_p = (
        lg(g_ - j + 1)
        - lg(r_)
        - lg((g_ - j - r_ + 2).clamp(min=1))
        - (lg(g_ + 1) - lg(r_ + 1) - lg(g_ - r_ + 1))
    )
    p = torch.where(j <= g_ - r_ + 1, torch.exp(log_p), torch.zeros_like(log_p))
    return (p / (a[:, None] + j)).sum(1)
