"""Per-task metrics: each one against a hand computation, plus padding, ties, NaN and exclusion."""

from __future__ import annotations

import math

import pytest
import torch

from metarec.metrics import catalog_metrics, mean_metrics, query_metrics

L2, L3, L4, L5, L6 = (math.log2(n) for n in (2, 3, 4, 5, 6))


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)


# --- query_metrics: one hand-computed task --------------------------------------------------

# pred order: slot 1 (0.9) > slot 3 (0.8) > slot 0 (0.7) > slot 4 (0.2) > slot 2 (0.1)
PRED = _t([[0.7, 0.9, 0.1, 0.8, 0.2]])
TARGET = _t([[5.0, 3.0, 4.0, 1.0, 2.0]])
MASK = _m([[True] * 5])


def test_mae_and_rmse_are_per_task_over_valid_entries():
    pred, target = _t([[1.0, 2.0, 9.0], [4.0, 4.0, 0.0]]), _t([[2.0, 4.0, 0.0], [1.0, 4.0, 0.0]])
    mask = _m([[True, True, False], [True, True, True]])
    out = query_metrics(pred, target, mask)
    # task 0: errors 1, 2 -> MAE 3/2, RMSE sqrt(5/2); task 1: errors 3, 0, 0 -> 1, sqrt(9/3)
    torch.testing.assert_close(out["mae"], _t([1.5, 1.0]))
    torch.testing.assert_close(out["rmse"], _t([math.sqrt(2.5), math.sqrt(3.0)]))


def test_ndcg3_uses_linear_true_rating_gain():
    out = query_metrics(PRED, TARGET, MASK)
    # ranked true ratings 3, 1, 5: DCG = 3/log2(2) + 1/log2(3) + 5/log2(4)
    # ideal 5, 4, 3:             IDCG = 5/log2(2) + 4/log2(3) + 3/log2(4)
    expected = (3 / L2 + 1 / L3 + 5 / L4) / (5 / L2 + 4 / L3 + 3 / L4)
    assert out["ndcg@3"].item() == pytest.approx(expected, rel=1e-6)


def test_ndcg3_uses_all_items_when_fewer_than_three_valid():
    out = query_metrics(_t([[0.1, 0.9, 0.5]]), _t([[4.0, 2.0, 0.0]]), _m([[True, True, False]]))
    # ranked 2, 4: DCG = 2/log2(2) + 4/log2(3); ideal 4, 2: IDCG = 4/log2(2) + 2/log2(3)
    expected = (2 / L2 + 4 / L3) / (4 / L2 + 2 / L3)
    assert out["ndcg@3"].item() == pytest.approx(expected, rel=1e-6)


def test_binary_ranking_metrics_on_hand_example():
    out = query_metrics(PRED, TARGET, MASK, relevance_threshold=4.0)
    # relevance (>= 4) of slots: [1, 0, 1, 0, 0]; ranked order 1, 3, 0, 4, 2 -> rel 0, 0, 1, 0, 1
    # P@5 = 2/5; nDCG@5 = (1/log2(4) + 1/log2(6)) / (1/log2(2) + 1/log2(3)); MRR@5 = 1/3
    assert out["p@5"].item() == pytest.approx(2 / 5)
    expected_ndcg = (1 / L4 + 1 / L6) / (1 / L2 + 1 / L3)
    assert out["ndcg@5"].item() == pytest.approx(expected_ndcg, rel=1e-6)
    assert out["mrr@5"].item() == pytest.approx(1 / 3)


def test_top5_cutoff_ignores_relevant_items_ranked_sixth():
    pred = _t([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    target = _t([[1.0, 1.0, 1.0, 1.0, 4.0, 5.0, 5.0]])
    out = query_metrics(pred, target, _m([[True] * 7]))
    # one hit (rank 5) in the top 5: P@5 = 1/5, MRR@5 = 1/5
    # 3 relevant -> nDCG@5 = (1/log2(6)) / (1/log2(2) + 1/log2(3) + 1/log2(4))
    assert out["p@5"].item() == pytest.approx(1 / 5)
    assert out["mrr@5"].item() == pytest.approx(1 / 5)
    assert out["ndcg@5"].item() == pytest.approx((1 / L6) / (1 / L2 + 1 / L3 + 1 / L4), rel=1e-6)


def test_mrr5_is_zero_when_no_relevant_item_reaches_top5():
    pred = _t([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])
    target = _t([[1.0, 1.0, 1.0, 1.0, 1.0, 5.0]])
    out = query_metrics(pred, target, _m([[True] * 6]))
    # the only relevant item is ranked 6th: MRR@5 = 0, P@5 = 0, nDCG@5 = 0
    assert out["mrr@5"].item() == 0.0
    assert out["p@5"].item() == 0.0
    assert out["ndcg@5"].item() == 0.0


def test_p5_divides_by_valid_count_when_fewer_than_five():
    out = query_metrics(_t([[0.5, 0.4, 0.3, 7.0]]), _t([[5.0, 1.0, 4.0, 5.0]]), _m([[1, 1, 1, 0]]))
    # 3 valid items, 2 relevant among them: P@5 = 2 / min(5, 3)
    assert out["p@5"].item() == pytest.approx(2 / 3)


def test_tasks_without_relevant_items_get_nan_for_ndcg5_and_mrr5_only():
    pred, target = _t([[0.3, 0.2], [0.3, 0.2]]), _t([[1.0, 2.0], [5.0, 2.0]])
    out = query_metrics(pred, target, _m([[True, True], [True, True]]))
    assert torch.isnan(out["ndcg@5"][0]) and torch.isnan(out["mrr@5"][0])
    assert out["p@5"][0].item() == 0.0  # P@5 is defined: 0 of 2
    # task 1: the relevant item is ranked first: nDCG@5 = MRR@5 = 1
    assert out["ndcg@5"][1].item() == pytest.approx(1.0)
    assert out["mrr@5"][1].item() == pytest.approx(1.0)
    # the caller's NaN-mean skips the undefined task
    assert mean_metrics(out)["mrr@5"] == pytest.approx(1.0)


def test_task_with_no_valid_slot_is_nan_everywhere():
    out = query_metrics(_t([[1.0, 2.0]]), _t([[5.0, 5.0]]), _m([[False, False]]))
    assert all(torch.isnan(v).all() for v in out.values())


def test_padded_columns_never_change_any_metric():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 7, generator=gen) * 5
    target = torch.randint(1, 6, (6, 7), generator=gen).float()
    mask = torch.rand(6, 7, generator=gen) < 0.7
    base = query_metrics(pred, target, mask)
    junk = _t([[1e9, -1e9, float("nan"), float("inf"), 5.0]] * 6)
    padded = query_metrics(
        torch.cat([pred, junk], 1),
        torch.cat([target, junk.flip(1)], 1),
        torch.cat([mask, torch.zeros(6, 5, dtype=torch.bool)], 1),
    )
    for name in base:
        torch.testing.assert_close(padded[name], base[name], equal_nan=True)


def test_padded_slot_never_outranks_a_valid_minus_inf_prediction():
    pred = _t([[0.0, float("-inf")]])  # padded slot 0 has the higher value
    out = query_metrics(pred, _t([[1.0, 5.0]]), _m([[False, True]]))
    # the only valid item is relevant and must be ranked first
    assert out["mrr@5"].item() == 1.0


def test_tied_predictions_are_broken_by_position():
    pred = _t([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    target = _t([[5.0, 1.0, 1.0], [1.0, 1.0, 5.0]])
    out = query_metrics(pred, target, _m([[True] * 3] * 2))
    # all tied: rank order is slot 0, 1, 2; relevant item at rank 1 (task 0) and rank 3 (task 1)
    torch.testing.assert_close(out["mrr@5"], _t([1.0, 1 / 3]))
    # task 1 nDCG@3: DCG = 1/log2(2) + 1/log2(3) + 5/log2(4); IDCG = 5/log2(2) + 1/log2(3) + 1/2
    expected = (1 / L2 + 1 / L3 + 5 / L4) / (5 / L2 + 1 / L3 + 1 / L4)
    assert out["ndcg@3"][0].item() == pytest.approx(1.0)
    assert out["ndcg@3"][1].item() == pytest.approx(expected, rel=1e-6)


def test_query_metrics_rejects_mismatched_shapes_and_non_bool_mask():
    with pytest.raises(ValueError, match="shapes"):
        query_metrics(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        query_metrics(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3))


# --- randomized cross-check against a slow reference ---------------------------------------


def _reference_task(pred, target, threshold=4.0):
    """Slow per-task reference: plain Python lists of the valid slots only."""
    order = sorted(range(len(pred)), key=lambda i: (-pred[i], i))  # stable: position breaks ties
    k = min(3, len(pred))
    dcg = sum(target[i] / math.log2(r + 2) for r, i in enumerate(order[:k]))
    ideal = sorted(target, reverse=True)
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal[:k]))
    hits = sum(target[i] >= threshold for i in order[:5])
    return dcg / idcg, hits / min(5, len(pred))


def test_ndcg3_and_p5_match_slow_reference_on_random_tasks():
    gen = torch.Generator().manual_seed(1234)
    t, q = 20, 12
    # predictions on a coarse grid so ties actually occur
    pred = torch.randint(0, 6, (t, q), generator=gen).float() / 2
    target = torch.randint(1, 6, (t, q), generator=gen).float()
    mask = torch.rand(t, q, generator=gen) < 0.6
    mask[:, 0] = True  # every task has at least one valid slot
    out = query_metrics(pred, target, mask)
    for row in range(t):
        valid = mask[row].nonzero().flatten().tolist()
        ndcg3, p5 = _reference_task(
            [pred[row, i].item() for i in valid], [target[row, i].item() for i in valid]
        )
        assert out["ndcg@3"][row].item() == pytest.approx(ndcg3, rel=1e-5), row
        assert out["p@5"][row].item() == pytest.approx(p5, rel=1e-6), row


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
