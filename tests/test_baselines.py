"""Baselines follow the estimator contract and match closed-form oracles."""

import pytest
import torch

from metarec.baselines import Bias, GlobalMean, ItemMean, MFFoldIn, UserMean
from metarec.batch import TaskBatch


def batch(support, query):
    """Tasks from lists of (item, rating) pairs; user ids are task positions."""

    def pad(rows):
        width = max(len(r) for r in rows)
        items = torch.tensor([[i for i, _ in r] + [0] * (width - len(r)) for r in rows])
        ratings = torch.tensor([[x for _, x in r] + [0.0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
        return items, ratings, mask

    return TaskBatch(torch.arange(len(support)), *pad(support), *pad(query))


TRAIN = batch([[(0, 5.0), (1, 3.0)], [(0, 4.0), (2, 1.0)]], [[(2, 2.0)], [(1, 3.0)]])
TEST = batch([[(0, 5.0), (2, 4.0)]], [[(1, 0.0), (3, 0.0)]])  # item 3 never trained on


def test_global_and_item_and_user_means_by_hand():
    assert GlobalMean().fit(TRAIN, n_items=4).predict(TEST).tolist() == [[3.0, 3.0]]
    # item 1 ratings {3, 3}: (6 + 2 * 3) / (2 + 2) = 3; item 3 unseen -> mu = 3
    assert ItemMean(shrinkage=2.0).fit(TRAIN, n_items=4).predict(TEST).tolist() == [[3.0, 3.0]]
    # support mean (5 + 4) / 2 shrunk with 1 pseudo-count at mu 3: (9 + 3) / 3 = 4
    assert UserMean(shrinkage=1.0).fit(TRAIN, n_items=4).predict(TEST).tolist() == [[4.0, 4.0]]


def test_predict_before_fit_says_so():
    with pytest.raises(RuntimeError, match="Bias is not fitted; call fit"):
        Bias().predict(TEST)


def test_init_only_stores_hyperparameters():
    m = MFFoldIn(dim=3, reg=2.0)
    assert vars(m) == {"dim": 3, "reg": 2.0, "iters": 12, "seed": 0}


def test_bias_user_term_is_the_ridge_solution():
    model = Bias(reg_item=1.0, reg_user=2.0).fit(TRAIN, n_items=4)
    # b_u = sum(r - mu - b_i) / (n + reg) over the support set
    resid = torch.tensor([5.0, 4.0], dtype=torch.float64) - model.mu_ - model.item_bias_[[0, 2]]
    b_u = resid.sum() / (2 + 2.0)
    want = model.mu_ + model.item_bias_[[1, 3]] + b_u
    torch.testing.assert_close(model.predict(TEST)[0], want.float())


def test_mf_foldin_solves_each_user_exactly_with_items_frozen():
    g = torch.Generator().manual_seed(0)
    n_users, n_items = 40, 30
    items = torch.stack([torch.randperm(n_items, generator=g)[:12] for _ in range(n_users)])
    ratings = torch.randint(1, 6, (n_users, 12), generator=g).float()
    train = TaskBatch(
        torch.arange(n_users),
        items[:, :8],
        ratings[:, :8],
        torch.ones(n_users, 8, dtype=torch.bool),
        items[:, 8:],
        ratings[:, 8:],
        torch.ones(n_users, 4, dtype=torch.bool),
    )
    model = MFFoldIn(dim=4, reg=3.0, iters=5).fit(train, n_items=n_items)
    test = train.select(torch.arange(3))
    got = model.predict(test)
    for t in range(3):  # reference: one ridge solve per user, written out
        q = model.item_factors_[test.support_items[t]]
        x = torch.cat([q, torch.ones(len(q), 1, dtype=torch.float64)], 1)
        y = test.support_ratings[t].double() - model.mu_ - model.item_bias_[test.support_items[t]]
        w = torch.linalg.solve(x.T @ x + 3.0 * torch.eye(5, dtype=torch.float64), x.T @ y)
        qq = model.item_factors_[test.query_items[t]]
        want = model.mu_ + model.item_bias_[test.query_items[t]] + qq @ w[:-1] + w[-1]
        torch.testing.assert_close(got[t], want.float(), atol=1e-5, rtol=1e-5)

    # The whole catalogue is scored as one (T, I) matmul, never a (T, I, dim) gather; it
    # agrees with the per-item path item by item.
    catalogue = torch.arange(n_items).expand(3, n_items)
    whole = model.predict_items(test, catalogue)
    torch.testing.assert_close(whole.gather(1, test.query_items), got, atol=1e-5, rtol=1e-5)


def test_mf_beats_bias_on_low_rank_data():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(300, 3, generator=g), torch.randn(50, 3, generator=g)
    full = (3 + u @ v.T).clamp(1, 5)
    items = torch.stack([torch.randperm(50, generator=g)[:25] for _ in range(300)])
    r = full.gather(1, items)
    tasks = TaskBatch(
        torch.arange(300),
        items[:, :20],
        r[:, :20],
        torch.ones(300, 20, dtype=torch.bool),
        items[:, 20:],
        r[:, 20:],
        torch.ones(300, 5, dtype=torch.bool),
    )
    train, test = tasks.select(torch.arange(250)), tasks.select(torch.arange(250, 300))
    mae = {
        m: (m.fit(train, n_items=50).predict(test) - test.query_ratings).abs().mean()
        for m in (Bias(), MFFoldIn(dim=3, reg=1.0))
    }
    bias, mf = mae.values()
    assert mf < 0.5 * bias


@pytest.mark.parametrize("max_padded", [None, 50])  # one chunk per width; many small chunks
def test_grouped_ridge_equals_one_solve_per_group(monkeypatch, max_padded):
    from metarec import mf

    if max_padded is not None:
        monkeypatch.setattr(mf, "MAX_PADDED", max_padded)
    g = torch.Generator().manual_seed(0)
    n_rows, n = 60, 3000
    rows = (torch.rand(n, generator=g) ** 4 * (n_rows - 5)).long()  # long tail; 5 rows empty
    feats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    target = torch.randn(n, generator=g, dtype=torch.float64)
    got = mf.ridge_rows(mf.Groups(rows, n_rows), feats, target, 2.0)
    for r in range(n_rows):
        x, y = feats[rows == r], target[rows == r]
        want = torch.linalg.solve(x.T @ x + 2.0 * torch.eye(4, dtype=torch.float64), x.T @ y)
        torch.testing.assert_close(got[r], want)
    assert (got[n_rows - 5 :] == 0).all()


def _low_rank_tasks(users: int = 300, seed: int = 1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(users, 3, generator=g), torch.randn(50, 3, generator=g)
    full = (3 + u @ v.T).clamp(1, 5)
    items = torch.stack([torch.randperm(50, generator=g)[:25] for _ in range(users)])
    r = full.gather(1, items)
    ones = torch.ones(users, 20, dtype=torch.bool)
    return TaskBatch(
        torch.arange(users), items[:, :20], r[:, :20], ones, items[:, 20:], r[:, 20:], ones[:, :5]
    )


def test_the_mf_grid_is_chosen_on_every_user_unless_the_data_is_larger_than_the_cap():
    from metarec.batch import RaggedTasks
    from metarec.metrics import masked_mae
    from metarec.mf import MF_GRID, choose_mf, users_for_grid

    tasks = _low_rank_tasks()
    train, valid = tasks.select(torch.arange(250)), tasks.select(torch.arange(250, 300))
    grid = MF_GRID[:4]
    # under the cap: every point fitted on every training user, the lowest MAE kept
    chosen = choose_mf(train, valid, 50, grid, seed=3)
    maes = [masked_mae(MFFoldIn(**hp, seed=3).fit(train, n_items=50).predict(valid), valid)
            for hp in grid]  # fmt: skip
    assert [m for _, m in chosen.grid_maes_] == maes
    best = grid[maes.index(min(maes))]
    assert (chosen.dim, chosen.reg) == (best["dim"], best["reg"])
    assert chosen.grid_sample_ == 250
    # over it: compared on a sample of users, the chosen point then fitted on all of them
    assert users_for_grid(train, 250 * 25, seed=3) is train
    sample = users_for_grid(train, 2_000, seed=3)
    assert sample.num_tasks == 80 and torch.equal(sample.users, sample.users.sort().values)
    ragged = RaggedTasks(*_ragged(train))
    assert torch.equal(users_for_grid(ragged, 2_000, seed=3).users, sample.users)
    small = choose_mf(train, valid, 50, grid, seed=3, max_ratings=2_000)
    assert small.grid_sample_ == 80
    sample_maes = [masked_mae(MFFoldIn(**hp, seed=3).fit(sample, n_items=50).predict(valid),
                              valid) for hp in grid]  # fmt: skip
    assert [m for _, m in small.grid_maes_] == sample_maes
    hp = grid[sample_maes.index(min(sample_maes))]
    again = MFFoldIn(**hp, seed=3).fit(train, n_items=50)
    assert torch.equal(small.item_factors_, again.item_factors_)


def _ragged(tasks: TaskBatch) -> tuple:
    """The fields of a ``RaggedTasks`` holding ``tasks`` (support then query per task)."""
    n_s, n_q = tasks.support_mask.sum(1), tasks.query_mask.sum(1)
    items = torch.cat([torch.cat([tasks.support_items[t, : n_s[t]], tasks.query_items[t, : n_q[t]]])
                       for t in range(tasks.num_tasks)])  # fmt: skip
    ratings = torch.cat([torch.cat([tasks.support_ratings[t, : n_s[t]],
                                    tasks.query_ratings[t, : n_q[t]]])
                         for t in range(tasks.num_tasks)])  # fmt: skip
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), (n_s + n_q).cumsum(0)])
    return tasks.users, items, ratings, offsets, n_s
