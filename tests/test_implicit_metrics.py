"""Full-catalogue implicit metrics: exact under ties (checked against every tie order)."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from metarec.batch import TaskBatch
from metarec.implicit_metrics import (
    coverage,
    implicit_metrics,
    popularity_percentile,
    score_implicit,
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


class _Fixed:
    """Scores item i as ``scores[i]`` for every user."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = torch.tensor(scores, dtype=torch.float64)

    def predict_items(self, tasks, items):
        return self.scores[items]


def test_a_cut_support_leaves_the_rest_of_the_history_unranked_and_unasked():
    """One user: support items 0..4 in order, query items 5, 6. Cut to the first 2 support
    items, items 2..4 move to the query as known-but-not-asked (target 0): neither ranked
    nor positives, while the model only sees items 0, 1."""
    tasks = TaskBatch(
        users=torch.tensor([0]),
        support_items=torch.tensor([[0, 1, 2, 3, 4]]),
        support_ratings=torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]),
        support_mask=torch.ones(1, 5, dtype=torch.bool),
        query_items=torch.tensor([[5, 6]]),
        query_ratings=torch.tensor([[1.0, 1.0]]),
        query_mask=torch.ones(1, 2, dtype=torch.bool),
    )
    cut = tasks.cut_support(2)
    assert cut.support_items[cut.support_mask].tolist() == [0, 1]
    moved = cut.query_mask & (cut.query_ratings == 0)
    assert sorted(cut.query_items[moved].tolist()) == [2, 3, 4]
    # items 0..4 score highest; had 2..4 been ranked, item 5 would sit at rank 4, not 1
    scorer = _Fixed([9.0, 8.0, 7.0, 6.0, 6.5, 5.0, 0.5, 0.1])
    m, _ = score_implicit(scorer, cut, 8)
    assert float(m["mrr"][0]) == 1.0  # item 5 first among the ranked items 5, 6, 7
    assert float(m["ndcg@10"][0]) == pytest.approx(1.0)  # both positives on top
    # the same three items as plain negatives would take ranks 1-3
    plain = replace(cut, query_mask=cut.query_mask & (cut.query_ratings > 0))
    assert float(score_implicit(scorer, plain, 8)[0]["mrr"][0]) == pytest.approx(0.25)
