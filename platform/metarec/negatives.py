"""Negative items for implicit-feedback tasks: what a user did *not* interact with.

An implicit task has positives only; a loss that contrasts them (BCE, BPR) needs items to
contrast them with. Uniform negatives are mostly obscure items a user never saw, so they
teach little; popularity-weighted ones are items the user likely saw and passed over, but
used alone they teach the model to demote popular items. A mix of the two is the usual
answer, and its share is a setting. A user's own positives are never drawn.

Vectorized over tasks: candidates are oversampled for the whole batch at once, positives
and repeats are rejected with one batched ``searchsorted``, and the first ``count`` survivors
of each row are kept (no loop over users).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["draw_candidates", "fixed_candidates", "keep_negatives"]

# Weyl-sequence steps (fractional parts of irrational multiples are equidistributed).
_USER_STEP, _UNIFORM_STEP = 0.6180339887498949, 0.7548776662466927
_POPULAR_STEP = 0.5698402909980532


def draw_candidates(
    tasks: int,
    n_items: int,
    count: int,
    *,
    popularity: Tensor | None = None,
    popular_share: float = 0.5,
    generator: torch.Generator | None = None,
    oversample: int = 3,
) -> Tensor:
    """``(tasks, count * oversample)`` candidate negatives, before rejection
    (``keep_negatives`` then keeps ``count`` of them per task).

    Kept apart from ``keep_negatives`` so that data-parallel workers can draw for a whole
    meta-batch from their shared generator and each reject against the tasks it holds:
    the same negatives as one process, whatever the sharding.

    Args:
        n_items: catalogue size; items are ``0 .. n_items - 1``.
        popularity: ``(n_items,)`` non-negative weights (e.g. interaction counts) for the
            popularity-weighted share; None: every candidate is uniform.
        popular_share: the share of candidates drawn by popularity (the rest uniform).
        oversample: candidates drawn per negative wanted, before rejection.
    """
    if not 0.0 <= popular_share <= 1.0:
        raise ValueError(f"popular_share: got {popular_share}; expected a share in [0, 1]")
    n_cand = count * oversample
    n_pop = round(n_cand * popular_share) if popularity is not None else 0
    cand = torch.randint(0, n_items, (tasks, n_cand - n_pop), generator=generator)
    if n_pop:
        weights = popularity.double().clamp(min=0) + 1e-12
        drawn = torch.multinomial(weights, tasks * n_pop, replacement=True, generator=generator)
        cand = torch.cat([drawn.view(tasks, n_pop), cand], 1)
        cand = cand.gather(1, torch.rand(cand.shape, generator=generator).argsort(1))  # mix
    return cand


def fixed_candidates(
    keys: Tensor,
    n_items: int,
    count: int,
    *,
    popularity: Tensor | None = None,
    popular_share: float = 0.5,
    oversample: int = 3,
) -> Tensor:
    """Like ``draw_candidates``, but a function of one integer per task (``keys``, e.g. a
    digest of its support set) alone: the same in any batch, chunk or process. Candidate j
    of key u is ``quantile(frac(u * a + j * b))`` of the uniform or popularity
    distribution, with irrational a, b (a low-discrepancy sequence per key); the
    popularity share is interleaved evenly along j.
    """
    if not 0.0 <= popular_share <= 1.0:
        raise ValueError(f"popular_share: got {popular_share}; expected a share in [0, 1]")
    j = torch.arange(count * oversample, dtype=torch.float64)
    start = torch.frac(keys.cpu().double()[:, None] * _USER_STEP)
    u = torch.frac(start + j * _UNIFORM_STEP)
    cand = (u * n_items).long().clamp_max(n_items - 1)
    if popularity is None or popular_share == 0.0:
        return cand
    cdf = popularity.double().clamp(min=0).add(1e-12).cumsum(0)
    p = torch.frac(start + j * _POPULAR_STEP) * cdf[-1]
    popular = torch.searchsorted(cdf, p).clamp_max(n_items - 1)
    is_popular = torch.floor((j + 1) * popular_share) > torch.floor(j * popular_share)
    return torch.where(is_popular, popular, cand)


def keep_negatives(
    cand: Tensor, positives: Tensor, mask: Tensor, count: int
) -> tuple[Tensor, Tensor]:
    """The first ``count`` candidates of each row that are neither a positive of that task
    nor a repeat.

    Args:
        cand: ``(T, C)`` candidates (``draw_candidates``, ``fixed_candidates``).
        positives: ``(T, L)`` item indices of each task's positives (support and query).
        mask: ``(T, L)`` bool, which entries of ``positives`` are real.

    Returns:
        ``(T, count)`` items and a ``(T, count)`` bool mask: False only where a task has
        fewer than ``count`` candidates left (a tiny catalogue or a very active user).
    """
    big = torch.iinfo(torch.long).max
    own = torch.sort(torch.where(mask, positives, big), dim=1).values
    sentinel = torch.full((own.shape[0], 1), big, dtype=own.dtype, device=own.device)
    own = torch.cat([own, sentinel], 1)  # a task with no positives (zero width) is fine
    at = torch.searchsorted(own, cand).clamp(max=own.shape[1] - 1)
    is_positive = own.gather(1, at) == cand
    # a repeat of an earlier candidate in the same row is rejected too
    ranked, order = torch.sort(cand, dim=1, stable=True)
    repeat_sorted = torch.zeros_like(ranked, dtype=torch.bool)
    repeat_sorted[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    repeat = torch.zeros_like(repeat_sorted).scatter_(1, order, repeat_sorted)
    keep = ~(is_positive | repeat)
    first = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :count]
    return cand.gather(1, first), keep.gather(1, first)
