"""Oracles for the vectorized meta-learning core (float64).

The vectorized inner loop must equal a straightforward per-task loop (one functional_call
per task, unpadded) for every algorithm, with mixed support sizes; padding must never change
a result; and second-order meta-gradients pass torch's gradcheck.
"""

from dataclasses import replace

import pytest
import torch
from torch.func import functional_call

from metarec.baselines import MFFoldIn
from metarec.batch import TaskBatch
from metarec.config import MetaConfig
from metarec.data.features import USER_FEATURES
from metarec.loop import predict_items
from metarec.meta import (
    MetaLearner,
    adapt,
    masked_mse,
    meta_gradients,
    meta_loss,
    predict,
)
from metarec.model import Features, Recommender, call_with

N_ITEMS, N_USERS = 12, 6


def tiny_model(
    *,
    item_ids: bool = True,
    users: bool = True,
    factor_head: bool = False,
    graph: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Recommender:
    g = torch.Generator().manual_seed(0)
    genres = (torch.rand(N_ITEMS, 4, generator=g) > 0.5).double()
    genres /= genres.sum(1, keepdim=True).clamp_min(1)
    feats = Features(
        item_genres=genres,
        item_year=torch.randint(0, 5, (N_ITEMS,), generator=g),
        item_seen=torch.arange(N_ITEMS) < 10,  # items 10, 11 unseen in training
        user_table=torch.randint(0, 3, (N_USERS, 4), generator=g) if users else None,
        vocab_sizes={
            "genre": 4,
            "year_bucket": 5,
            "age_bucket": 3,
            "gender": 3,
            "occupation": 3,
            "zip_prefix": 3,
        },
        user_names=USER_FEATURES if users else (),
        neighbour_index=None if graph is None else graph[0],
        neighbour_sim=None if graph is None else graph[1],
    )
    torch.manual_seed(0)
    model = Recommender(
        feats,
        embedding_dim=3,
        hidden=(5, 4),
        item_id_embedding=item_ids,
        use_user_features=users,
        global_mean=3.0,
        factor_head=factor_head,
    ).double()
    with torch.no_grad():
        model.item_bias.normal_(0, 0.3)
    return model


@pytest.fixture
def tiny_tasks() -> TaskBatch:
    return make_tiny_tasks()


def make_tiny_tasks() -> TaskBatch:
    """4 tasks, support sizes 2/5/3/6 and query sizes 3/1/2/3, padded with garbage."""
    g = torch.Generator().manual_seed(1)
    s_len, q_len = [2, 5, 3, 6], [3, 1, 2, 3]
    s_mask = torch.arange(6)[None] < torch.tensor(s_len)[:, None]
    q_mask = torch.arange(3)[None] < torch.tensor(q_len)[:, None]
    return TaskBatch(
        users=torch.tensor([0, 3, 5, 2]),
        support_items=torch.randint(0, N_ITEMS, (4, 6), generator=g),
        support_ratings=torch.randint(1, 6, (4, 6), generator=g).double(),
        support_mask=s_mask,
        query_items=torch.randint(0, N_ITEMS, (4, 3), generator=g),
        query_ratings=torch.randint(1, 6, (4, 3), generator=g).double(),
        query_mask=q_mask,
    )


def outer_loss(learner: MetaLearner, err: torch.Tensor) -> torch.Tensor:
    """One task's outer loss on ratings from its query errors: the squared error within δ =
    ``cfg.huber`` rating standard deviations, ``2 δ |err| - δ²`` beyond (written out)."""
    d = learner.cfg.huber * float(learner.rating_std)
    a = err.abs()
    return torch.where(a <= d, err**2, 2 * d * a - d * d).mean() if d > 0 else (err**2).mean()


def reference_meta_loss(learner: MetaLearner, tasks: TaskBatch, *, second_order: bool):
    """The textbook loop: adapt each task alone on its unpadded support set."""
    cfg, model = learner.cfg, learner.model
    params = learner.params()
    lrs = learner.lrs()
    losses = []
    for t in range(tasks.num_tasks):
        s = tasks.support_mask[t]
        q = tasks.query_mask[t]
        user = tasks.users[t]
        fast = {n: params[n] for n in learner.adapted}
        for _ in range(cfg.inner_steps):
            pred = functional_call(model, {**params, **fast}, (tasks.support_items[t][s], user))
            err2 = (pred - tasks.support_ratings[t][s]) ** 2
            loss = err2.sum() / (len(err2) + cfg.support_prior)  # the mean when the prior is 0
            if cfg.proximal:
                loss = loss + 0.5 * cfg.proximal * sum(
                    ((fast[n] - params[n]) ** 2).sum() for n in learner.adapted
                )
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
            fast = {
                n: f - (lrs[n] if isinstance(lrs, dict) else lrs) * gr
                for (n, f), gr in zip(fast.items(), grads, strict=True)
            }
        pred = functional_call(model, {**params, **fast}, (tasks.query_items[t][q], user))
        losses.append(outer_loss(learner, pred - tasks.query_ratings[t][q]))
    return torch.stack(losses).mean()


def _grads(learner, loss):
    names = [n for n, p in learner.named_parameters()]
    grads = torch.autograd.grad(loss, list(learner.parameters()), allow_unused=True)
    return {n: g for n, g in zip(names, grads, strict=True) if g is not None}


CASES = [
    ("maml", "mlp", True, 0.0, 0.0),
    ("maml", "all", True, 0.0, 0.0),
    ("maml", "mlp", True, 0.7, 0.0),  # proximal term
    ("fomaml", "mlp", False, 0.0, 0.0),
    ("fomaml", "mlp", False, 0.7, 0.0),
    ("maml", "head", True, 0.3, 0.0),
    ("metasgd", "mlp", True, 0.4, 0.0),  # per-entry step sizes with a proximal term
    ("metasgd", "mlp", True, 0.0, 0.0),
    ("anil", "mlp", True, 0.0, 0.0),  # anil forces head-only
    ("maml", "mlp", True, 0.0, 4.0),  # support prior: loss sum / (n + 4), hand gradients
    ("maml", "all", True, 0.0, 4.0),  # ... and through autograd
    ("metasgd", "mlp", True, 0.4, 2.0),
]


@pytest.mark.parametrize(("algorithm", "adapt", "second_order", "proximal", "prior"), CASES)
def test_vectorized_meta_loss_and_gradients_equal_per_task_loop(
    tiny_tasks, algorithm, adapt, second_order, proximal, prior
):
    cfg = MetaConfig(
        inner_solver="gd",
        algorithm=algorithm,
        adapt=adapt,
        inner_steps=3,
        inner_lr=0.05,
        proximal=proximal,
        support_prior=prior,
    )
    learner = MetaLearner(tiny_model(), cfg).double()
    loss, _ = meta_loss(learner, tiny_tasks)
    ref = reference_meta_loss(learner, tiny_tasks, second_order=second_order)
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-9)
    got, want = _grads(learner, loss), _grads(learner, ref)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-8, rtol=1e-6, msg=name)
    if algorithm == "anil":
        assert sorted(learner.adapted) == ["head.bias", "head.weight"]
    if algorithm == "metasgd":
        assert any(n.startswith("log_inner_lrs.") for n in got)


def test_fomaml_equals_maml_without_second_order_terms(tiny_tasks):
    fo = MetaLearner(
        tiny_model(), MetaConfig(inner_solver="gd", algorithm="fomaml", inner_steps=2)
    ).double()
    so = MetaLearner(
        tiny_model(), MetaConfig(inner_solver="gd", algorithm="maml", inner_steps=2)
    ).double()
    fo_grads = _grads(fo, meta_loss(fo, tiny_tasks)[0])
    ref = _grads(so, reference_meta_loss(so, tiny_tasks, second_order=False))
    for name in ref:
        torch.testing.assert_close(fo_grads[name], ref[name], atol=1e-8, rtol=1e-6)
    so_grads = _grads(so, meta_loss(so, tiny_tasks)[0])
    assert not torch.allclose(so_grads["model.mlp.0_weight"], fo_grads["model.mlp.0_weight"])


def test_reptile_gradient_is_theta_minus_mean_adapted_weights(tiny_tasks):
    cfg = MetaConfig(
        inner_solver="gd", algorithm="reptile", adapt="mlp", inner_steps=3, inner_lr=0.05
    )
    learner = MetaLearner(tiny_model(), cfg).double()
    learner.zero_grad()
    meta_gradients(learner, tiny_tasks)
    params = learner.params()
    items, ratings, mask = tiny_tasks.merged()
    phis = []
    for t in range(tiny_tasks.num_tasks):
        fast = {n: params[n].detach().clone().requires_grad_() for n in learner.adapted}
        for _ in range(3):
            pred = functional_call(
                learner.model, {**params, **fast}, (items[t][mask[t]], tiny_tasks.users[t])
            )
            loss = ((pred - ratings[t][mask[t]]) ** 2).mean()
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {
                n: (f - 0.05 * g).detach().requires_grad_()
                for (n, f), g in zip(fast.items(), grads, strict=True)
            }
        phis.append(fast)
    for n in learner.adapted:
        want = params[n].detach() - torch.stack([p[n] for p in phis]).mean(0)
        torch.testing.assert_close(params[n].grad, want, atol=1e-10, rtol=1e-8)
    assert learner.model.emb["genre"].grad is not None  # shared weights still learn


def _pad_more(tasks: TaskBatch, extra: int) -> TaskBatch:
    def pad(t, value):
        filler = torch.full((t.shape[0], extra), value, dtype=t.dtype)
        return torch.cat([t, filler], 1)

    return replace(
        tasks,
        support_items=pad(tasks.support_items, 7),
        support_ratings=pad(tasks.support_ratings, 99.0),
        support_mask=pad(tasks.support_mask, False),
        query_items=pad(tasks.query_items, 3),
        query_ratings=pad(tasks.query_ratings, -50.0),
        query_mask=pad(tasks.query_mask, False),
    )


@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "reptile"])
def test_padding_never_changes_a_result(tiny_tasks, algorithm):
    cfg = MetaConfig(
        inner_solver="gd", algorithm=algorithm, adapt="all", inner_steps=2, inner_lr=0.1
    )
    results = []
    for tasks in (tiny_tasks, _pad_more(tiny_tasks, 5)):
        learner = MetaLearner(tiny_model(), cfg).double()
        learner.zero_grad()
        meta_gradients(learner, tasks)
        results.append(
            {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
        )
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], atol=1e-12, rtol=1e-10)


def test_second_order_meta_gradient_passes_gradcheck(tiny_tasks):
    learner = MetaLearner(
        tiny_model(users=False), MetaConfig(inner_solver="gd", inner_steps=2, inner_lr=0.1)
    )
    learner = learner.double()
    head = learner.model.head["weight"]

    def loss_of_head(w):
        params = {**learner.params(), "head.weight": w}
        b = tiny_tasks
        fast = adapt(
            learner.model,
            params,
            (b.users, b.support_items, b.support_ratings, b.support_mask),
            names=learner.adapted,
            steps=2,
            inner_lr=0.1,
            create_graph=True,
        )
        pred = predict(learner.model, fast, b.query_items, b.users)
        return masked_mse(pred, b.query_ratings, b.query_mask).mean()

    w = head.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(loss_of_head, (w,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(loss_of_head, (w,), eps=1e-6, atol=1e-4)


def test_unseen_items_share_the_zero_id_row():
    model = tiny_model()
    x, _ = model.encode_parts(torch.tensor([10, 11]), torch.tensor(0))
    id_part = x[:, 6:9]  # genre (3) + year (3) come first, then the id embedding
    assert torch.equal(id_part, torch.zeros_like(id_part))
    assert model.emb["item"].shape[0] == N_ITEMS + 1


def test_the_outer_loss_on_ratings_is_squared_within_delta_and_linear_beyond():
    """δ = ``meta.huber`` training-rating standard deviations: errors within it cost their
    square (as before), errors beyond it 2 δ |e| - δ², so the loss and its slope are
    continuous at δ and a far-off rating pulls no harder than one at δ."""
    learner = MetaLearner(tiny_model(), MetaConfig(huber=2.0)).double()
    learner.rating_std.fill_(0.5)  # δ = 1 rating point
    err = torch.tensor([[0.5, -1.0, 3.0, -4.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    got = learner.query_loss(err, torch.zeros_like(err), mask)
    torch.testing.assert_close(got, torch.tensor([(0.25 + 1.0 + 5.0 + 7.0) / 4], dtype=err.dtype))
    e = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)  # the slope at δ: 2 δ
    zero = torch.zeros(1, 1, dtype=e.dtype)
    (grad,) = torch.autograd.grad(learner.query_loss(e[None], zero, mask[:, :1]), e)
    assert float(grad) == pytest.approx(2.0)
    # a float64 learner reads float32 batches (train.dtype: float64): no dtype error backwards
    e = err.clone().requires_grad_()
    learner.query_loss(e, torch.zeros(err.shape), mask).sum().backward()
    assert e.grad is not None and e.grad.dtype == torch.float64
    squared = MetaLearner(tiny_model(), MetaConfig(huber=0.0)).double()
    torch.testing.assert_close(
        squared.query_loss(err, torch.zeros_like(err), mask), (err[:, :4] ** 2).mean(1)
    )


def test_zero_inner_steps_is_plain_regression_on_all_ratings(tiny_tasks):
    learner = MetaLearner(tiny_model(), MetaConfig(inner_solver="gd", inner_steps=0)).double()
    loss, _ = meta_loss(learner, tiny_tasks)
    items, ratings, mask = tiny_tasks.merged()
    pred = learner.model(items, tiny_tasks.users)
    per_task = [outer_loss(learner, (pred - ratings)[t][mask[t]]) for t in range(len(pred))]
    torch.testing.assert_close(loss, torch.stack(per_task).mean())


def test_unknown_algorithm_is_rejected_by_the_config_itself():
    with pytest.raises(ValueError, match="algorithm"):  # pydantic's ValidationError
        MetaConfig(algorithm="mamal")


def _ridge_objective(model, fast, support, precision, theta):
    """sum_S (pred - y)² + (w - θ)ᵀ Λ (w - θ) per task, predictions by the plain forward."""
    users, items, ratings, mask = support
    pred = functional_call(model, fast, (items, users))
    w = torch.cat([fast[n].flatten(1) for n in sorted(theta)], 1)
    t = torch.cat([theta[n].flatten() for n in sorted(theta)])
    lam = torch.cat([precision[n].flatten() for n in sorted(theta)])
    return (((pred - ratings) ** 2) * mask).sum(1) + (((w - t) ** 2) * lam).sum(1)


@pytest.mark.parametrize("factor", [False, True])
def test_ridge_head_is_the_minimum_of_its_objective(tiny_tasks, factor):
    """The closed-form head zeroes the gradient of the Bayesian ridge objective, computed
    through the ordinary forward (not ``Recommender.head_inputs``), with a per-input precision."""
    cfg = MetaConfig(adapt="head", inner_solver="ridge")
    learner = MetaLearner(tiny_model(factor_head=factor), cfg).double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        learner.log_precision.copy_(torch.randn(learner.log_precision.shape, generator=g))
        for p in learner.model.head.values():
            p.normal_(0, 0.5, generator=g)
    params = {n: p.detach() for n, p in learner.params().items()}
    b = tiny_tasks
    support = (b.users, b.support_items, b.support_ratings, b.support_mask)
    fast = learner.adapt(params, support)
    names = [n for n in params if n.startswith("head.")]
    assert ("head.factor" in names) == factor
    # the precision vector in head_inputs order: [weight, factor, bias]
    lam = learner.log_precision.detach().exp()
    hw, d = params["head.weight"].shape[0], params["head.factor"].numel() if factor else 0
    precision = {"head.weight": lam[:hw], "head.bias": lam[-1:]}
    if factor:
        precision["head.factor"] = lam[hw : hw + d]
    w = {n: fast[n].detach().clone().requires_grad_() for n in names}
    obj = _ridge_objective(
        learner.model, {**params, **w}, support, precision, {n: params[n] for n in names}
    )
    grads = torch.autograd.grad(obj.sum(), list(w.values()))
    for grad in grads:
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-9, rtol=0)


def test_factor_head_with_a_stiff_mlp_prior_is_exactly_mf_foldin(tiny_tasks):
    """The ridge learner contains MF fold-in: with ALS item factors and biases, a zero
    prior mean and MF's penalty on [p_u, b_u], and an infinitely stiff prior on the MLP
    part of the head, its predictions are MF fold-in's, whatever the MLP computes."""
    dim, reg = 3, 2.0
    tasks = tiny_tasks
    mf = MFFoldIn(dim=dim, reg=reg, iters=6, seed=0).fit(tasks, n_items=N_ITEMS)
    model = tiny_model(factor_head=True)
    learner = MetaLearner(model, MetaConfig(adapt="head", inner_solver="ridge")).double()
    hw = model.head["weight"].shape[0]
    with torch.no_grad():
        model.emb["item"][1:] = mf.item_factors_
        model.item_id_index.copy_(torch.arange(1, N_ITEMS + 1))  # every item has its factors
        model.item_bias.copy_(mf.item_bias_)
        model.global_mean.fill_(mf.mu_)
        lam = torch.full_like(learner.log_precision, reg)
        lam[:hw] = 1e12
        learner.log_precision.copy_(lam.log())
    items = torch.arange(N_ITEMS).expand(tasks.num_tasks, N_ITEMS)
    got = predict_items(learner, tasks, items)
    torch.testing.assert_close(got, mf.predict_items(tasks, items).double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("factor", [False, True])
def test_ridge_meta_gradient_matches_per_task_solves(tiny_tasks, factor):
    cfg = MetaConfig(algorithm="maml", adapt="head", inner_solver="ridge", prior_precision=0.5)
    learner = MetaLearner(tiny_model(factor_head=factor), cfg).double()
    with torch.no_grad():
        learner.log_precision.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        for p in learner.model.head.values():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    loss, _ = meta_loss(learner, tiny_tasks)
    params = learner.params()
    lam = learner.log_precision.exp()
    theta = torch.cat(
        [params["head.weight"][:, 0]]
        + ([params["head.factor"]] if factor else [])
        + [params["head.bias"]]
    )
    losses = []
    for t in range(tiny_tasks.num_tasks):  # reference: one small solve per task, unpadded
        s, q, u = tiny_tasks.support_mask[t], tiny_tasks.query_mask[t], tiny_tasks.users[t]
        h, off = call_with(learner.model, params, "head_inputs", tiny_tasks.support_items[t][s], u)
        x = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
        y = tiny_tasks.support_ratings[t][s] - off
        w = torch.linalg.solve(x.T @ x + torch.diag(lam), x.T @ y + lam * theta)
        hq, offq = call_with(learner.model, params, "head_inputs", tiny_tasks.query_items[t][q], u)
        pred = hq @ w[:-1] + w[-1] + offq
        losses.append(outer_loss(learner, pred - tiny_tasks.query_ratings[t][q]))
    ref = torch.stack(losses).mean()
    torch.testing.assert_close(loss, ref)
    got, want = _grads(learner, loss), _grads(learner, ref)
    assert "log_precision" in want  # the prior's precision is meta-learned
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("prior", [0.0, 3.0])
@pytest.mark.parametrize("users", [True, False])
@pytest.mark.parametrize("adapt_group", ["head", "mlp"])
def test_hand_derived_support_gradients_equal_autograd(tiny_tasks, users, adapt_group, prior):
    model = tiny_model(users=users)
    learner = MetaLearner(model, MetaConfig(inner_solver="gd", adapt=adapt_group))
    names = learner.adapted
    assert model.hand_grads_for(names)
    t = tiny_tasks.num_tasks
    g = torch.Generator().manual_seed(3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    # Distinct weights per task, so a mix-up between tasks would show.
    fast = {
        n: (
            params[n] + 0.1 * torch.randn(t, *params[n].shape, generator=g, dtype=torch.float64)
        ).requires_grad_()
        for n in names
    }
    b = tiny_tasks
    full = {**params, **fast}
    pred = functional_call(model, full, (b.support_items, b.users))
    loss = masked_mse(pred, b.support_ratings, b.support_mask, prior=prior).sum()
    want = torch.autograd.grad(loss, list(fast.values()))
    support = model.support_set(
        params, b.support_items, b.users, b.support_ratings, b.support_mask, prior
    )
    split_fast = model.split_input_weight(fast)
    keys = list(split_fast)
    split = {**model.split_input_weight(params), **split_fast}
    got = model.join_input_weight(
        dict(zip(keys, model.support_grads(split, keys, support), strict=True))
    )
    for n, w in zip(names, want, strict=True):
        torch.testing.assert_close(got[n], w, msg=n)


def test_hand_derived_gradients_cover_only_whole_head_or_mlp_groups():
    model = tiny_model()
    assert not model.hand_grads_for(["head.weight"])
    assert not model.hand_grads_for(
        MetaLearner(model, MetaConfig(inner_solver="gd", adapt="all")).adapted
    )


@pytest.mark.parametrize("factor", [False, True])
def test_shared_item_side_scoring_equals_the_forward(tiny_tasks, factor):
    """Without user features and with only the head adapted, every user sees the same item
    features: ``predict_shared`` (the MLP once per item) gives the forward's scores."""
    cfg = MetaConfig(adapt="head", inner_solver="ridge", prior_precision=0.5)
    learner = MetaLearner(tiny_model(users=False, factor_head=factor), cfg).double()
    model, b = learner.model, tiny_tasks
    params = {n: p.detach() for n, p in learner.params().items()}
    fast = learner.adapt(params, (b.users, b.support_items, b.support_ratings, b.support_mask))
    fast["item_bias"] = params["item_bias"] + torch.randn(b.num_tasks, N_ITEMS).double()
    items = torch.randint(0, N_ITEMS, (b.num_tasks, 7), generator=torch.Generator().manual_seed(1))
    assert model.shares_item_side(fast)
    want = functional_call(model, fast, (items, b.users))
    torch.testing.assert_close(model.predict_shared(fast, items), want, atol=1e-12, rtol=1e-12)
    assert not tiny_model(users=True).shares_item_side(params)  # user features: per pair
    mlp = {**params, "mlp.0_bias": params["mlp.0_bias"].expand(b.num_tasks, -1)}
    assert not model.shares_item_side(mlp)  # an adapted MLP: per user
