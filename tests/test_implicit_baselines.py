"""Implicit baselines: fitted on training users, folded in for users they never saw."""

import numpy as np
import pytest
import torch

from metarec.batch import from_table
from metarec.implicit_baselines import ALS, BPR, EASE, GRIDS, ItemKNN, Popularity
from metarec.implicit_metrics import popularity_percentile, score_implicit


@pytest.fixture(scope="module")
def shop(shop_prepared):
    ds = shop_prepared
    train, test = (from_table(ds.tasks("user_cold", s)) for s in ("train", "test"))
    return train, test, ds.manifest["counts"]["items"]


def test_every_personal_baseline_beats_popularity_on_the_planted_shop(shop):
    train, test, n = shop
    pct = popularity_percentile(Popularity().fit(train, n_items=n).counts_)
    ndcg = {}
    for name, (cls, grid) in GRIDS.items():
        m, _ = score_implicit(cls(**grid[0]).fit(train, n_items=n), test, n, pct)
        ndcg[name] = float(torch.nanmean(m["ndcg@10"].double()))
    for name in ("item_knn", "als", "bpr", "ease"):
        assert ndcg[name] > 1.5 * ndcg["popularity"], ndcg


def test_fold_in_uses_the_support_alone(shop):
    """A user's scores change with their support and never read their query."""
    train, test, n = shop
    items = torch.arange(n).expand(test.num_tasks, n)
    hidden = test.select(torch.arange(test.num_tasks))
    hidden.query_items.fill_(0)  # a scorer that read queries would now score differently
    for model in (ItemKNN(50), ALS(16), EASE(100.0)):
        model.fit(train, n_items=n)
        assert torch.equal(model.predict_items(test, items), model.predict_items(hidden, items))
    als = ALS(16).fit(train, n_items=n)
    other = test.select(torch.arange(test.num_tasks).roll(1))
    assert not torch.allclose(als.predict_items(test, items), als.predict_items(other, items))


def test_ease_has_a_zero_diagonal_and_bpr_is_refit_only_for_new_users(shop):
    train, test, n = shop
    ease = EASE(100.0).fit(train, n_items=n)
    assert torch.count_nonzero(ease.weights_.diagonal()) == 0
    bpr = BPR(16).fit(train, n_items=n)
    items = torch.arange(n).expand(test.num_tasks, n)
    first = bpr.predict_items(test, items)
    fitted = bpr.scores_
    assert torch.equal(bpr.predict_items(test, items), first) and bpr.scores_ is fitted
    assert np.isfinite(first.numpy()).all()


def test_parameters_follow_the_estimator_contract():
    assert ALS(factors=8).get_params()["factors"] == 8
    assert Popularity().get_params() == {}
    with pytest.raises(ValueError, match="not a parameter of EASE"):
        EASE().set_params(lamda=1.0)
