"""The recommender network: MeLU-style feature embeddings + MLP + an adaptable head.

Prediction for user ``u`` and item ``i``::

    r̂ = μ + b_i + head(MLP([genres_i, year_i, id_i, features_u])) [+ p_u · q_i]

The item bias and item-side embeddings carry what all users agree on; the MLP and head are
what adapts to one user (``adapt``: ``head`` | ``mlp`` | ``all``). With ``factor_head`` the
head also sees the item-id embedding q_i directly: its weights p_u on q_i and its bias b_u
make the model contain biased matrix factorization, so a closed-form fold-in of the head
(``meta.ridge_head``) starts exactly where MF fold-in is and meta-training can only add.
Every weight is used as ``x @ W`` with ``W`` of shape (..., in, out), so the *same* forward
runs for one task with plain parameters (the per-task reference in tests) and for T tasks at
once with fast weights carrying a leading task dimension (the vectorized inner loop): no
Python loop over tasks.

Reference: H. Lee et al., MeLU: Meta-Learned User Preference Estimator for Cold-Start
Recommendation, KDD 2019, https://arxiv.org/abs/1908.00413
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metarec.layers import (
    MLP,
    RMS_EPS,
    FeatureEncoder,
    Head,
    affine,
    dot,
    gather_bias,
    take_rows,
)

__all__ = ["ADAPT_GROUPS", "Features", "Params", "Recommender", "call_with", "sparse_lookup"]

Params = dict[str, Tensor]
# support_grads() keys of the first layer's item-input and user-input row blocks
W0_ITEM, W0_USER = "mlp.0_weight:item", "mlp.0_weight:user"
# ... and, instead of W0_USER, the user block's output u @ W_u (T, 1, H) as an input, and
# its gradient's row s (the gradient is the outer product u^T s) as an output.
W0_USER_PROJ, W0_USER_ROW = "mlp.0_weight:user_proj", "mlp.0_weight:user_row"
# Which parameters adapt per user, by the `meta.adapt` setting (prefix match on names).
ADAPT_GROUPS = {
    "head": ("head.",),
    "mlp": ("mlp.", "head."),
    "all": ("mlp.", "head.", "emb.", "item_bias"),
}


@dataclass(frozen=True)
class Features:
    """Integer-encoded side tables of a dataset (``initialise.dataset_features`` reads them:
    the network knows nothing of files)."""

    item_genres: Tensor  # (I, G) float multi-hot, rows normalised to sum 1 (mean of the bag)
    item_year: Tensor  # (I,) long year bucket, 0 = unknown
    item_seen: Tensor  # (I,) bool: rated in training, so its id embedding means something
    user_table: Tensor | None  # (U, F) long user features, None when the dataset has none
    vocab_sizes: dict[str, int]
    user_names: tuple[str, ...] = ()  # user_table's columns (their vocab_sizes keys)
    # The item-item neighbour graph (``mf.cosine_neighbours``): each item's
    # k most similar items (I, k) long and their cosine similarities (I, k), 0 where a row
    # has fewer; None: no neighbourhood term.
    neighbour_index: Tensor | None = None
    neighbour_sim: Tensor | None = None

    def __post_init__(self) -> None:
        columns = 0 if self.user_table is None else self.user_table.shape[1]
        if columns != len(self.user_names):
            raise ValueError(
                f"user_names: got {len(self.user_names)} names for a user_table of {columns} "
                "columns; expected one name (a vocab_sizes key) per column"
            )
        if (self.neighbour_index is None) != (self.neighbour_sim is None):
            raise ValueError("neighbour_index and neighbour_sim: give both or neither")


@dataclass(frozen=True)
class SupportSet:
    """A padded support set as ``Recommender.support_grads`` consumes it."""

    item_x: Tensor  # (T, S, Fi) item-side inputs
    user_x: Tensor | None  # (T, 1, Fu) user-side inputs
    residual: Tensor  # (T, S, 1) mu + item bias - rating: the prediction error without the MLP
    weight: Tensor  # (T, S, 1) 2 mask / support size: d(mean squared error) / d(error)


def call_with(module: nn.Module, params: Params, method: str, *args: Any) -> Any:
    """``module.<method>(*args)`` computed with ``params`` in place of its own parameters:
    ``functional_call`` for a method other than ``forward`` (no mode flags on forward)."""
    return functional_call(_Bound(module, method), {f"m.{k}": v for k, v in params.items()}, args)


class _Bound(nn.Module):
    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.m, self.method = module, method

    def forward(self, *args: Any) -> Any:
        return getattr(self.m, self.method)(*args)


class Recommender(nn.Module):
    """Rating model whose forward accepts fast weights with or without a task dimension.

    Args:
        features: the dataset's side tables (registered as buffers, moved with the module).
        embedding_dim: D, the size of every feature embedding.
        hidden: widths of the MLP layers.
        item_id_embedding: add a learned per-item embedding; items never rated in training
            map to a shared zero row, so new items fall back to their features.
        use_user_features: embed user features when the dataset has them.
        global_mean: μ, the training ratings' mean (so the network learns residuals).
        factor_head: give the head a weight per item-id embedding dimension (``head.factor``,
            p_u of MF) so the prediction contains p_u · q_i; needs ``item_id_embedding``.
    """

    def __init__(
        self,
        features: Features,
        *,
        embedding_dim: int = 32,
        hidden: tuple[int, ...] = (64, 64),
        item_id_embedding: bool = True,
        use_user_features: bool = True,
        global_mean: float = 3.5,
        factor_head: bool = False,
    ) -> None:
        super().__init__()
        if factor_head and not item_id_embedding:
            raise ValueError("factor_head needs item_id_embedding: p_u multiplies the item's q_i")
        d = embedding_dim
        n_items = features.item_genres.shape[0]
        self.register_buffer("item_genres", features.item_genres)
        self.register_buffer("item_year", features.item_year)
        # Item-id rows: 0 = unseen item (kept at zero), i + 1 = item i.
        id_index = torch.where(features.item_seen, torch.arange(1, n_items + 1), 0)
        self.register_buffer("item_id_index", id_index)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        self.use_user = use_user_features and features.user_table is not None
        self.vocab_sizes = dict(features.vocab_sizes)  # what a checkpoint needs to rebuild it
        self.user_names = features.user_names if self.use_user else ()
        if self.use_user:
            self.register_buffer("user_table", features.user_table)
        self.item_id_embedding = item_id_embedding
        # Three parts, each its own module (encoder -> MLP -> head), built in this order:
        # parameter names and the seeded initialisation follow it.
        self.emb = FeatureEncoder(
            features.vocab_sizes,
            d,
            n_items,
            item_ids=item_id_embedding,
            user_names=self.user_names,
        )
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        widths = [d * (2 + item_id_embedding + len(self.user_names)), *hidden]
        self.mlp = MLP(widths)
        self.head = Head(
            widths[-1], d if factor_head else None, neighbour=features.neighbour_index is not None
        )
        if features.neighbour_index is not None:
            self.register_buffer("neighbour_index", features.neighbour_index)
            self.register_buffer("neighbour_sim", features.neighbour_sim)

    def forward(
        self,
        items: Tensor,
        users: Tensor,
        *,
        encoded: tuple[Tensor, Tensor | None] | None = None,
        shift: Tensor | None = None,
    ) -> Tensor:
        """Predicted ratings, (..., N): the reference path every fast path is tested against.

        Args:
            items: (..., N) long item indices; users: (...,) long user indices.
            With fast weights of a leading task dim T, ``...`` must be (T,).
            encoded: ``encode_parts(items, users)`` computed earlier: the inner loop encodes
                once when no embedding adapts, instead of at every step.
            shift: (..., N) added to these items' biases: a user's neighbourhood term
                where it was estimated at ``items`` alone (``meta.NEIGHBOUR_SHIFT``).
        """
        parts = self.encode_parts(items, users) if encoded is None else encoded
        z = self.mlp.features(*parts)  # (..., N, H), zero mean and unit RMS per row
        offset = _offset(self.item_bias, items, shift) + self.global_mean  # (..., N)
        q = self.item_factors(parts[0]) if self.has_factor_head else None
        return self.head.predict(z, q, offset)

    def head_inputs(self, items: Tensor, users: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, offset)`` such that the prediction is ``x @ [head.weight; head.factor] +
        head.bias + offset``: what a closed-form head solver needs (x is (..., N, H + D) with
        a factor head, else (..., N, H))."""
        parts = self.encode_parts(items, users)
        z = self.mlp.features(*parts)
        x = z * (1.0 / math.sqrt(z.shape[-1]))  # as Head.predict scales it
        offset = gather_bias(self.item_bias, items) + self.global_mean
        if self.has_factor_head:
            x = torch.cat([x, self.item_factors(parts[0])], -1)
        return x, offset

    @property
    def has_factor_head(self) -> bool:
        return "factor" in self.head

    @property
    def has_neighbours(self) -> bool:
        return "neighbour" in self.head

    def neighbour_scores(self, items: Tensor, positive: Tensor) -> Tensor:
        """Each task's item-KNN scores of the whole catalogue, standardised: (T, I).

        The sum of the ``positive`` support items' similarities to every item (item-KNN's
        score), then centred and scaled to unit standard deviation over the catalogue per
        task, so that one head weight means the same for a user with 2 interactions and one
        with 200. A task without positives scores 0 everywhere. Not differentiable: the
        graph is fixed data, like the item features.

        Args:
            items: (T, S) support items; positive: (T, S) bool, which of them count.
        """
        index, sim = self._reach(items, positive, padded=False)
        (raw,) = self._dense_sum(index, sim)
        mean = sim.sum(1) / raw.shape[1]
        # The moments from one pass over the (T, I) scores, the sum from the sparse terms:
        # at a million items each dense pass costs as much as the rest of an adaptation.
        scale = _unit_scale(torch.linalg.vector_norm(raw, dim=1), mean, raw.shape[1])
        return raw.mul_(scale[:, None]).sub_((mean * scale)[:, None])

    def sparse_neighbour_scores(
        self, items: Tensor, positive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``neighbour_scores`` without its (T, I) tensor: what serving a large catalogue
        needs, where a user's cost must follow their support, not the catalogue.

        Every item the positive supports do not reach scores the same, so the scores are
        (T, M) reached items (sorted, each once, padded with I, the catalogue size), (T, M)
        their scores and (T,) every other item's (``sparse_lookup`` reads them). Negatives
        and padding reach nothing.
        """
        n = self.item_genres.shape[0]
        index, sim = self._reach(items, positive, padded=True)
        mean = sim.sum(1) / n
        reached, (raw,) = self._sparse_sum(index, sim)
        scale = _unit_scale(torch.linalg.vector_norm(raw, dim=1), mean, n)
        shift = (mean * scale)[:, None]  # as neighbour_scores centres them
        return reached, raw.mul_(scale[:, None]).sub_(shift), -shift.squeeze(1)

    def rating_neighbour_scores(
        self, items: Tensor, residual: Tensor, mask: Tensor, at: Tensor | None = None
    ) -> Tensor:
        """Each task's item-KNN rating estimate of the whole catalogue, for explicit ratings:
        (T, I), item j's sum_k s_jk e_k / (sum_k s_jk + 1) over the support items k that reach
        j, with e_k the support's ``residual``s (the ratings minus the item baseline, centred
        on the user); 0 for an item the support does not reach.

        Koren's neighbourhood model (KDD 2008) in the form the ridge head can weigh per user.
        An item is never its own neighbour, so a support item's estimate comes from the rest
        of the support only: the head's weight is fitted on leave-one-out values. The +1
        shrinks estimates resting on little similarity towards 0. Not differentiable.

        Args:
            items: (T, S) support items; residual: (T, S); mask: (T, S) bool, which count.
            at: (T, N) the only items wanted: their estimates, (T, N), the same values bit
                for bit. Training and validation score each task's own few items, and
                dividing (and later weighing and adding) catalogue-wide rows to read a few
                hundred of them was most of the term's cost at 60,000 items.
        """
        index, sim, weighted = self._reach(items, mask, residual, padded=False)
        num, den = self._dense_sum(index, weighted, sim)
        if at is not None:
            num, den = num.gather(1, at), den.gather(1, at)
        return num / (den + 1.0)

    def sparse_rating_neighbour_scores(
        self, items: Tensor, residual: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``rating_neighbour_scores`` as ``sparse_neighbour_scores`` gives its scores:
        (reached, scores, rest), the rest 0."""
        index, sim, weighted = self._reach(items, mask, residual, padded=True)
        reached, (num, den) = self._sparse_sum(index, weighted, sim)
        return reached, num.div_(den.add_(1.0)), num.new_zeros(num.shape[0])

    def _reach(
        self, items: Tensor, keep: Tensor, *residuals: Tensor, padded: bool
    ) -> tuple[Tensor, ...]:
        """(T, S k) the items the support's graph reaches, the similarities that reach them
        (0 from a support item not ``keep``; ``padded``: it reaches item I too, so that the
        sparse form lists only what is reached) and, per ``residuals`` (T, S), the
        similarities times the residual of the support item they come from. A support
        longer than ``NEIGHBOUR_SUPPORT`` reaches through its last kept items only."""
        items, keep, *residuals = _last_kept(items, keep, *residuals)
        index = take_rows(self.neighbour_index, items).long()  # (T, S, k); scatter wants int64
        sim = take_rows(self.neighbour_sim, items) * keep.unsqueeze(-1).to(self.neighbour_sim.dtype)
        if padded:
            index = torch.where(keep.unsqueeze(-1), index, self.item_genres.shape[0])
        weighted = ((sim * r.unsqueeze(-1).to(sim.dtype)).flatten(1) for r in residuals)
        return index.flatten(1), sim.flatten(1), *weighted

    def _dense_sum(self, index: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
        """(T, I) each: per task, each of ``values`` (T, M) summed into the items ``index``
        (T, M) names (a 1-D ``scatter_add_``: on CPU a third of ``index_add_``'s time)."""
        t, n = index.shape[0], self.item_genres.shape[0]
        flat = (torch.arange(t, device=index.device).view(t, 1) * n + index).flatten()
        return tuple(
            v.new_zeros(t * n).scatter_add_(0, flat, v.flatten()).view(t, n) for v in values
        )

    def _sparse_sum(self, index: Tensor, *values: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``_dense_sum`` without the (T, I) tensors: (T, M) the distinct items of each row
        of ``index`` (sorted, padded with I) and each value's sums over them."""
        n = self.item_genres.shape[0]
        index, order = index.sort(dim=1, stable=True)
        first = torch.ones_like(index, dtype=torch.bool)
        first[:, 1:] = index[:, 1:] != index[:, :-1]
        slot = first.cumsum(1) - 1  # each entry's place among its row's distinct items
        reached = torch.full_like(index, n).scatter_(1, slot, index)
        sums = [torch.zeros_like(v).scatter_add_(1, slot, v.gather(1, order)) for v in values]
        return reached, sums

    def item_factors(self, item_x: Tensor) -> Tensor:
        """q_i, the item-id embedding, from the item-side inputs (its last D columns)."""
        return item_x[..., -self.emb["item"].shape[-1] :]

    def encode_parts(self, items: Tensor, users: Tensor) -> tuple[Tensor, Tensor | None]:
        """Item-side inputs (..., N, Fi) and user-side inputs (..., 1, Fu) or None.

        Kept apart because the user block is the same for all N rows of a task: the first
        layer multiplies it once per task instead of once per rating, and its gradient is
        one outer product — on MeLU's sizes that is more than half of layer 1's FLOPs.
        """
        ids = take_rows(self.item_id_index, items) if self.item_id_embedding else None
        item_x = self.emb.encode_items(
            take_rows(self.item_genres, items), take_rows(self.item_year, items), ids
        )
        user_x = self.emb.encode_users(self.user_table[users]) if self.use_user else None
        return item_x, user_x

    @torch.no_grad()
    def predict_encoded(
        self, params: Params, item_x: Tensor, user_x: Tensor | None, items: Tensor
    ) -> Tensor:
        """``forward`` on encoded inputs for T tasks' fast weights, inference only: (T, N).

        The same math as ``forward``, fused for scoring a whole catalog per
        request: the bias and the user block ride in ``baddbmm``, ReLU and centring run in
        place, and the unit-RMS features are never materialized (z @ v = r (c @ v)). On the
        (T, N, H) activations of a catalog, elementwise passes cost more than the matmuls;
        this halves them. ``tests/test_serving.py`` checks it against ``forward``.

        Args:
            params: full parameters; the adapted ones carry a task dim T (the others are
                shared and broadcast as expanded views).
            item_x: (T, N, Fi) item-side inputs (an expanded view of one (N, Fi) is fine).
            user_x: (T, 1, Fu) user-side inputs, or None.
            items: (T, N) item indices (for the item biases).
        """
        params = self._with_task_dim(params, item_x.shape[0])
        w0, bias = params["mlp.0_weight"], params["mlp.0_bias"].unsqueeze(-2)
        if user_x is not None:
            w0, w_user = w0.split([item_x.shape[-1], user_x.shape[-1]], dim=-2)
            bias = bias + user_x @ w_user  # (T, 1, H): once per task
        x = torch.baddbmm(bias, item_x, w0).relu_()
        for k in range(1, len(self.mlp) // 2):
            b = params[f"mlp.{k}_bias"].unsqueeze(-2)
            x = torch.baddbmm(b, x, params[f"mlp.{k}_weight"]).relu_()
        width = x.shape[-1]
        x -= x.mean(-1, keepdim=True)
        r = (x.square().mean(-1) + RMS_EPS).rsqrt_()  # (T, N)
        cv = (x @ params["head.weight"]).squeeze(-1)  # (T, N): c @ v
        offset = gather_bias(params["item_bias"], items) + self.global_mean
        if self.has_factor_head:
            offset = offset + dot(self.item_factors(item_x), params["head.factor"])
        return cv.mul_(r).mul_(width**-0.5).add_(params["head.bias"]).add_(offset)

    def shares_item_side(self, params: Params) -> bool:
        """Whether every user sees the same item features: no user features, and the
        encoder and MLP not adapted (no task dim), so only the head and item biases are
        per user and ``predict_shared`` applies."""
        own = dict(self.named_parameters())
        return not self.use_user and all(
            params[k].dim() == own[k].dim() for k in own if k.startswith(("emb.", "mlp."))
        )

    @torch.no_grad()
    def predict_shared(
        self,
        params: Params,
        items: Tensor,
        side: tuple[Tensor, Tensor | None] | None = None,
        shift: Tensor | None = None,
    ) -> Tensor:
        """``forward`` for T tasks' fast weights when ``shares_item_side``: (T, N).

        The MLP runs once per catalogue item instead of once per (user, item) pair, and
        each user's head is one (I, H) x (H, 1) product: scoring a 20,000-item catalogue for
        256 users is then a matmul, not an MLP over 5 million rows. ``tests/test_meta.py``
        checks it against ``forward``.

        Args:
            params: full parameters; the head and item biases may carry a task dim T.
            items: (T, N) item indices.
            side: ``item_side`` of the whole catalogue under ``params``, computed earlier
                (the serving engine keeps it: the shared weights never change there).
            shift: as ``forward``'s.
        """
        if side is None:
            catalogue = torch.arange(self.item_genres.shape[0], device=items.device)
            side = call_with(self, params, "item_side", catalogue)
        z, q = side  # (I, H), (I, D) or None
        t, weight = items.shape[0], params["head.weight"]
        w = weight.expand(t, *weight.shape[-2:])  # (T, H, 1)
        offset = _offset(params["item_bias"], items, shift) + self.global_mean
        if items.numel() < z.shape[0]:  # few items a task: only theirs, gathered
            score = (take_rows(z, items) @ w).squeeze(-1) * z.shape[-1] ** -0.5  # (T, N)
            if q is not None:
                score = score + dot(take_rows(q, items), params["head.factor"])
            return score + params["head.bias"] + offset
        per_item = (w.squeeze(-1) @ z.T) * z.shape[-1] ** -0.5
        if q is not None:
            per_item = per_item + params["head.factor"].expand(t, -1) @ q.T  # (T, I)
        return per_item.gather(1, items) + params["head.bias"] + offset

    def item_side(self, items: Tensor) -> tuple[Tensor, Tensor | None]:
        """The unit-RMS features (N, H) and item factors (N, D) or None of ``items`` with
        no user in them (``shares_item_side``)."""
        item_x, _ = self.encode_parts(items, items[:1])
        q = self.item_factors(item_x) if self.has_factor_head else None
        return self.mlp.features(item_x), q

    def _with_task_dim(self, params: Params, tasks: int) -> Params:
        """MLP and head parameters with a leading task dim (a view where they are shared)."""
        own = dict(self.named_parameters())
        return {
            k: v.expand(tasks, *v.shape)
            if k.startswith(("mlp.", "head.")) and v.dim() == own[k].dim()
            else v
            for k, v in params.items()
        }

    def support_set(
        self,
        params: Params,
        items: Tensor,
        users: Tensor,
        ratings: Tensor,
        mask: Tensor,
        prior: float = 0.0,
    ) -> SupportSet:
        """What ``support_grads`` needs of a padded support set, computed once per adapt.

        ``params`` are the meta-parameters (not split; embeddings and item biases do not
        adapt on this path, so the inputs stay the same across inner steps). ``prior``: the
        loss is the squared-error sum over (n + prior) instead of n (``meta.support_prior``).
        """
        item_x, user_x = call_with(self, params, "encode_parts", items, users)
        offset = gather_bias(params["item_bias"], items) + self.global_mean
        m = mask.to(offset.dtype)
        return SupportSet(
            item_x=item_x,
            user_x=user_x,
            residual=(offset - ratings).unsqueeze(-1),
            weight=(2 * m / (m.sum(-1, keepdim=True) + prior).clamp_min(1.0)).unsqueeze(-1),
        )

    def support_grads(self, params: Params, names: list[str], support: SupportSet) -> list[Tensor]:
        """Hand-derived gradients of each task's masked support MSE w.r.t. ``names``.

        The same numbers as ``autograd.grad(masked_mse(...).sum(), fast)``, for the case the
        inner loop lives in (MLP and head adapt, inputs encoded once). It is differentiable
        itself, so second-order MAML backpropagates through it. Why by hand: the inner loop's
        time is mostly elementwise ops on (T, S, H) activations, not matmuls, and autograd's
        generic backward (recorded again with ``create_graph=True``) needs several times more
        of them. Here the unit-RMS backward is folded into three such ops (its mean terms are
        (T, S, 1) products of quantities the forward already has), normalized features are
        never materialized, and ReLU's derivative is one ``threshold_backward``.

        Args:
            params: the full parameter dict after ``split_input_weight``; ``names`` entries
                carry a task dim T.
            names: all of ``head.*`` and optionally all of ``mlp.*`` (see ``hand_grads_for``),
                with the split first-layer keys.
            support: ``support_set(...)`` of the tasks.
        Returns:
            Gradients in the order of ``names``.
        """
        item_x, user_x = support.item_x, support.user_x
        n_layers = len(self.mlp) // 2
        pre, acts = [], [item_x]  # pre-activations and layer inputs, for the backward
        for k in range(n_layers):
            bias = params[f"mlp.{k}_bias"].unsqueeze(-2)  # (T, 1, H)
            if k:
                a = affine(bias, acts[-1], params[f"mlp.{k}_weight"])
            elif user_x is None:
                a = affine(bias, item_x, params["mlp.0_weight"])
            else:  # the user block once per task, (T, 1, H), folded into the bias
                proj = params[W0_USER_PROJ] if W0_USER_PROJ in params else user_x @ params[W0_USER]
                a = affine(bias + proj, item_x, params[W0_ITEM])
            pre.append(a)
            acts.append(torch.relu(a))
        h = acts.pop()
        width = h.shape[-1]
        c = h - h.mean(-1, keepdim=True)  # (not var_mean: its backward is 5x slower here)
        r = ((c * c).mean(-1, keepdim=True) + RMS_EPS).rsqrt()  # (T, S, 1); z = c r
        v = params["head.weight"] * (1.0 / math.sqrt(width))  # (T, H, 1)
        cv = c @ v  # (T, S, 1); z v = r (c v)
        err = torch.addcmul(support.residual + params["head.bias"].unsqueeze(-1), r, cv)
        dpred = err * support.weight  # (T, S, 1): d loss / d prediction
        dr = dpred * r
        grads = {
            "head.weight": torch.baddbmm(v, c.transpose(-1, -2), dr, beta=0, alpha=width**-0.5),
            "head.bias": dpred.sum(-2),
        }
        if any(n.startswith("mlp.") for n in names):
            # Unit-RMS backward r (dz - mean dz - z mean(dz z)) with dz = dpred v^T:
            # mean(dz) = dpred mean(v), mean(dz z) = dpred r (c v) / H, and z = c r.
            vt = v.transpose(-1, -2)
            coef = dr * (r * r * cv) * (1.0 / width)  # (T, S, 1)
            da = torch.addcmul(dr * (vt - vt.mean(-1, keepdim=True)), c, coef, value=-1)
            for k in reversed(range(n_layers)):
                da = torch.ops.aten.threshold_backward(da, pre[k], 0)  # ReLU'
                grads[f"mlp.{k}_bias"] = da.sum(-2)
                if k:
                    grads[f"mlp.{k}_weight"] = acts[k].transpose(-1, -2) @ da
                    da = da @ params[f"mlp.{k}_weight"].transpose(-1, -2)
                elif user_x is None:
                    grads["mlp.0_weight"] = item_x.transpose(-1, -2) @ da
                else:
                    grads[W0_ITEM] = item_x.transpose(-1, -2) @ da
                    # One outer product per task for the user block, not one per rating.
                    grads[W0_USER_ROW] = da.sum(-2, keepdim=True)
                    if W0_USER in names:
                        grads[W0_USER] = user_x.transpose(-1, -2) * grads[W0_USER_ROW]
        return [grads[n] for n in names]

    def split_input_weight(self, params: Params) -> Params:
        """Replace ``mlp.0_weight`` by its item-input and user-input row blocks.

        ``support_grads`` takes and returns them split, so an inner loop that keeps them apart
        pays for no cat/split of the largest weight at every step; ``join_input_weight``
        undoes it once at the end.
        """
        if "mlp.0_weight" not in params or not self.use_user:
            return params
        out = dict(params)
        d = self.emb["genre"].shape[-1]
        fi = self.mlp["0_weight"].shape[0] - len(self.user_names) * d
        w = out.pop("mlp.0_weight")
        if isinstance(w, Tensor):
            out[W0_ITEM], out[W0_USER] = w.split([fi, w.shape[-2] - fi], dim=-2)
        else:  # a scalar step size
            out[W0_ITEM] = out[W0_USER] = w
        return out

    def join_input_weight(self, params: Params) -> Params:
        if W0_ITEM not in params:
            return params
        out = {n: p for n, p in params.items() if n not in (W0_ITEM, W0_USER)}
        out["mlp.0_weight"] = torch.cat([params[W0_ITEM], params[W0_USER]], -2)
        return out

    def hand_grads_for(self, names: list[str]) -> bool:
        """Whether ``support_grads`` covers adapting exactly ``names``."""
        if self.has_factor_head or self.has_neighbours:  # support_grads knows neither term
            return False
        head = {n for n, _ in self.named_parameters() if n.startswith("head.")}
        mlp = {n for n, _ in self.named_parameters() if n.startswith("mlp.")}
        return set(names) in (head, head | mlp)


NEIGHBOUR_SUPPORT = 256  # support items the neighbourhood term reads at most: the last ones


def _last_kept(items: Tensor, keep: Tensor, *more: Tensor) -> tuple[Tensor, ...]:
    """``items``, ``keep`` (T, S) and ``more`` cut to each task's last ``NEIGHBOUR_SUPPORT``
    kept entries when S is longer. The term costs S x k per task: a user with 8,000
    ratings would cost as much as 30 with 256, and a few hundred ratings already reach
    most of what k neighbours each can."""
    if items.shape[1] <= NEIGHBOUR_SUPPORT:
        return (items, keep, *more)
    later = keep.flip(1).cumsum(1).flip(1)  # kept entries at or after each position
    keep = keep & (later <= NEIGHBOUR_SUPPORT)
    order = keep.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    order = order[:, :NEIGHBOUR_SUPPORT]
    return tuple(x.gather(1, order) for x in (items, keep, *more))


def _offset(bias: Tensor, items: Tensor, shift: Tensor | None) -> Tensor:
    """The biases of ``items``, plus ``shift`` where given: in this order, so that a shift
    equals folding it into per-user biases first, to the last bit."""
    own = gather_bias(bias, items)
    return own if shift is None else own + shift


def _unit_scale(norm: Tensor, mean: Tensor, n: int) -> Tensor:
    """1 / the standard deviation over n values with this L2 norm and mean (1e12 when
    they are all equal: a task without positives scores 0)."""
    var = (norm.square() - n * mean.square()) / (n - 1)
    return var.clamp_min(0.0).sqrt().clamp_min(1e-12).reciprocal()


def sparse_lookup(reached: Tensor, scores: Tensor, rest: Tensor, items: Tensor) -> Tensor:
    """(T, N) scores of ``items`` (T, N) under ``sparse_neighbour_scores``'s (reached,
    scores, rest): a reached item's own score, any other's ``rest``."""
    at = torch.searchsorted(reached, items.contiguous()).clamp_max(reached.shape[1] - 1)
    hit = reached.gather(1, at) == items
    return torch.where(hit, scores.gather(1, at), rest[:, None])
