"""Per-task metrics: each one against a hand computation, plus padding, ties, NaN and exclusion.

Ties are checked against brute force: the average over every order of the tied items.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from metarec.metrics import POOLED, catalog_metrics, mean_metrics, pooled_rmse, query_metrics

L2, L3, L4, L5, L6 = (math.log2(n) for n in (2, 3, 4, 5, 6))
THR = 4.0  # relevance threshold of a 1-5 scale; callers derive it from the scale


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


# --- query_metrics: one hand-computed task --------------------------------------------------

# pred order: slot 1 (0.9) > slot 3 (0.8) > slot 0 (0.7) > slot 4 (0.2) > slot 2 (0.1)
PRED = _t([[0.7, 0.9, 0.1, 0.8, 0.2]])
TARGET = _t([[5.0, 3.0, 4.0, 1.0, 2.0]])
MASK = _m([[True] * 5])


def test_mae_and_user_rmse_are_per_task_over_valid_entries():
    pred, target = _t([[1.0, 2.0, 9.0], [4.0, 4.0, 0.0]]), _t([[2.0, 4.0, 0.0], [1.0, 4.0, 0.0]])
    mask = _m([[True, True, False], [True, True, True]])
    out = query_metrics(pred, target, mask, relevance_threshold=THR)
    # task 0: errors 1, 2 -> MAE 3/2, RMSE sqrt(5/2); task 1: errors 3, 0, 0 -> 1, sqrt(9/3)
    torch.testing.assert_close(out["mae"], _t([1.5, 1.0]))
    torch.testing.assert_close(out["user_rmse"], _t([math.sqrt(2.5), math.sqrt(3.0)]))
    torch.testing.assert_close(out["sse"], _t([5.0, 9.0]))
    torch.testing.assert_close(out["count"], _t([2.0, 3.0]))
    assert "rmse" not in out  # RMSE is pooled over ratings, only by mean_metrics


def test_ndcg3_uses_linear_true_rating_gain():
    out = query_metrics(PRED, TARGET, MASK, relevance_threshold=THR)
    # ranked true ratings 3, 1, 5: DCG = 3/log2(2) + 1/log2(3) + 5/log2(4)
    # ideal 5, 4, 3:             IDCG = 5/log2(2) + 4/log2(3) + 3/log2(4)
    expected = (3 / L2 + 1 / L3 + 5 / L4) / (5 / L2 + 4 / L3 + 3 / L4)
    assert out["ndcg@3"].item() == pytest.approx(expected, rel=1e-6)


def test_ndcg3_uses_all_items_when_fewer_than_three_valid():
    pred, target = _t([[0.1, 0.9, 0.5]]), _t([[4.0, 2.0, 0.0]])
    out = query_metrics(pred, target, _m([[True, True, False]]), relevance_threshold=THR)
    # ranked 2, 4: DCG = 2/log2(2) + 4/log2(3); ideal 4, 2: IDCG = 4/log2(2) + 2/log2(3)
    expected = (2 / L2 + 4 / L3) / (4 / L2 + 2 / L3)
    assert out["ndcg@3"].item() == pytest.approx(expected, rel=1e-6)


def test_binary_ranking_metrics_on_hand_example():
    out = query_metrics(PRED, TARGET, MASK, relevance_threshold=THR)
    # relevance (>= 4) of slots: [1, 0, 1, 0, 0]; ranked order 1, 3, 0, 4, 2 -> rel 0, 0, 1, 0, 1
    # P@5 = 2/5; nDCG@5 = (1/log2(4) + 1/log2(6)) / (1/log2(2) + 1/log2(3)); MRR@5 = 1/3
    assert out["p@5"].item() == pytest.approx(2 / 5)
    expected_ndcg = (1 / L4 + 1 / L6) / (1 / L2 + 1 / L3)
    assert out["ndcg@5"].item() == pytest.approx(expected_ndcg, rel=1e-6)
    assert out["mrr@5"].item() == pytest.approx(1 / 3)


def test_top5_cutoff_ignores_relevant_items_ranked_sixth():
    pred = _t([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    target = _t([[1.0, 1.0, 1.0, 1.0, 4.0, 5.0, 5.0]])
    out = query_metrics(pred, target, _m([[True] * 7]), relevance_threshold=THR)
    # one hit (rank 5) in the top 5: P@5 = 1/5, MRR@5 = 1/5
    # 3 relevant -> nDCG@5 = (1/log2(6)) / (1/log2(2) + 1/log2(3) + 1/log2(4))
    assert out["p@5"].item() == pytest.approx(1 / 5)
    assert out["mrr@5"].item() == pytest.approx(1 / 5)
    assert out["ndcg@5"].item() == pytest.approx((1 / L6) / (1 / L2 + 1 / L3 + 1 / L4), rel=1e-6)


def test_mrr5_is_zero_when_no_relevant_item_reaches_top5():
    pred = _t([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])
    target = _t([[1.0, 1.0, 1.0, 1.0, 1.0, 5.0]])
    out = query_metrics(pred, target, _m([[True] * 6]), relevance_threshold=THR)
    # the only relevant item is ranked 6th: MRR@5 = 0, P@5 = 0, nDCG@5 = 0
    assert out["mrr@5"].item() == 0.0
    assert out["p@5"].item() == 0.0
    assert out["ndcg@5"].item() == 0.0


def test_p5_divides_by_valid_count_when_fewer_than_five():
    pred, target = _t([[0.5, 0.4, 0.3, 7.0]]), _t([[5.0, 1.0, 4.0, 5.0]])
    out = query_metrics(pred, target, _m([[1, 1, 1, 0]]), relevance_threshold=THR)
    # 3 valid items, 2 relevant among them: P@5 = 2 / min(5, 3)
    assert out["p@5"].item() == pytest.approx(2 / 3)


def test_tasks_without_relevant_items_get_nan_for_ndcg5_and_mrr5_only():
    pred, target = _t([[0.3, 0.2], [0.3, 0.2]]), _t([[1.0, 2.0], [5.0, 2.0]])
    out = query_metrics(pred, target, _m([[True, True], [True, True]]), relevance_threshold=THR)
    assert torch.isnan(out["ndcg@5"][0]) and torch.isnan(out["mrr@5"][0])
    assert out["p@5"][0].item() == 0.0  # P@5 is defined: 0 of 2
    # task 1: the relevant item is ranked first: nDCG@5 = MRR@5 = 1
    assert out["ndcg@5"][1].item() == pytest.approx(1.0)
    assert out["mrr@5"][1].item() == pytest.approx(1.0)
    # the caller's NaN-mean skips the undefined task
    assert mean_metrics(out)["mrr@5"] == pytest.approx(1.0)


def test_task_with_no_valid_slot_is_nan_everywhere_but_its_sums():
    out = query_metrics(_t([[1.0, 2.0]]), _t([[5.0, 5.0]]), _m([[0, 0]]), relevance_threshold=THR)
    # sums are 0 (the task adds nothing to the pooled RMSE); every metric is NaN
    assert out["sse"].item() == 0.0 and out["count"].item() == 0.0
    assert all(torch.isnan(v).all() for k, v in out.items() if k not in ("sse", "count"))


def test_padded_columns_never_change_any_metric():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 7, generator=gen) * 5
    target = torch.randint(1, 6, (6, 7), generator=gen).float()
    mask = torch.rand(6, 7, generator=gen) < 0.7
    base = query_metrics(pred, target, mask, relevance_threshold=THR)
    junk = _t([[1e9, -1e9, float("nan"), float("inf"), 5.0]] * 6)
    padded = query_metrics(
        torch.cat([pred, junk], 1),
        torch.cat([target, junk.flip(1)], 1),
        torch.cat([mask, torch.zeros(6, 5, dtype=torch.bool)], 1),
        relevance_threshold=THR,
    )
    for name in base:
        torch.testing.assert_close(padded[name], base[name], equal_nan=True)


def test_padded_slot_never_outranks_a_valid_minus_inf_prediction():
    pred = _t([[0.0, float("-inf")]])  # padded slot 0 has the higher value
    out = query_metrics(pred, _t([[1.0, 5.0]]), _m([[False, True]]), relevance_threshold=THR)
    # the only valid item is relevant and must be ranked first
    assert out["mrr@5"].item() == 1.0


def test_tied_predictions_score_the_expectation_over_tie_orders_not_positions():
    # was test_tied_predictions_are_broken_by_position: the earlier slot no longer wins ties
    pred = _t([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    target = _t([[5.0, 1.0, 1.0], [1.0, 1.0, 5.0]])
    out = query_metrics(pred, target, _m([[True] * 3] * 2), relevance_threshold=THR)
    # the relevant item is equally likely at rank 1, 2, 3 in both tasks
    torch.testing.assert_close(out["mrr@5"], _t([(1 + 1 / 2 + 1 / 3) / 3] * 2))
    # nDCG@3: every rank holds an expected gain 7/3; IDCG = 5/log2(2) + 1/log2(3) + 1/log2(4)
    expected = 7 / 3 * (1 / L2 + 1 / L3 + 1 / L4) / (5 / L2 + 1 / L3 + 1 / L4)
    torch.testing.assert_close(out["ndcg@3"], _t([expected] * 2))
    torch.testing.assert_close(out["p@5"], _t([1 / 3] * 2))


def test_query_metrics_rejects_mismatched_shapes_and_non_bool_mask():
    z, ones = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shapes"):
        query_metrics(z, z, torch.ones(2, 4, dtype=torch.bool), relevance_threshold=THR)
    with pytest.raises(TypeError, match="bool"):
        query_metrics(z, z, torch.ones(2, 3), relevance_threshold=THR)
    with pytest.raises(ValueError, match="relevance_threshold"):
        query_metrics(z, z, ones, relevance_threshold=float("nan"))


def test_relevance_threshold_has_no_default():
    # the threshold depends on the rating scale, so the caller must always pass it
    with pytest.raises(TypeError, match="relevance_threshold"):
        query_metrics(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool))


def test_relevance_threshold_decides_relevance():
    pred, target, mask = _t([[0.9, 0.1]]), _t([[3.0, 5.0]]), _m([[True, True]])
    # threshold 3: both relevant, the first ranked first; threshold 4: only the 2nd-ranked one
    assert query_metrics(pred, target, mask, relevance_threshold=3.0)["mrr@5"].item() == 1.0
    assert query_metrics(pred, target, mask, relevance_threshold=4.0)["mrr@5"].item() == 0.5


# --- slow references: a strict order, and the average over every order of the ties ---------


def _strict_query(order, target, threshold=THR):
    """All query ranking metrics of one task ranked in ``order`` (indices of valid slots)."""
    rel = [target[i] >= threshold for i in order]
    k = min(3, len(order))
    dcg3 = sum(target[i] / math.log2(r + 2) for r, i in enumerate(order[:k]))
    ideal = sorted((target[i] for i in order), reverse=True)
    idcg3 = sum(g / math.log2(r + 2) for r, g in enumerate(ideal[:k]))
    n_rel = sum(rel)
    dcg5 = sum(1 / math.log2(r + 2) for r in range(min(5, len(rel))) if rel[r])
    idcg5 = sum(1 / math.log2(r + 2) for r in range(min(5, n_rel)))
    first = next((r for r in range(min(5, len(rel))) if rel[r]), None)
    return {
        "ndcg@3": dcg3 / idcg3,
        "p@5": sum(rel[:5]) / min(5, len(order)),
        "ndcg@5": dcg5 / idcg5 if n_rel else math.nan,
        "mrr@5": (0.0 if first is None else 1 / (first + 1)) if n_rel else math.nan,
    }


def _strict_catalog(order, positive, k):
    """recall@k and nDCG@k of one task whose candidates are ranked in ``order``."""
    n_pos = sum(positive[i] for i in order)
    dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(order[:k]) if positive[i])
    idcg = sum(1 / math.log2(r + 2) for r in range(min(n_pos, k)))
    if not n_pos:
        return {f"recall@{k}": math.nan, f"ndcg@{k}": math.nan}
    return {f"recall@{k}": sum(positive[i] for i in order[:k]) / n_pos, f"ndcg@{k}": dcg / idcg}


def _over_all_tie_orders(score, items, metric):
    """Average of ``metric(order)`` over every permutation of ``items`` as tie-breaker.

    Ranking by (score desc, position in a permutation) for all ``n!`` permutations gives each
    order of every tie group equally often: the uniform tie-order expectation, brute force.
    """
    totals: dict[str, float] = {}
    perms = list(itertools.permutations(items))
    for perm in perms:
        tie_pos = {i: p for p, i in enumerate(perm)}
        order = sorted(items, key=lambda i: (-score[i], tie_pos[i]))
        for name, v in metric(order).items():
            totals[name] = totals.get(name, 0.0) + v
    return {name: v / len(perms) for name, v in totals.items()}


def _assert_rows_match(out, expected_rows):
    for row, expected in enumerate(expected_rows):
        for name, v in expected.items():
            got = out[name][row].item()
            assert (math.isnan(got) and math.isnan(v)) or abs(got - v) <= 1e-9, (row, name, got, v)


def test_untied_query_metrics_match_slow_reference_on_random_tasks():
    gen = torch.Generator().manual_seed(1234)
    t, q = 20, 12
    pred = torch.rand(t, q, generator=gen, dtype=torch.float64)  # distinct: no ties
    target = torch.randint(1, 6, (t, q), generator=gen).double()
    mask = torch.rand(t, q, generator=gen) < 0.6
    mask[:, 0] = True  # every task has at least one valid slot
    out = query_metrics(pred, target, mask, relevance_threshold=THR)
    expected = []
    for row in range(t):
        valid = mask[row].nonzero().flatten().tolist()
        order = sorted(valid, key=lambda i: -pred[row, i].item())
        expected.append(_strict_query(order, target[row].tolist()))
    _assert_rows_match(out, expected)


def test_tied_query_metrics_equal_the_average_over_every_tie_order():
    gen = torch.Generator().manual_seed(7)
    t, q = 30, 7
    pred = torch.randint(0, 3, (t, q), generator=gen).double()  # heavy ties: {0, 1, 2}
    target = torch.randint(1, 6, (t, q), generator=gen).double()
    mask = torch.rand(t, q, generator=gen) < 0.8
    mask[:, 0] = True
    out = query_metrics(
        torch.cat([pred, _t([[2.0, float("nan")]] * t).double()], 1),  # padding ties the top
        torch.cat([target, _t([[5.0, float("inf")]] * t).double()], 1),
        torch.cat([mask, torch.zeros(t, 2, dtype=torch.bool)], 1),
        relevance_threshold=THR,
    )
    expected = []
    for row in range(t):
        valid = mask[row].nonzero().flatten().tolist()
        score, tgt = pred[row].tolist(), target[row].tolist()
        expected.append(_over_all_tie_orders(score, valid, lambda o, g=tgt: _strict_query(o, g)))
    _assert_rows_match(out, expected)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_tied_catalog_metrics_equal_the_average_over_every_tie_order(k):
    gen = torch.Generator().manual_seed(11 + k)
    t, n = 30, 6
    scores = torch.randint(0, 3, (t, n), generator=gen).double()
    positives = torch.rand(t, n, generator=gen) < 0.4
    exclude = torch.rand(t, n, generator=gen) < 0.25
    out = catalog_metrics(
        torch.cat([scores, _t([[float("inf"), float("nan")]] * t).double()], 1),
        torch.cat([positives, torch.ones(t, 2, dtype=torch.bool)], 1),
        torch.cat([exclude, torch.ones(t, 2, dtype=torch.bool)], 1),  # junk, excluded
        k=k,
    )
    expected = []
    for row in range(t):
        cand = (~exclude[row]).nonzero().flatten().tolist()
        pos = positives[row].tolist()
        expected.append(
            _over_all_tie_orders(
                scores[row].tolist(), cand, lambda o, p=pos: _strict_catalog(o, p, k)
            )
        )
    _assert_rows_match(out, expected)


# --- constant predictors: same metrics whatever the ids, equal to closed forms --------------


def _permute_columns(gen, *xs):
    """Each row's columns shuffled by its own random permutation (same one for every x)."""
    perm = torch.argsort(torch.rand(xs[0].shape, generator=gen), dim=1)
    return [x.gather(1, perm) for x in xs]


def test_constant_predictor_metrics_do_not_depend_on_item_positions_or_ids():
    gen = torch.Generator().manual_seed(3)
    t, q, n = 16, 9, 40
    target = torch.randint(1, 6, (t, q), generator=gen).double()
    mask = torch.rand(t, q, generator=gen) < 0.8
    mask[:, :2] = True
    positives = torch.rand(t, n, generator=gen) < 0.1
    exclude = torch.rand(t, n, generator=gen) < 0.2
    for const in (3.5, float("nan")):  # a NaN predictor ties every item too
        pred, scores = torch.full((t, q), const).double(), torch.full((t, n), const).double()
        base_q = query_metrics(pred, target, mask, relevance_threshold=THR)
        base_c = catalog_metrics(scores, positives, exclude, k=10)
        for _ in range(5):
            p, y, m = _permute_columns(gen, pred, target, mask)
            s, pos, ex = _permute_columns(gen, scores, positives, exclude)
            for out, base in (
                (query_metrics(p, y, m, relevance_threshold=THR), base_q),
                (catalog_metrics(s, pos, ex, k=10), base_c),
            ):
                for name in base:
                    torch.testing.assert_close(
                        out[name], base[name], atol=1e-12, rtol=0, equal_nan=True
                    )


def test_ties_are_scored_the_same_whatever_the_item_positions():
    gen = torch.Generator().manual_seed(5)
    t, q = 32, 8
    pred = torch.randint(0, 3, (t, q), generator=gen).double()
    target = torch.randint(1, 6, (t, q), generator=gen).double()
    mask = torch.rand(t, q, generator=gen) < 0.8
    base = query_metrics(pred, target, mask, relevance_threshold=THR)
    for _ in range(5):
        p, y, m = _permute_columns(gen, pred, target, mask)
        out = query_metrics(p, y, m, relevance_threshold=THR)
        for name in base:
            torch.testing.assert_close(out[name], base[name], atol=1e-12, rtol=0, equal_nan=True)


@pytest.mark.parametrize("n", [1, 3, 5, 8, 20])
def test_constant_predictor_with_one_relevant_item_matches_closed_forms(n):
    target = torch.ones(1, n, dtype=torch.float64)
    target[0, n // 2] = 5.0  # the one relevant item, anywhere
    out = query_metrics(
        torch.zeros(1, n, dtype=torch.float64),
        target,
        torch.ones(1, n, dtype=torch.bool),
        relevance_threshold=THR,
    )
    c = [sum(1 / math.log2(r + 2) for r in range(j)) for j in range(11)]  # C[j]
    # the relevant item is uniform over ranks 1..n
    assert out["p@5"].item() == pytest.approx(min(5, n) / n / min(5, n), abs=1e-12)  # 1/n
    assert out["ndcg@5"].item() == pytest.approx(c[min(5, n)] / n, abs=1e-12)
    assert out["mrr@5"].item() == pytest.approx(
        sum(1 / j for j in range(1, min(5, n) + 1)) / n, abs=1e-12
    )
    m = min(3, n)  # every top-3 rank holds the mean gain (5 + (n-1)) / n
    ideal = [5.0] + [1.0] * (m - 1)
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    assert out["ndcg@3"].item() == pytest.approx((4 + n) / n * c[m] / idcg, abs=1e-12)

    positives = torch.zeros(1, n + 2, dtype=torch.bool)
    positives[0, 0] = True
    exclude = torch.zeros(1, n + 2, dtype=torch.bool)
    exclude[0, -2:] = True  # n candidates remain
    cat = catalog_metrics(torch.zeros(1, n + 2, dtype=torch.float64), positives, exclude, k=10)
    assert cat["recall@10"].item() == pytest.approx(min(10, n) / n, abs=1e-12)  # k/N
    assert cat["ndcg@10"].item() == pytest.approx(c[min(10, n)] / n, abs=1e-12)


def test_mrr_of_two_relevant_among_four_tied_items():
    # first relevant rank: 1 w.p. 2/4, 2 w.p. (2/4)(2/3) = 1/3, 3 w.p. 1/6
    out = query_metrics(
        torch.zeros(1, 4), _t([[5.0, 1.0, 5.0, 1.0]]), _m([[True] * 4]), relevance_threshold=THR
    )
    assert out["mrr@5"].item() == pytest.approx(1 / 2 + 1 / 3 / 2 + 1 / 6 / 3, rel=1e-6)


def test_tie_group_straddling_the_cutoff_counts_only_ranks_up_to_k():
    # item A (score 2) is rank 1; then 4 items tie at 1 for ranks 2..5, one of them relevant;
    # top 3 = A + 2 of the 4: E[hits] = 2/4, E[DCG@3] = (1/4)(1/log2(3) + 1/log2(4))
    scores = _t([[2.0, 1.0, 1.0, 1.0, 1.0]])
    cat = catalog_metrics(scores, _m([[0, 0, 0, 1, 0]]), _m([[0] * 5]), k=3)
    assert cat["recall@3"].item() == pytest.approx(0.5)
    assert cat["ndcg@3"].item() == pytest.approx((1 / L3 + 1 / L4) / 4, rel=1e-6)
    # query: A first, then 5 tied items for ranks 2..6, one relevant: rank 6 earns no MRR@5
    pred = _t([[2.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    out = query_metrics(pred, _t([[1, 1, 1, 5, 1, 1]]), _m([[1] * 6]), relevance_threshold=THR)
    assert out["mrr@5"].item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5, rel=1e-6)
    assert out["p@5"].item() == pytest.approx(4 / 5 / 5, rel=1e-6)  # in the top 5 w.p. 4/5


def test_valid_nan_or_minus_inf_scores_rank_below_finite_ones_and_tie_with_each_other():
    scores = _t([[float("nan"), 0.0, float("-inf"), 9.0]])
    positives = _m([[True, False, False, False]])
    exclude = _m([[False, False, False, True]])  # the excluded item never takes a rank
    cat = catalog_metrics(scores, positives, exclude, k=2)
    # ranks: item 1 (0.0) first; items 0 and 2 tie for ranks 2-3: the positive is 2nd w.p. 1/2
    assert cat["recall@2"].item() == pytest.approx(0.5)
    assert cat["ndcg@2"].item() == pytest.approx(0.5 / L3, rel=1e-6)


# --- pooled RMSE ----------------------------------------------------------------------------


def test_rmse_is_pooled_over_ratings_not_averaged_over_users():
    nan = float("nan")
    pred, target = _t([[2.0, 3.0], [5.0, 7.0]]), _t([[1.0, 2.0], [2.0, nan]])
    out = query_metrics(pred, target, _m([[True, True], [True, False]]), relevance_threshold=THR)
    # task A errors [1, 1], task B errors [3] (its padded slot is ignored)
    torch.testing.assert_close(out["sse"], _t([2.0, 9.0]))
    torch.testing.assert_close(out["count"], _t([2.0, 1.0]))
    mean = mean_metrics(out)
    assert mean["rmse"] == pytest.approx(math.sqrt((1 + 1 + 9) / 3))  # pooled: 1.915
    assert mean["user_rmse"] == pytest.approx((1 + 3) / 2)  # per-user mean: 2.0
    assert mean["mae"] == pytest.approx((1 + 3) / 2)
    assert "sse" not in mean and "count" not in mean


def test_pooled_rmse_helper_keeps_leading_dims_for_resampling():
    assert POOLED == {"rmse": ("sse", "count")}
    sse = torch.tensor([[2.0, 9.0], [2.0, 2.0], [9.0, 9.0]], dtype=torch.float64)  # (B, T)
    count = torch.tensor([[2.0, 1.0], [2.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([math.sqrt(11 / 3), 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(pooled_rmse(sse, count), expected)


def test_mean_metrics_without_pooled_parts_leaves_keys_alone():
    out = mean_metrics({"sse": _t([4.0]), "mae": _t([1.0])})  # no "count": nothing to pool
    assert out == {"sse": 4.0, "mae": 1.0}


# --- catalog_metrics ------------------------------------------------------------------------


def test_catalog_recall_and_ndcg_on_hand_example():
    scores = _t([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    positives = _m([[False, True, False, False, True, True]])
    exclude = _m([[False] * 6])
    out = catalog_metrics(scores, positives, exclude, k=3)
    # top-3 = items 0, 1, 2 -> one hit (item 1, rank 2) of 3 positives: recall@3 = 1/3
    # nDCG@3 = (1/log2(3)) / (1/log2(2) + 1/log2(3) + 1/log2(4))
    assert set(out) == {"recall@3", "ndcg@3"}
    assert out["recall@3"].item() == pytest.approx(1 / 3)
    assert out["ndcg@3"].item() == pytest.approx((1 / L3) / (1 / L2 + 1 / L3 + 1 / L4), rel=1e-6)


def test_catalog_never_ranks_support_items():
    scores = _t([[9.0, 8.0, 0.3, 0.2, 0.1]])
    positives = _m([[False, False, True, False, True]])
    exclude = _m([[True, True, False, False, False]])  # the two best-scored items are support
    out = catalog_metrics(scores, positives, exclude, k=2)
    # top-2 after exclusion = items 2, 3 -> hit at rank 1 of 2 positives: recall@2 = 1/2
    # nDCG@2 = (1/log2(2)) / (1/log2(2) + 1/log2(3))
    assert out["recall@2"].item() == pytest.approx(0.5)
    assert out["ndcg@2"].item() == pytest.approx(1 / (1 + 1 / L3), rel=1e-6)


def test_catalog_excluded_items_are_never_hits_even_when_k_exceeds_candidates():
    scores = _t([[0.5, 0.4, 0.3]])
    positives = _m([[True, True, False]])
    exclude = _m([[False, True, True]])  # item 1 is positive but excluded: dropped
    out = catalog_metrics(scores, positives, exclude, k=10)
    # only item 0 is rankable and positive; it is ranked 1st: recall = 1/1, nDCG = 1
    assert out["recall@10"].item() == pytest.approx(1.0)
    assert out["ndcg@10"].item() == pytest.approx(1.0)


def test_catalog_task_without_positives_is_nan():
    scores = _t([[0.5, 0.4], [0.1, 0.9]])
    out = catalog_metrics(scores, _m([[False, False], [True, False]]), _m([[False] * 2] * 2), k=1)
    # task 1: the positive (item 0) is ranked 2nd, outside the top 1
    assert torch.isnan(out["recall@1"][0]) and torch.isnan(out["ndcg@1"][0])
    assert out["recall@1"][1].item() == 0.0 and out["ndcg@1"][1].item() == 0.0


# --- mean_metrics ---------------------------------------------------------------------------


def test_mean_metrics_is_a_nan_mean_returning_floats():
    per_task = {"a": _t([1.0, float("nan"), 3.0]), "b": _t([float("nan"), float("nan")])}
    out = mean_metrics(per_task)
    assert isinstance(out["a"], float) and out["a"] == pytest.approx(2.0)  # (1 + 3) / 2
    assert math.isnan(out["b"])
