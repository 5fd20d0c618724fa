"""The meta-learning core: one vectorized inner loop for the whole MAML family.

Every task in a meta-batch adapts at once. Fast weights carry a leading task dimension T
(``theta.expand(T, ...)``), and because the support loss is a *sum* of independent per-task
losses, one ``autograd.grad`` of that sum gives every task its own gradient — T tasks cost
one set of batched matmuls and one backward, not T of each. Second-order MAML keeps the
graph (``create_graph=True``); FOMAML and Reptile drop it.

Algorithms (``config.ALGORITHMS``; one dispatch point, ``meta_gradients``):
- ``maml``    C. Finn et al., ICML 2017, https://arxiv.org/abs/1703.03400 (second order)
- ``fomaml``  the same without second-order terms
- ``metasgd`` Z. Li et al., 2017, https://arxiv.org/abs/1707.09835 (learned per-parameter
              inner learning rates)
- ``anil``    A. Raghu et al., ICLR 2020, https://arxiv.org/abs/1909.09157 (adapt the head only)
- ``reptile`` A. Nichol et al., 2018, https://arxiv.org/abs/1803.02999 (meta-gradient
              theta - mean(phi), fed to the outer optimizer as a gradient)
An optional proximal term lambda/2 |phi - theta|^2 in the inner loss (A. Rajeswaran et al.,
iMAML, NeurIPS 2019) keeps adapted weights near the meta-learned ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metarec.batch import TaskBatch
from metarec.config import DEFAULT_PRIOR_PRECISION, MetaConfig
from metarec.model import (
    ADAPT_GROUPS,
    W0_USER,
    W0_USER_PROJ,
    W0_USER_ROW,
    Params,
    Recommender,
    SupportSet,
    call_with,
    sparse_lookup,
)
from metarec.negatives import draw_candidates, fixed_candidates, keep_negatives

__all__ = [
    "LOSSES",
    "NEIGHBOUR_SHIFT",
    "SPARSE_NEIGHBOURS",
    "MetaLearner",
    "adapt",
    "implicit_targets",
    "masked_mse",
    "meta_gradients",
    "meta_loss",
    "predict",
    "ridge_head",
    "split_shift",
    "task_loss",
]

# Per-task losses: squared error on ratings (explicit feedback), and for implicit feedback
# binary cross-entropy or BPR on positives (target = interaction strength > 0) against
# sampled negatives (target 0) in the same padded row.
LOSSES = ("mse", "bce", "bpr")
# A ridge head's fast weights with ``sparse_neighbours``: instead of the per-user item
# biases, ``Recommender.sparse_neighbour_scores`` (the items reached, their scores, the
# rest's), which ``head.neighbour`` multiplies.
SPARSE_NEIGHBOURS = ("neighbour.items", "neighbour.scores", "neighbour.rest")
# ... and adapted for the items ``at`` alone (ratings): the term there, (T, N), which
# ``predict`` adds to those items' biases; the item biases stay shared.
NEIGHBOUR_SHIFT = "neighbour.shift"


class MetaLearner(nn.Module):
    """The model θ plus, for Meta-SGD, learned inner learning rates α (same shapes as θ), and
    for the ridge solver the learned prior precision of the head (one per head input).

    Args:
        model: the recommender whose parameters are meta-learned.
        cfg: the algorithm settings; decides which parameters adapt and whether α is learned.
        feedback: ``"explicit"`` (ratings: squared error) or ``"implicit"`` (interaction
            strengths: ``cfg.implicit_loss`` against sampled negatives; the model's output
            is then a logit, and ``item_popularity``, a buffer, is what negatives are drawn
            by wherever the learner adapts, serving included).
    """

    def __init__(self, model: Recommender, cfg: MetaConfig, feedback: str = "explicit") -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.feedback = feedback
        self.loss = "mse" if feedback == "explicit" else cfg.implicit_loss
        if feedback == "explicit":  # the training ratings' spread: Huber's δ is cfg.huber of it
            self.register_buffer("rating_std", torch.ones(()))
        if feedback == "implicit":
            self.register_buffer("item_popularity", torch.zeros(model.item_genres.shape[0]))
        groups = ADAPT_GROUPS["head" if cfg.algorithm == "anil" else cfg.adapt]
        self.adapted = [n for n, _ in model.named_parameters() if n.startswith(groups)]
        # Meta-SGD learns log(α): Adam then changes α multiplicatively, which keeps it
        # positive and stops the inner loop from diverging when α would overshoot.
        self.log_inner_lrs = nn.ParameterDict()
        if cfg.algorithm == "metasgd":
            for n in self.adapted:
                p = model.get_parameter(n)
                self.log_inner_lrs[_key(n)] = nn.Parameter(
                    torch.full_like(p, math.log(cfg.inner_lr))
                )
        # Ridge: log of the head prior's per-input precision, from meta.prior_precision
        # (MF fold-in's ridge penalty when the factor head starts at ALS item factors).
        self.log_precision = None
        if cfg.inner_solver == "ridge":
            n = sum(p.numel() for p in model.head.values())
            init = cfg.prior_precision or DEFAULT_PRIOR_PRECISION  # None: a checkpoint loads it
            self.log_precision = nn.Parameter(torch.full((n,), math.log(init)))

    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def query_loss(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Per-task outer loss, (T, N) -> (T,): ``task_loss`` of this learner's kind, on
        ratings Huber's with δ = ``cfg.huber`` training-rating standard deviations."""
        delta = None
        if self.loss == "mse" and self.cfg.huber > 0:
            delta = self.cfg.huber * float(self.rating_std)
        return task_loss(pred, target, mask, loss=self.loss, delta=delta)

    @property
    def personal(self) -> list[str]:
        """The parameters one user's adaptation sets: the adapted ones, plus the item
        biases where the ridge head folds the neighbourhood term into them."""
        return self.adapted + ["item_bias"] * self.model.has_neighbours

    def adapt(
        self,
        params: Params,
        support: tuple[Tensor, Tensor, Tensor, Tensor],
        *,
        steps: int | None = None,
        inner_lr: float | Params | None = None,
        support_prior: float | None = None,
        prior_scale: float = 1.0,
        create_graph: bool = False,
        sparse_neighbours: bool = False,
        at: Tensor | None = None,
    ) -> Params:
        """``adapt`` with this learner's settings (training, evaluation and serving); the
        keyword arguments override them (evaluation tunes them on validation users).
        ``prior_scale`` multiplies the ridge solver's learned prior precision;
        ``sparse_neighbours``, ``at``: see ``ridge_head``."""
        cfg = self.cfg
        precision = None
        if self.log_precision is not None:
            precision = self.log_precision.exp() * prior_scale
        steps = cfg.inner_steps if steps is None else steps  # 0: no adaptation, any solver
        return adapt(
            self.model,
            params,
            support,
            names=self.adapted,
            steps=steps,
            inner_lr=self.lrs() if inner_lr is None else inner_lr,
            proximal=cfg.proximal,
            support_prior=cfg.support_prior if support_prior is None else support_prior,
            create_graph=create_graph,
            solver=cfg.inner_solver if steps > 0 else "gd",
            precision=precision,
            loss=self.loss,
            sparse_neighbours=sparse_neighbours,
            at=at,
        )

    def negative_candidates(self, tasks: int, count: int, generator: torch.Generator) -> Tensor:
        """Random candidate negatives for ``tasks`` implicit training tasks
        (``negatives.draw_candidates``; ``keep_negatives`` then rejects each task's own)."""
        return draw_candidates(tasks, count=count, generator=generator, **self._sampling())

    def support_negatives(self, items: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``cfg.negatives`` negatives (and their mask) beside each implicit support set
        ``(T, S)``, never one of its items, and a function of the support alone
        (``negatives.fixed_candidates`` keyed by the sum of its item ids): a support adapts
        the same way in evaluation and serving, whatever else is in the batch."""
        items, mask = items.cpu(), mask.cpu()
        key = torch.where(mask, items + 1, 0).sum(1)
        cand = fixed_candidates(key, count=self.cfg.negatives, **self._sampling())
        return keep_negatives(cand, items, mask, self.cfg.negatives)

    def _sampling(self) -> dict[str, Any]:
        """The catalogue and the mix every negative of this learner is drawn from."""
        return {
            "n_items": self.model.item_genres.shape[0],
            "popularity": self.item_popularity.cpu(),
            "popular_share": self.cfg.popular_share,
        }

    def lrs(self) -> Params | float:
        if not len(self.log_inner_lrs):
            return self.cfg.inner_lr
        return {n: self.log_inner_lrs[_key(n)].exp() for n in self.adapted}


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot contain dots


def masked_mse(
    pred: Tensor, target: Tensor, mask: Tensor, *, prior: float = 0.0, delta: float | None = None
) -> Tensor:
    """Per-task mean squared error over valid entries: (T, N) -> (T,).

    With ``prior`` > 0 the sum is divided by (n + prior): the inner loss of
    ``meta.support_prior``, whose gradient shrinks with few ratings. With a ``delta``:
    twice Huber's loss, the squared error where it is within ``delta`` and
    ``2 delta |error| - delta²`` beyond (the same value and slope at ``delta``).
    """
    m = mask.to(pred.dtype)
    if delta is None:
        per = (pred - target) ** 2
    else:  # huber_loss does not promote: a float64 learner reads float32 batches
        per = 2.0 * F.huber_loss(pred, target.to(pred.dtype), reduction="none", delta=delta)
    return (per * m).sum(-1) / (m.sum(-1) + prior).clamp_min(1.0)


def implicit_targets(target: Tensor) -> tuple[Tensor, Tensor]:
    """An implicit task's targets read as (positive, confidence): a strength > 0 is a
    positive weighted by that strength, a 0 (a sampled negative) a negative weighted 1."""
    positive = target > 0
    return positive, torch.where(positive, target, torch.ones_like(target))


def task_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    loss: str = "mse",
    prior: float = 0.0,
    delta: float | None = None,
) -> Tensor:
    """Per-task loss over valid entries, (T, N) -> (T,); ``loss`` one of ``LOSSES``.

    ``mse`` with a ``delta``: Huber's instead (``masked_mse``).

    Implicit targets are interaction strengths, 0 for a sampled negative. ``bce`` weighs a
    positive's log-loss by its strength (a purchase counts more than a view) and a
    negative's by 1, summed over (n + ``prior``) like ``masked_mse``. ``bpr`` is the
    strength-weighted mean of -log sigmoid(pred_pos - pred_neg) over every (positive,
    negative) pair of a task: a ranking loss, blind to a shift of all of a task's scores.
    """
    if loss == "mse":
        return masked_mse(pred, target, mask, prior=prior, delta=delta)
    m = mask.to(pred.dtype)
    positive, confidence = implicit_targets(target)
    weight = confidence * m
    if loss == "bce":
        per = F.binary_cross_entropy_with_logits(pred, positive.to(pred.dtype), reduction="none")
        return (per * weight).sum(-1) / (m.sum(-1) + prior).clamp_min(1.0)
    if loss == "bpr":
        pairs = (positive & mask).unsqueeze(-1) & (~positive & mask).unsqueeze(-2)  # (T, N, N)
        per = F.softplus(pred.unsqueeze(-2) - pred.unsqueeze(-1))  # -log sigmoid(pos - neg)
        w = weight.unsqueeze(-1) * pairs.to(pred.dtype)
        return (per * w).sum((-1, -2)) / (w.sum((-1, -2)) + prior).clamp_min(1e-12)
    raise ValueError(f"loss: got {loss!r}; expected one of {LOSSES}")


def predict(model: Recommender, params: Params, items: Tensor, users: Tensor) -> Tensor:
    """Ratings of ``items`` (T, N) for ``users`` (T,) under (possibly fast) ``params``;
    weights adapted ``at`` some items score those items, in that order, and no others."""
    params, shift = split_shift(params, items)
    return functional_call(model, params, (items, users), {"shift": shift})


def split_shift(params: Params, items: Tensor) -> tuple[Params, Tensor | None]:
    """``params`` without ``NEIGHBOUR_SHIFT``, and the shift (None without one), checked
    to belong to ``items``: the term was estimated at the items adaptation was told of."""
    if NEIGHBOUR_SHIFT not in params:
        return params, None
    shift = params[NEIGHBOUR_SHIFT]
    if shift.shape != items.shape:
        raise ValueError(
            f"these fast weights were adapted to score {tuple(shift.shape)} items "
            f"(adapt's at=), not {tuple(items.shape)}"
        )
    return {n: p for n, p in params.items() if n != NEIGHBOUR_SHIFT}, shift


def adapt(
    model: Recommender,
    params: Params,
    support: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    names: list[str],
    steps: int,
    inner_lr: float | Params,
    proximal: float = 0.0,
    support_prior: float = 0.0,
    create_graph: bool = False,
    solver: str = "gd",
    precision: Tensor | None = None,
    loss: str = "mse",
    sparse_neighbours: bool = False,
    at: Tensor | None = None,
) -> Params:
    """Fast weights after ``steps`` gradient steps on each task's support set, all at once.

    Args:
        support: (users (T,), items (T, S), ratings (T, S), mask (T, S)).
        names: the adapted parameter names; the rest stay shared (no task dimension).
        inner_lr: one step size, or one tensor per adapted parameter (Meta-SGD).
        support_prior: divide each task's support loss by (n + support_prior) rather than
            n: a user with few ratings moves less from the meta-learned weights.
        create_graph: keep second-order terms (MAML). Without it the returned weights
            still depend on ``params`` to first order (FOMAML's gradient path).
        solver: ``"gd"``, or ``"ridge"``: the head's exact posterior mean under a Gaussian
            prior of mean θ and diagonal ``precision`` (default: ``proximal``), see
            ``ridge_head``.
        loss: the support loss, one of ``LOSSES`` (implicit supports carry their negatives).
        sparse_neighbours, at: see ``ridge_head``.
    Returns:
        A full parameter dict; adapted entries have shape (T, *param.shape).
    """
    if solver == "ridge":
        if precision is None:
            precision = torch.tensor(proximal)
        return ridge_head(
            model,
            params,
            support,
            precision=precision,
            create_graph=create_graph,
            loss=loss,
            sparse_neighbours=sparse_neighbours,
            at=at,
        )
    users, items, ratings, mask = support
    t = users.shape[0]
    theta = {n: params[n].expand(t, *params[n].shape) for n in names}  # (T, ...)
    fast = dict(theta)
    if steps == 0:
        return {**params, **fast}
    step_size = inner_lr if isinstance(inner_lr, dict) else dict.fromkeys(names, inner_lr)
    if loss == "mse" and model.hand_grads_for(names):  # hand-derived for squared error only
        support_set = model.support_set(params, items, users, ratings, mask, support_prior)
        fast = _adapt_mlp(
            model, params, names, support_set, steps, step_size, proximal, create_graph
        )
        return {**params, **fast}
    if not any(f.requires_grad for f in fast.values()):  # evaluation of detached weights
        fast = {n: f.clone().requires_grad_() for n, f in fast.items()}
        theta = {n: f.detach() for n, f in fast.items()}
    with torch.enable_grad():
        for _ in range(steps):
            pred = functional_call(model, {**params, **fast}, (items, users))
            inner = task_loss(pred, ratings, mask, loss=loss, prior=support_prior)
            if proximal:
                inner = inner + 0.5 * proximal * sum(
                    ((fast[n] - theta[n]) ** 2).flatten(1).sum(1) for n in names
                )
            grads = torch.autograd.grad(inner.sum(), list(fast.values()), create_graph=create_graph)
            fast = {
                n: _step(f, g, step_size[n]) for (n, f), g in zip(fast.items(), grads, strict=True)
            }
    return {**params, **fast}


def _adapt_mlp(
    model: Recommender,
    params: Params,
    names: list[str],
    support: SupportSet,
    steps: int,
    step_size: dict[str, float | Tensor],
    proximal: float,
    create_graph: bool,
) -> Params:
    """The inner loop when only the MLP and/or head adapt: hand-derived gradients.

    Inputs are encoded once and ``Recommender.support_grads`` gives the gradients, so there
    is no autograd pass at all unless a meta-gradient is wanted. The first layer's user block
    W_u (Fu x H per task, the largest fast weight) is never updated in full: its gradient is
    the outer product u^T s of the task's user features u and a row s, so after any number
    of steps W_u - theta_u = alpha * u^T A for a row A, and the forward needs only
    u @ W_u (T, 1, H). W_u is formed once at the end. (With Meta-SGD's per-entry alpha and a
    proximal term that identity does not hold, and W_u is updated in full.)
    """
    split = model.split_input_weight
    shared, step_size = split(params), split(step_size)
    t = support.item_x.shape[0]
    # Split theta before expanding it to T tasks: the split's backward (a cat) then runs on
    # the weight, not on T copies of it.
    theta = {n: shared[n].expand(t, *shared[n].shape) for n in split(dict.fromkeys(names, 0.0))}
    fast = dict(theta)
    u = support.user_x
    low_rank = (
        u is not None
        and W0_USER in fast
        and (not isinstance(step_size[W0_USER], Tensor) or not proximal)
    )
    if low_rank:
        lr_u = step_size.pop(W0_USER)
        theta_u = theta.pop(W0_USER)
        del fast[W0_USER]
        proj0 = u @ shared[W0_USER]  # (T, 1, H) = u @ theta_u
        proj, acc = proj0, torch.zeros_like(proj0)  # u @ W_u, and A
        # u @ (alpha * u^T s) = gain * s
        gain = (
            (u * u).sum(-1, keepdim=True) * lr_u if not isinstance(lr_u, Tensor) else (u * u) @ lr_u
        )
        decay = 1.0 - lr_u * proximal if proximal else 1.0
    keys = list(fast)
    for _ in range(steps):
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            state = {**shared, **fast, W0_USER_PROJ: proj} if low_rank else {**shared, **fast}
            grads = model.support_grads(state, keys + [W0_USER_ROW] * low_rank, support)
            if proximal:
                grads[: len(keys)] = [
                    g + proximal * (fast[n] - theta[n]) for n, g in zip(keys, grads, strict=False)
                ]
            if low_rank:
                row = grads.pop()
                proj = proj0 + decay * (proj - proj0) - gain * row
                acc = decay * acc - row
        fast = {n: _step(f, g, step_size[n]) for (n, f), g in zip(fast.items(), grads, strict=True)}
    if low_rank:  # u enters the step, not theta: first order treats it as a constant
        u = u if create_graph else u.detach()
        fast[W0_USER] = theta_u + lr_u * (u.transpose(-1, -2) * acc)
    return model.join_input_weight(fast)


def _step(weight: Tensor, grad: Tensor, lr: float | Tensor) -> Tensor:
    """weight - lr * grad, as one op (and one op in its backward) when lr is a number."""
    if isinstance(lr, Tensor):
        return weight - lr * grad
    return torch.add(weight, grad, alpha=-lr)


def ridge_head(
    model: Recommender,
    params: Params,
    support: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    precision: Tensor,
    create_graph: bool = True,
    loss: str = "mse",
    sparse_neighbours: bool = False,
    at: Tensor | None = None,
) -> Params:
    """Closed-form inner loop for the head: the posterior mean of a Bayesian linear model.

    argmin_w sum_S (x.w - y)² + (w - θ)ᵀ Λ (w - θ), with x = [h, q_i, n_i, 1] the head
    inputs (unit-norm MLP features, the item factors when the model has a factor head,
    with a neighbour graph item-KNN's estimate of i from the support: its rating estimate
    from the other support ratings on explicit data, its standardised score on implicit
    data; a bias column), y the rating minus the item bias and μ, θ the meta-learned head
    (the prior mean a user starts from) and Λ = diag(``precision``). A *sum* over
    ratings, not a mean: the prior weighs as much as Λ ratings whatever the support size,
    so a user with one rating stays near θ and one with a hundred follows the data. With
    θ = 0 (the neighbour weight's included), Λ = λI and ALS item factors, this is exactly
    MF fold-in; meta-training θ, Λ, the MLP and q_i on query loss moves away from it only
    where that helps.

    One batched (T, F, F) solve replaces the inner steps; gradients flow through it exactly
    (implicit MAML's fixed point, computed directly). Without ``create_graph`` the inputs
    are detached, so only the prior θ, Λ learns from the query loss (first order).

    References: L. Bertinetto et al., Meta-learning with differentiable closed-form solvers,
    ICLR 2019, https://arxiv.org/abs/1805.08136; A. Rajeswaran et al., Meta-Learning with
    Implicit Gradients, NeurIPS 2019, https://arxiv.org/abs/1909.04630

    With an implicit ``loss`` the targets are 1 for a positive and 0 for a sampled negative,
    each row weighted by its confidence (a positive's strength, 1 for a negative): the
    fold-in of implicit ALS (Hu, Koren & Volinsky, ICDM 2008) with sampled negatives in
    place of the whole catalogue, and the same learned prior.

    With a neighbour graph the solved weight multiplies the support's item-KNN scores of
    every item, and by default those are folded into per-user item biases, (T, I). With
    ``sparse_neighbours`` they are returned as ``SPARSE_NEIGHBOURS`` instead, so a user
    costs their support's neighbours, not the catalogue (serving a million items); the
    same scores to rounding (``tests/test_implicit_meta.py``). On ratings, ``at`` (T, N)
    names the only items the weights will score (training's and validation's query
    items): the term is estimated there alone and returned as ``NEIGHBOUR_SHIFT``, the
    same predictions bit for bit without the (T, I) biases, their product and their
    gradients.
    """
    users, items, ratings, mask = support
    h, offset = call_with(model, params, "head_inputs", items, users)
    if not create_graph:
        h, offset = h.detach(), offset.detach()
    m = mask.to(h.dtype)
    target = ratings
    if loss != "mse":
        positive, confidence = implicit_targets(ratings)
        target = positive.to(h.dtype)
        m = m * confidence.sqrt()
    columns = [h]
    targeted = at is not None and loss == "mse" and model.has_neighbours
    if model.has_neighbours:  # the support's item-KNN scores, one more head input
        if loss == "mse":  # ratings: item-KNN's estimate from the support's residuals
            residual = ((target - offset) * m).detach()
            mean = residual.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
            args = (items, residual - mean, mask)
            dense, sparse = model.rating_neighbour_scores, model.sparse_rating_neighbour_scores
        else:
            args = (items, (ratings > 0) & mask)
            dense, sparse = model.neighbour_scores, model.sparse_neighbour_scores
        if targeted:
            assert at is not None
            both = model.rating_neighbour_scores(*args, at=torch.cat([items, at], 1))
            own, there = both[:, : items.shape[1]], both[:, items.shape[1] :]
        elif sparse_neighbours:
            reached, scores, rest = sparse(*args)
            own = sparse_lookup(reached, scores, rest, items)
        else:
            neighbours = dense(*args)  # (T, I)
            own = neighbours.gather(1, items)
        columns.append(own.to(h.dtype).unsqueeze(-1))
    columns.append(torch.ones_like(h[..., :1]))
    x = torch.cat(columns, -1) * m.unsqueeze(-1)  # (T, S, F)
    y = (target - offset) * m  # (T, S)
    xt = x.transpose(1, 2)  # (T, F, S)
    vectors = [n for n in ("head.factor", "head.neighbour") if n in params]
    theta = torch.cat(
        [params["head.weight"][:, 0]] + [params[n] for n in vectors] + [params["head.bias"]]
    )  # (F,), in the order of x's columns
    lam = precision.to(x.dtype).expand(x.shape[-1])
    a = xt @ x + torch.diag_embed(lam)  # (T, F, F)
    b = (xt @ y.unsqueeze(-1)).squeeze(-1) + lam * theta  # (T, F)
    w = torch.linalg.solve(a, b)  # (T, F)
    lo = params["head.weight"].shape[0]
    out = {**params, "head.weight": w[:, :lo, None], "head.bias": w[:, -1:]}
    for n in vectors:  # slices (a split rounds float32 gradients differently)
        out[n], lo = w[:, lo : lo + params[n].numel()], lo + params[n].numel()
    if targeted:  # the term at the items asked for, added to their biases by ``predict``
        out[NEIGHBOUR_SHIFT] = out["head.neighbour"] * there.to(h.dtype)
    elif sparse_neighbours and model.has_neighbours:  # the scores the weight multiplies
        out |= dict(zip(SPARSE_NEIGHBOURS, (reached, scores, rest), strict=True))
    elif model.has_neighbours:  # spent: the user's item biases now carry weight x scores
        out["item_bias"] = params["item_bias"] + out["head.neighbour"] * neighbours.to(h.dtype)
    return out


def meta_loss(
    learner: MetaLearner, batch: TaskBatch, *, denominator: int | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Outer objective of the gradient-based algorithms: the query loss after adaptation
    (``learner.query_loss``: Huber's on ratings, ``meta.huber``, squared error where it is 0;
    BCE or BPR on implicit positives and negatives).

    With ``inner_steps == 0`` there is no adaptation and the loss covers all of a task's
    ratings (support and query): that is the plain global regressor, the same network
    trained without meta-learning.

    Args:
        denominator: divide the sum of per-task losses by this instead of T. A data-parallel
            worker holding T of a global meta-batch of B tasks passes B, so that summing
            the workers' gradients gives exactly the gradient of the whole batch.
    Returns:
        (scalar loss, {"query_loss": the same, detached}).
    """
    cfg = learner.cfg
    params = learner.params()
    n = batch.num_tasks if denominator is None else denominator
    if cfg.inner_steps == 0:
        items, ratings, mask = batch.merged()
        pred = predict(learner.model, params, items, batch.users)
        loss = learner.query_loss(pred, ratings, mask)
        return loss.sum() / n, {"query_loss": loss.sum().detach() / n}
    fast = learner.adapt(
        params,
        (batch.users, batch.support_items, batch.support_ratings, batch.support_mask),
        create_graph=cfg.algorithm in ("maml", "metasgd", "anil"),
        at=batch.query_items,
    )
    pred = predict(learner.model, fast, batch.query_items, batch.users)
    loss = learner.query_loss(pred, batch.query_ratings, batch.query_mask).sum() / n
    return loss, {"query_loss": loss.detach()}


def _reptile_gradients(learner: MetaLearner, batch: TaskBatch, n: int) -> dict[str, Tensor]:
    """Reptile: adapt on all of each task's ratings; θ's gradient is mean_t (θ - φ_t).

    Shared (non-adapted) parameters get the first-order gradient of the query loss after
    adapting on the support set, so embeddings still learn when only the MLP adapts.
    """
    cfg = learner.cfg
    params = learner.params()
    items, ratings, mask = batch.merged()
    phi = learner.adapt(
        {n: p.detach() for n, p in params.items()},
        (batch.users, items, ratings, mask),
        steps=max(cfg.inner_steps, 1),
    )
    metrics: dict[str, Tensor] = {}
    if len(learner.adapted) < len(params):
        loss, metrics = meta_loss(learner, batch, denominator=n)
        loss.backward()
    with torch.no_grad():
        for name in learner.adapted:
            params[name].grad = (params[name] - phi[name]).sum(0) / n
    if not metrics:
        with torch.no_grad():
            pred = predict(learner.model, phi, batch.query_items, batch.users)
            loss = learner.query_loss(pred, batch.query_ratings, batch.query_mask)
            metrics = {"query_loss": loss.sum() / n}
    return metrics


def meta_gradients(
    learner: MetaLearner, batch: TaskBatch, *, denominator: int | None = None
) -> dict[str, Tensor]:
    """Fill ``.grad`` of every meta-parameter for one meta-batch; return detached metrics.

    The caller zeroes gradients before, and steps (and, data-parallel, sums across
    workers) after. ``denominator``: see ``meta_loss``.
    """
    if learner.cfg.algorithm == "reptile" and learner.cfg.inner_steps > 0:
        return _reptile_gradients(learner, batch, denominator or batch.num_tasks)
    loss, metrics = meta_loss(learner, batch, denominator=denominator)
    loss.backward()
    return metrics
