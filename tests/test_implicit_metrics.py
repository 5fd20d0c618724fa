"""Full-catalogue implicit metrics: exact under ties (checked against every tie order)."""

import itertools
import math

import numpy as np
import pytest
import torch

from metarec.implicit_metrics import (
    coverage,
    implicit_metrics,
    popularity_percentile,
    topk_membership,
)


def _brute(scores, positives, exclude, pct, k, k_recall):
    """The metrics averaged over every order of the valid items consistent with the scores."""
    valid = [i for i in range(len(scores)) if not exclude[i]]
    rel = {i for i in valid if positives[i]}
    orders = [
        p
        for p in itertools.permutations(valid)
        if all(scores[p[a]] >= scores[p[a + 1]] for a in range(len(p) - 1))
    ]
    out = {"hr": 0.0, "ndcg": 0.0, "recall": 0.0, "mrr": 0.0, "pop": 0.0}
    for order in orders:
        hits = [int(i in rel) for i in order]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits[:k]))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        out["hr"] += float(any(hits[:k]))
        out["ndcg"] += dcg / idcg
        out["recall"] += sum(hits[:k_recall]) / len(rel)
        out["mrr"] += 1 / (hits.index(1) + 1)
        out["pop"] += float(np.mean([pct[i] for i in order[:k]]))
    return {key: v / len(orders) for key, v in out.items()}


@pytest.mark.parametrize("seed", range(25))
def test_every_metric_is_the_exact_mean_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    n = 7
    scores = rng.integers(0, 3, size=n).astype(float)  # few values: many ties
    exclude = rng.random(n) < 0.2
    positives = (rng.random(n) < 0.4) & ~exclude
    if not positives.any():
        positives[np.flatnonzero(~exclude)[0]] = True
    pct = rng.uniform(0, 100, size=n)
    k, k_recall = 2, 3
    got = implicit_metrics(
        torch.tensor(scores)[None],
        torch.tensor(positives)[None],
        torch.tensor(exclude)[None],
        torch.tensor(pct),
        k=k,
        k_recall=k_recall,
    )
    want = _brute(scores, positives, exclude, pct, k, k_recall)
    assert got["hr@2"].item() == pytest.approx(want["hr"])
    assert got["ndcg@2"].item() == pytest.approx(want["ndcg"])
    assert got["recall@3"].item() == pytest.approx(want["recall"])
    assert got["mrr"].item() == pytest.approx(want["mrr"])
    assert got["pop_pct@2"].item() == pytest.approx(want["pop"])


def test_untied_ranks_by_hand_and_support_items_never_count():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0]])
    positives = torch.tensor([[True, False, False, True, False, False]])
    exclude = torch.tensor([[True, False, False, False, False, False]])  # item 0: support
    m = implicit_metrics(scores, positives, exclude, torch.zeros(6), k=2, k_recall=3)
    # item 0 is excluded, so the only positive left (item 3) sits at rank 3
    assert m["hr@2"].item() == 0.0 and m["recall@3"].item() == 1.0
    assert m["mrr"].item() == pytest.approx(1 / 3) and m["ndcg@2"].item() == 0.0
    nobody = implicit_metrics(scores, exclude & False, exclude, torch.zeros(6))
    assert math.isnan(nobody["hr@10"].item()) and math.isnan(nobody["mrr"].item())


def test_a_constant_scorer_gets_the_random_ranking_expectation():
    n, k = 50, 10
    positives = torch.zeros(1, n, dtype=torch.bool)
    positives[0, :5] = True
    m = implicit_metrics(
        torch.zeros(1, n), positives, torch.zeros(1, n, dtype=torch.bool), torch.zeros(n), k=k
    )
    assert m["recall@20"].item() == pytest.approx(20 / n)
    assert m["hr@10"].item() == pytest.approx(1 - math.comb(n - 5, k) / math.comb(n, k))


def test_coverage_and_popularity_percentiles():
    scores = torch.tensor([[4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 3.0], [4.0, 3.0, 0.0, 0.0]])
    member = topk_membership(scores, torch.zeros_like(scores, dtype=torch.bool), 2)
    assert coverage(torch.log1p(-member).sum(0)) == 1.0
    assert coverage(torch.log1p(-member[[0, 2]]).sum(0)) == 0.5
    pct = popularity_percentile(torch.tensor([5, 1, 1, 9]))
    assert pct.tolist() == pytest.approx([200 / 3, 50 / 3, 50 / 3, 100.0])
