"""Oracles for the neighbourhood term on explicit ratings (float64).

The ridge head's item-KNN input on rating data is Koren's neighbourhood estimate from the
support's residuals: checked against a per-task, per-item loop; served in sparse form it
must give the dense scores; and the learner must contain both MF fold-in (neighbour weight
held at 0) and the neighbourhood model itself (everything else held at 0).
"""

import pytest
import torch

from metarec.baselines import MFFoldIn
from metarec.config import MetaConfig
from metarec.loop import predict_items
from metarec.meta import SPARSE_NEIGHBOURS, MetaLearner, predict
from metarec.mf import cosine_neighbours
from metarec.model import sparse_lookup
from tests.test_meta import N_ITEMS, make_tiny_tasks, tiny_model


@pytest.fixture
def tiny_tasks():
    return make_tiny_tasks()


def _graph(k: int, tasks) -> tuple[torch.Tensor, torch.Tensor]:
    return cosine_neighbours(tasks, N_ITEMS, k)


def _estimate(index, sim, items, residual, mask) -> torch.Tensor:
    """Item j's sum_k s e_k / (sum_k s + 1) over the masked support items k whose
    neighbours include j, one task and one item at a time."""
    out = torch.zeros(items.shape[0], N_ITEMS, dtype=torch.float64)
    for t in range(items.shape[0]):
        for j in range(N_ITEMS):
            num = den = 0.0
            for k, e, keep in zip(
                items[t].tolist(), residual[t].tolist(), mask[t].tolist(), strict=True
            ):
                hits = (index[k] == j) & (sim[k] != 0)
                if keep and hits.any():
                    s = float(sim[k][hits].sum())
                    num, den = num + s * e, den + s
            out[t, j] = num / (den + 1.0)
    return out


@pytest.mark.parametrize("k", [2, N_ITEMS])
def test_rating_neighbour_scores_are_the_neighbourhood_estimate(tiny_tasks, k):
    b = tiny_tasks
    index, sim = _graph(k, b)
    model = tiny_model(factor_head=True, graph=(index, sim))
    residual = torch.randn(b.support_items.shape, dtype=torch.float64)
    got = model.rating_neighbour_scores(b.support_items, residual, b.support_mask)
    want = _estimate(index, sim.double(), b.support_items, residual, b.support_mask)
    torch.testing.assert_close(got.double(), want)
    reached, scores, rest = model.sparse_rating_neighbour_scores(
        b.support_items, residual, b.support_mask
    )
    catalogue = torch.arange(N_ITEMS).expand(b.num_tasks, -1)
    assert (rest == 0).all()
    torch.testing.assert_close(sparse_lookup(reached, scores, rest, catalogue).double(), want)
    at = torch.cat([b.query_items, b.support_items, b.query_items.flip(1)], 1)  # repeats
    there = model.rating_neighbour_scores(b.support_items, residual, b.support_mask, at=at)
    assert torch.equal(there, got.gather(1, at))  # bit for bit: the same sums, divided alike


def test_sparse_adaptation_on_ratings_is_the_dense_one(tiny_tasks):
    """Serving's form: the same head, and weight x lookup + item biases = the folded biases."""
    b = tiny_tasks
    model = tiny_model(factor_head=True, graph=_graph(3, b))
    cfg = MetaConfig(adapt="head", inner_solver="ridge", prior_precision=0.7)
    learner = MetaLearner(model, cfg).double()
    params = {n: p.detach() for n, p in learner.params().items()}
    support = (b.users, b.support_items, b.support_ratings, b.support_mask)
    want = learner.adapt(params, support)
    got = learner.adapt(params, support, sparse_neighbours=True)
    for n in ("head.weight", "head.factor", "head.neighbour", "head.bias"):
        torch.testing.assert_close(got[n], want[n])
    catalogue = torch.arange(N_ITEMS).expand(b.num_tasks, -1)
    term = got["head.neighbour"] * sparse_lookup(*(got[n] for n in SPARSE_NEIGHBOURS), catalogue)
    torch.testing.assert_close(params["item_bias"] + term, want["item_bias"])


def test_adapting_at_the_query_items_is_the_dense_adaptation(tiny_tasks):
    """Training's and validation's form (``at=``): the same head and the same predictions
    of the items asked for, bit for bit, no per-user catalogue biases; the same loss and,
    to rounding (sums over other orders), the same meta-gradients; and weights adapted at
    some items refuse to score others."""
    b = tiny_tasks
    model = tiny_model(factor_head=True, graph=_graph(3, b))
    cfg = MetaConfig(adapt="head", inner_solver="ridge", prior_precision=0.7, huber=0.0)
    learner = MetaLearner(model, cfg).double()
    support = (b.users, b.support_items, b.support_ratings, b.support_mask)

    def loss_and_grads(at):
        learner.zero_grad()
        fast = learner.adapt(learner.params(), support, create_graph=True, at=at)
        pred = predict(model, fast, b.query_items, b.users)
        loss = learner.query_loss(pred, b.query_ratings, b.query_mask).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
        return fast, pred, loss.detach(), grads

    dense, want, want_loss, want_grads = loss_and_grads(None)
    fast, got, loss, grads = loss_and_grads(b.query_items)
    assert fast["item_bias"].dim() == 1 and dense["item_bias"].dim() == 2
    for n in ("head.weight", "head.factor", "head.neighbour", "head.bias"):
        assert torch.equal(fast[n], dense[n])
    assert torch.equal(got, want) and torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at="):
        predict(model, fast, b.support_items, b.users)


@pytest.mark.parametrize("neighbour", [0.0, 1.0])
def test_the_learner_contains_mf_foldin_and_the_neighbourhood_model(tiny_tasks, neighbour):
    """Neighbour weight held at 0: MF fold-in exactly. Held at 1 with the rest of the head
    held at 0: the item baseline plus the support's neighbourhood estimate, the residuals
    taken from that baseline and centred on the user's mean."""
    dim, reg, tasks = 3, 2.0, tiny_tasks
    mf = MFFoldIn(dim=dim, reg=reg, iters=6, seed=0).fit(tasks, n_items=N_ITEMS)
    index, sim = _graph(4, tasks)
    model = tiny_model(factor_head=True, graph=(index, sim))
    learner = MetaLearner(model, MetaConfig(adapt="head", inner_solver="ridge")).double()
    hw = model.head["weight"].shape[0]
    with torch.no_grad():
        model.emb["item"][1:] = mf.item_factors_
        model.item_id_index.copy_(torch.arange(1, N_ITEMS + 1))
        model.item_bias.copy_(mf.item_bias_)
        model.global_mean.fill_(mf.mu_)
        for p in model.head.values():
            p.zero_()
        model.head["neighbour"].fill_(neighbour)
        lam = torch.full_like(learner.log_precision, 1e12 if neighbour else reg)
        lam[:hw] = 1e12
        lam[-2] = 1e12  # the neighbour weight's: held at its prior mean
        learner.log_precision.copy_(lam.log())
    items = torch.arange(N_ITEMS).expand(tasks.num_tasks, N_ITEMS)
    got = predict_items(learner, tasks, items)
    if not neighbour:
        want = mf.predict_items(tasks, items).double()
    else:
        base = model.global_mean + model.item_bias.detach()
        m = tasks.support_mask.double()
        residual = (tasks.support_ratings - base[tasks.support_items]) * m
        residual = residual - residual.sum(1, keepdim=True) / m.sum(1, keepdim=True)
        knn = _estimate(index, sim.double(), tasks.support_items, residual, tasks.support_mask)
        want = base + knn
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_long_support_reaches_through_its_last_ratings_only(tiny_tasks, monkeypatch):
    """Past ``NEIGHBOUR_SUPPORT`` kept ratings, the term reads the last ones (what bounds a
    heavy user's cost): the same scores as a support holding only those."""
    from metarec import model as model_module

    b = tiny_tasks
    model = tiny_model(factor_head=True, graph=_graph(3, b))
    residual = torch.randn(b.support_items.shape, dtype=torch.float64)
    mask = b.support_mask.clone()
    mask[3, 1] = False  # a gap: "last" counts kept entries, not positions
    monkeypatch.setattr(model_module, "NEIGHBOUR_SUPPORT", 3)
    cut = mask & (mask.flip(1).cumsum(1).flip(1) <= 3)
    assert cut.sum(1).tolist() == [min(int(n), 3) for n in mask.sum(1)]
    for dense, args, short in (
        ("rating_neighbour_scores", (residual, mask), (residual, cut)),
        ("neighbour_scores", (mask,), (cut,)),
    ):
        got = getattr(model, dense)(b.support_items, *args)
        monkeypatch.setattr(model_module, "NEIGHBOUR_SUPPORT", 6)  # nothing cut
        want = getattr(model, dense)(b.support_items, *short)
        monkeypatch.setattr(model_module, "NEIGHBOUR_SUPPORT", 3)
        torch.testing.assert_close(got, want)
        sparse = getattr(model, f"sparse_{dense}")(b.support_items, *args)
        catalogue = torch.arange(N_ITEMS).expand(b.num_tasks, -1)
        torch.testing.assert_close(sparse_lookup(*sparse, catalogue), want)
