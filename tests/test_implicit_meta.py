"""Oracles for the implicit-feedback meta-learning core (float64).

Implicit tasks carry interaction strengths (> 0) for positives and 0 for sampled
negatives; the vectorized inner loop with BCE or BPR must equal a per-task loop written
from the textbook definitions, unpadded; the ridge head must minimise its confidence-
weighted objective; and negatives are never a positive of their task.
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarec import mf
from metarec.batch import TaskBatch
from metarec.config import MetaConfig
from metarec.implicit_baselines import ItemKNN
from metarec.loop import predict_items
from metarec.meta import SPARSE_NEIGHBOURS, MetaLearner, meta_loss, task_loss
from metarec.mf import cosine_neighbours
from metarec.model import sparse_lookup
from metarec.negatives import fixed_candidates, keep_negatives
from tests.test_meta import N_ITEMS, _grads, tiny_model


@pytest.fixture
def implicit_tasks() -> TaskBatch:
    """4 tasks: positives with strengths 1..9, then 3 negatives in support and query,
    padded with garbage (padding holds strength 7: it must be masked, never read)."""
    g = torch.Generator().manual_seed(3)
    s_pos, q_pos = [2, 4, 1, 3], [2, 1, 3, 2]
    s_len, q_len = max(s_pos) + 3, max(q_pos) + 3

    def side(pos: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = torch.randint(0, N_ITEMS, (4, width), generator=g)
        ratings = torch.full((4, width), 7.0, dtype=torch.float64)
        mask = torch.zeros(4, width, dtype=torch.bool)
        for t, n in enumerate(pos):
            ratings[t, :n] = torch.randint(1, 10, (n,), generator=g).double()
            ratings[t, n : n + 3] = 0.0  # negatives
            mask[t, : n + 3] = True
        return items, ratings, mask

    si, sr, sm = side(s_pos, s_len)
    qi, qr, qm = side(q_pos, q_len)
    return TaskBatch(torch.tensor([0, 3, 5, 2]), si, sr, sm, qi, qr, qm)


def reference_loss(pred: torch.Tensor, target: torch.Tensor, loss: str, prior: float = 0.0):
    """One task, unpadded, from the definitions."""
    pos = target > 0
    if loss == "bce":
        total = sum(
            -w * F.logsigmoid(p) if y else -F.logsigmoid(-p)
            for p, y, w in zip(pred, pos, target, strict=True)
        )
        return total / (len(pred) + prior)
    pairs = [(i, j) for i in range(len(pred)) for j in range(len(pred)) if pos[i] and not pos[j]]
    num = sum(target[i] * -F.logsigmoid(pred[i] - pred[j]) for i, j in pairs)
    return num / (sum(target[i] for i, _ in pairs) + prior)


@pytest.mark.parametrize("loss", ["bce", "bpr"])
def test_task_loss_matches_the_definitions(implicit_tasks, loss):
    b = implicit_tasks
    pred = torch.randn(b.support_items.shape, generator=torch.Generator().manual_seed(4)).double()
    got = task_loss(pred, b.support_ratings, b.support_mask, loss=loss, prior=2.0)
    for t in range(b.num_tasks):
        m = b.support_mask[t]
        want = reference_loss(pred[t][m], b.support_ratings[t][m], loss, prior=2.0)
        torch.testing.assert_close(got[t], torch.as_tensor(want).double(), rtol=1e-10, atol=0)


def reference_meta_loss(learner: MetaLearner, tasks: TaskBatch, loss: str, *, second_order: bool):
    cfg, model = learner.cfg, learner.model
    params = learner.params()
    losses = []
    for t in range(tasks.num_tasks):
        s, q, user = tasks.support_mask[t], tasks.query_mask[t], tasks.users[t]
        fast = {n: params[n] for n in learner.adapted}
        for _ in range(cfg.inner_steps):
            pred = functional_call(model, {**params, **fast}, (tasks.support_items[t][s], user))
            inner = reference_loss(pred, tasks.support_ratings[t][s], loss, cfg.support_prior)
            grads = torch.autograd.grad(inner, list(fast.values()), create_graph=second_order)
            fast = {
                n: f - cfg.inner_lr * gr for (n, f), gr in zip(fast.items(), grads, strict=True)
            }
        pred = functional_call(model, {**params, **fast}, (tasks.query_items[t][q], user))
        losses.append(reference_loss(pred, tasks.query_ratings[t][q], loss))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("loss", ["bce", "bpr"])
@pytest.mark.parametrize(
    ("algorithm", "adapt", "prior"), [("maml", "mlp", 0.0), ("fomaml", "all", 3.0)]
)
def test_vectorized_implicit_inner_loop_equals_per_task_loop(
    implicit_tasks, loss, algorithm, adapt, prior
):
    cfg = MetaConfig(
        inner_solver="gd",
        algorithm=algorithm,
        adapt=adapt,
        inner_steps=3,
        inner_lr=0.1,
        support_prior=prior,
        implicit_loss=loss,
    )
    learner = MetaLearner(tiny_model(), cfg, feedback="implicit").double()
    got, _ = meta_loss(learner, implicit_tasks)
    want = reference_meta_loss(learner, implicit_tasks, loss, second_order=algorithm == "maml")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    g, w = _grads(learner, got), _grads(learner, want)
    assert g.keys() == w.keys()
    for name in w:
        torch.testing.assert_close(g[name], w[name], atol=1e-8, rtol=1e-6, msg=name)


def test_implicit_ridge_head_minimises_the_confidence_weighted_objective(implicit_tasks):
    """Targets 1 for positives and 0 for negatives, each squared error weighted by its
    strength (1 for a negative), plus the prior: the gradient at the solution is zero."""
    cfg = MetaConfig(adapt="head", inner_solver="ridge", prior_precision=0.7)
    learner = MetaLearner(tiny_model(factor_head=True), cfg, feedback="implicit").double()
    params = {n: p.detach() for n, p in learner.params().items()}
    b = implicit_tasks
    fast = learner.adapt(params, (b.users, b.support_items, b.support_ratings, b.support_mask))
    names = ["head.weight", "head.factor", "head.bias"]
    positive = b.support_ratings > 0
    conf = torch.where(positive, b.support_ratings, 1.0) * b.support_mask

    def gradient(at: dict[str, torch.Tensor]) -> torch.Tensor:
        w = {n: at[n].detach().clone().requires_grad_() for n in names}
        pred = functional_call(learner.model, {**params, **w}, (b.support_items, b.users))
        obj = (conf * (pred - positive.double()) ** 2).sum() + 0.7 * sum(
            ((w[n] - params[n]) ** 2).sum() for n in names
        )
        return torch.cat([g.flatten() for g in torch.autograd.grad(obj, list(w.values()))])

    prior_mean = {n: params[n].expand(b.num_tasks, *params[n].shape) for n in names}
    assert gradient(prior_mean).abs().max() > 1e-2  # the data pull the head away from theta
    torch.testing.assert_close(
        gradient(fast), torch.zeros(len(gradient(fast))).double(), atol=1e-7, rtol=0
    )


def _train() -> TaskBatch:
    """40 random users of the tiny catalogue (positives only)."""
    g = torch.Generator().manual_seed(7)
    items = torch.stack([torch.randperm(N_ITEMS, generator=g)[:5] for _ in range(40)])
    mask = torch.rand(40, 5, generator=g) < 0.8
    ones = torch.ones(40, 5, dtype=torch.float64)
    return TaskBatch(torch.arange(40), items, ones, mask, items[:, :0], ones[:, :0], mask[:, :0])


def _knn() -> tuple[ItemKNN, tuple[torch.Tensor, torch.Tensor]]:
    """The ``implicit`` library's item-KNN and the model's graph from the same users, every
    item keeping all its neighbours (no top-k cut, whose ties two codes may break apart)."""
    train = _train()
    knn = ItemKNN(neighbours=N_ITEMS).fit(train, n_items=N_ITEMS)
    return knn, cosine_neighbours(train, N_ITEMS, N_ITEMS)


def test_the_neighbour_graph_keeps_each_items_k_most_similar_others():
    train = _train()
    index, sim = cosine_neighbours(train, N_ITEMS, 3)
    assert index.dtype == torch.int32  # a million-item graph: 0.8 GB of indices, not 1.6
    x = torch.zeros(40, N_ITEMS, dtype=torch.float64)
    x[
        torch.arange(40)[:, None].expand(-1, 5)[train.support_mask],
        train.support_items[train.support_mask],
    ] = 1
    x = x / x.norm(dim=0).clamp_min(1e-12)
    dense = (x.T @ x).fill_diagonal_(-1.0)  # itself never a neighbour
    want = dense.topk(3, dim=1).values
    torch.testing.assert_close(sim.double(), want.clamp_min(0), atol=1e-6, rtol=0)
    assert not (index == torch.arange(N_ITEMS)[:, None]).any()
    torch.testing.assert_close(dense.gather(1, index), sim.double(), atol=1e-6, rtol=0)


def test_the_graph_built_a_few_items_at_a_time_is_the_graph(monkeypatch):
    """Blocks of items (how a 60,000-item catalogue fits in memory) change nothing, the
    order of tied neighbours (lowest index first) included: binary data ties often."""
    train = _train()
    x = mf.interaction_matrix(train, N_ITEMS, support_only=False, binary=True)
    x.data[:] = 1.0
    x = torch.as_tensor(x.toarray())
    x = x / x.norm(dim=0).clamp_min(1e-12)  # cosine over the binary matrix
    dense = (x.T @ x).fill_diagonal_(0.0)
    for blocks in (None, 2 * N_ITEMS, 5 * N_ITEMS):  # whole, 2 and 5 items at a time
        if blocks:
            monkeypatch.setattr(mf, "BLOCK_ENTRIES", blocks)
        index, sim = cosine_neighbours(train, N_ITEMS, 3)
        for i in range(N_ITEMS):
            ranked = sorted(range(N_ITEMS), key=lambda j: -dense[i, j])  # stable: ties by index
            want = [j for j in ranked if dense[i, j] > 0][:3]
            assert index[i][: len(want)].tolist() == want
            torch.testing.assert_close(sim[i][: len(want)], dense[i, want])
            assert (sim[i][len(want) :] == 0).all()


def test_a_heavy_user_gives_the_graph_a_random_cap_of_their_interactions():
    g = torch.Generator().manual_seed(3)
    lengths = [2, 7, 5, 9]
    rows = np.repeat(np.arange(4), lengths)
    cols = np.concatenate([torch.randperm(N_ITEMS, generator=g)[:n].numpy() for n in lengths])
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(4, N_ITEMS))
    cut = mf._at_most(x, cap=5)
    assert np.diff(cut.indptr).tolist() == [2, 5, 5, 5]
    for r in range(4):  # a subset of the row, the rows under the cap whole
        own, kept = set(x[r].indices), set(cut[r].indices)
        assert kept <= own and (len(own) > 5 or kept == own)
    assert mf._at_most(x, cap=9) is x


def test_neighbour_scores_are_item_knn_scores_standardised(implicit_tasks):
    """The model's neighbourhood term is item-KNN's score of every item (the support
    positives' summed similarities, an item never its own neighbour), standardised per task."""
    knn, graph = _knn()
    model = tiny_model(graph=graph)
    b = implicit_tasks
    positive = (b.support_ratings > 0) & b.support_mask
    got = model.neighbour_scores(b.support_items, positive)
    sim = torch.as_tensor(knn.similarity_.toarray()).double().fill_diagonal_(0.0)
    for t in range(b.num_tasks):
        raw = sim[b.support_items[t][positive[t]]].sum(0)
        want = (raw - raw.mean()) / raw.std()
        torch.testing.assert_close(got[t].double(), want, atol=1e-6, rtol=1e-5)


def test_ridge_head_fits_the_neighbour_weight_with_the_rest_of_the_head(implicit_tasks):
    """With a neighbour graph, the closed form minimises the same objective with one more
    input (the support's item-KNN scores); its weight ends up in the user's item biases."""
    cfg = MetaConfig(adapt="head", inner_solver="ridge", prior_precision=0.7)
    model = tiny_model(factor_head=True, graph=_knn()[1])
    learner = MetaLearner(model, cfg, feedback="implicit").double()
    params = {n: p.detach() for n, p in learner.params().items()}
    b = implicit_tasks
    fast = learner.adapt(params, (b.users, b.support_items, b.support_ratings, b.support_mask))
    names = ["head.weight", "head.factor", "head.neighbour", "head.bias"]
    positive = b.support_ratings > 0
    conf = torch.where(positive, b.support_ratings, 1.0) * b.support_mask
    scores = model.neighbour_scores(b.support_items, positive & b.support_mask).double()
    folded = params["item_bias"] + fast["head.neighbour"] * scores
    torch.testing.assert_close(fast["item_bias"], folded)

    def gradient(at: dict[str, torch.Tensor]) -> torch.Tensor:
        w = {n: at[n].detach().clone().requires_grad_() for n in names}
        pred = functional_call(model, {**params, **w}, (b.support_items, b.users))
        pred = pred + w["head.neighbour"] * scores.gather(1, b.support_items)
        obj = (conf * (pred - positive.double()) ** 2).sum() + 0.7 * sum(
            ((w[n] - params[n]) ** 2).sum() for n in names
        )
        return torch.cat([g.flatten() for g in torch.autograd.grad(obj, list(w.values()))])

    torch.testing.assert_close(
        gradient(fast), torch.zeros(len(gradient(fast))).double(), atol=1e-7, rtol=0
    )


def test_sparse_neighbour_scores_are_the_dense_ones_without_the_catalogue(implicit_tasks):
    """Serving's form of the neighbourhood term: each reached item once, sorted, with its
    dense score; every other item the dense score of an item nothing reaches; and a
    ridge head adapted with it solves the same head (the weight then multiplies it)."""
    b = implicit_tasks
    positive = (b.support_ratings > 0) & b.support_mask
    catalogue = torch.arange(N_ITEMS).expand(b.num_tasks, -1)
    for graph in (cosine_neighbours(_train(), N_ITEMS, 3), _knn()[1]):  # some items, all
        model = tiny_model(factor_head=True, graph=graph)
        dense = model.neighbour_scores(b.support_items, positive)
        reached, scores, rest = model.sparse_neighbour_scores(b.support_items, positive)
        torch.testing.assert_close(sparse_lookup(reached, scores, rest, catalogue), dense)
        for t in range(b.num_tasks):
            real = reached[t][reached[t] < N_ITEMS]
            own = graph[0][b.support_items[t][positive[t]]]  # negatives reach nothing
            assert real.tolist() == sorted(set(own.flatten().tolist()))
            assert (reached[t][len(real) :] == N_ITEMS).all()  # padding: the catalogue size
            assert len(real) < N_ITEMS or graph[0].shape[1] > 3  # 3 a support item: some
    cfg = MetaConfig(adapt="head", inner_solver="ridge", prior_precision=0.7)
    learner = MetaLearner(model, cfg, feedback="implicit").double()
    params = {n: p.detach() for n, p in learner.params().items()}
    support = (b.users, b.support_items, b.support_ratings, b.support_mask)
    want = learner.adapt(params, support)
    got = learner.adapt(params, support, sparse_neighbours=True)
    assert "neighbour.items" not in want and got["item_bias"] is params["item_bias"]
    for n in ("head.weight", "head.factor", "head.neighbour", "head.bias"):
        torch.testing.assert_close(got[n], want[n])
    term = got["head.neighbour"] * sparse_lookup(*(got[n] for n in SPARSE_NEIGHBOURS), catalogue)
    torch.testing.assert_close(params["item_bias"] + term, want["item_bias"])


def test_the_learner_contains_item_knn(implicit_tasks):
    """With a zero head prior mean but for the neighbour weight 1, an infinitely stiff prior
    and zero item biases, the adapted learner scores the catalogue as item-KNN does (up to
    a per-user affine map, so the same ranking; support items are not their own
    neighbours, and evaluation never ranks them)."""
    knn, graph = _knn()
    model = tiny_model(factor_head=True, graph=graph)
    cfg = MetaConfig(adapt="head", inner_solver="ridge", negatives=3)
    learner = MetaLearner(model, cfg, feedback="implicit").double()
    with torch.no_grad():
        for p in model.head.values():
            p.zero_()
        model.head["neighbour"].fill_(1.0)
        model.item_bias.zero_()
        model.global_mean.zero_()
        learner.log_precision.fill_(30.0)
    b = implicit_tasks
    items = torch.arange(N_ITEMS).expand(b.num_tasks, N_ITEMS)
    got = predict_items(learner, b, items)
    positive = (b.support_ratings > 0) & b.support_mask
    query = (b.query_items, b.query_ratings, b.query_mask)
    positives = TaskBatch(b.users, b.support_items, b.support_ratings, positive, *query)
    knn_scores = knn.predict_items(positives, items)
    sim = torch.as_tensor(knn.similarity_.toarray()).double().fill_diagonal_(0.0)
    for t in range(b.num_tasks):
        support = b.support_items[t][positive[t]]
        raw = sim[support].sum(0)
        others = torch.ones(N_ITEMS, dtype=torch.bool).index_fill_(0, support, False)
        torch.testing.assert_close(raw[others], knn_scores[t][others])
        torch.testing.assert_close(got[t], (raw - raw.mean()) / raw.std(), atol=1e-6, rtol=1e-6)


def test_fixed_negatives_depend_on_the_user_alone_and_are_never_a_positive():
    popularity = torch.arange(50, dtype=torch.float64) ** 2
    users = torch.tensor([4, 9, 4, 1])
    cand = fixed_candidates(users, 50, 10, popularity=popularity, popular_share=0.5)
    assert torch.equal(cand[0], cand[2])  # same user, same candidates, any batch position
    assert torch.equal(cand[1:2], fixed_candidates(users[1:2], 50, 10, popularity=popularity))
    positives = torch.randint(0, 50, (4, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(positives, dtype=torch.bool)
    neg, ok = keep_negatives(cand, positives, mask, 10)
    for t in range(4):
        kept = neg[t][ok[t]]
        assert not set(kept.tolist()) & set(positives[t].tolist())
        assert len(set(kept.tolist())) == len(kept)
    uniform = fixed_candidates(torch.arange(2000), 50, 10, popular_share=0.0)
    counts = torch.bincount(uniform.flatten(), minlength=50).double()
    assert counts.std() / counts.mean() < 0.05  # equidistributed over the catalogue
    popular = fixed_candidates(torch.arange(2000), 50, 10, popularity=popularity, popular_share=1.0)
    assert popular.double().mean() > 35  # P(i) ~ i^2: the mean index is ~37.5, uniform 24.5
