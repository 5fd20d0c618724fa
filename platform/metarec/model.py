"""The recommender network: MeLU-style feature embeddings + MLP + an adaptable head.

Prediction for user ``u`` and item ``i``::

    r̂ = μ + b_i + head(MLP([genres_i, year_i, id_i, features_u]))

The item bias and item-side embeddings carry what all users agree on; the MLP and head are
what adapts to one user (``adapt``: ``head`` | ``mlp`` | ``all``). Every weight is used as
``x @ W`` with ``W`` of shape (..., in, out), so the *same* forward runs for one task with
plain parameters (the per-task reference in tests) and for T tasks at once with fast weights
carrying a leading task dimension (the vectorized inner loop): no Python loop over tasks.

Reference: H. Lee et al., MeLU: Meta-Learned User Preference Estimator for Cold-Start
Recommendation, KDD 2019, https://arxiv.org/abs/1908.00413
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from metarec.data.prepared import PreparedDataset

__all__ = ["ADAPT_GROUPS", "Params", "Recommender", "dataset_features"]

Params = dict[str, Tensor]
USER_FEATURES = ("age_bucket", "gender", "occupation", "zip_prefix")
# Which parameters adapt per user, by the `meta.adapt` setting (prefix match on names).
ADAPT_GROUPS = {
    "head": ("head.",),
    "mlp": ("mlp.", "head."),
    "all": ("mlp.", "head.", "emb.", "item_bias"),
}


@dataclass(frozen=True)
class Features:
    """Integer-encoded side tables of one prepared dataset (see ``data.features``)."""

    item_genres: Tensor  # (I, G) float multi-hot, rows normalised to sum 1 (mean of the bag)
    item_year: Tensor  # (I,) long year bucket, 0 = unknown
    item_seen: Tensor  # (I,) bool: rated in training, so its id embedding means something
    user_table: Tensor | None  # (U, 4) long user features, None when the dataset has none
    vocab_sizes: dict[str, int]


def dataset_features(ds: PreparedDataset, *, seen_items: Tensor | None = None) -> Features:
    """Build ``Features`` from a prepared dataset (kept here so the model owns its inputs)."""
    items = ds.items()
    sizes = dict(ds.manifest["vocab_sizes"])
    n_items = items.num_rows
    genres = items.column("genres").combine_chunks()  # list<int16>, one list per item
    lengths = torch.from_numpy(np.diff(genres.offsets.to_numpy()).astype(np.int64))
    rows = torch.repeat_interleave(torch.arange(n_items), lengths)
    cols = torch.from_numpy(genres.flatten().to_numpy().astype(np.int64))
    multi_hot = torch.zeros(n_items, sizes["genre"])
    multi_hot[rows, cols] = 1.0
    multi_hot /= multi_hot.sum(1, keepdim=True).clamp_min(1.0)
    user_table = None
    if ds.manifest["features"]["has_user_features"]:
        users = ds.users()
        user_table = torch.stack(
            [torch.as_tensor(users.column(c).to_numpy().astype("int64")) for c in USER_FEATURES], 1
        )
    return Features(
        item_genres=multi_hot,
        item_year=torch.as_tensor(items.column("year_bucket").to_numpy().astype("int64")),
        item_seen=seen_items if seen_items is not None else torch.ones(n_items, dtype=torch.bool),
        user_table=user_table,
        vocab_sizes=sizes,
    )


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
    ) -> None:
        super().__init__()
        d = embedding_dim
        n_items = features.item_genres.shape[0]
        self.register_buffer("item_genres", features.item_genres)
        self.register_buffer("item_year", features.item_year)
        # Item-id rows: 0 = unseen item (kept at zero), i + 1 = item i.
        id_index = torch.where(features.item_seen, torch.arange(1, n_items + 1), 0)
        self.register_buffer("item_id_index", id_index)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        self.use_user = use_user_features and features.user_table is not None
        if self.use_user:
            self.register_buffer("user_table", features.user_table)
        self.item_id_embedding = item_id_embedding
        emb = {
            "genre": _init_emb(features.vocab_sizes["genre"], d),
            "year": _init_emb(features.vocab_sizes["year_bucket"], d),
        }
        if item_id_embedding:
            table = _init_emb(n_items + 1, d)
            with torch.no_grad():
                table[0].zero_()
            emb["item"] = table
        if self.use_user:
            for name in USER_FEATURES:
                emb[name] = _init_emb(features.vocab_sizes[name], d)
        self.emb = nn.ParameterDict(emb)
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        widths = [d * (2 + item_id_embedding + 4 * self.use_user), *hidden]
        self.mlp = nn.ParameterDict()
        for k, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            self.mlp[f"{k}_weight"] = _init_linear(fan_in, fan_out)
            self.mlp[f"{k}_bias"] = nn.Parameter(torch.zeros(fan_out))
        self.head = nn.ParameterDict(
            {"weight": _init_linear(widths[-1], 1), "bias": nn.Parameter(torch.zeros(1))}
        )

    def forward(
        self,
        items: Tensor,
        users: Tensor,
        *,
        encoded: Tensor | None = None,
        encode_only: bool = False,
        head_inputs: bool = False,
    ):
        """Predicted ratings.

        Args:
            items: (..., N) long item indices; users: (...,) long user indices.
            With fast weights of a leading task dim T, ``...`` must be (T,).
            encoded: ``encode(items, users)`` computed earlier: the inner loop encodes once
                when no embedding adapts, instead of at every step.
            encode_only: return ``encode(items, users)`` (..., N, F).
            head_inputs: return ``(h, offset)`` instead, where the prediction is
                ``h @ head.weight + head.bias + offset``: what a closed-form head solver needs.
        Returns:
            (..., N) predicted ratings.
        """
        x = self.encode(items, users) if encoded is None else encoded  # (..., N, F)
        if encode_only:
            return x
        z = self.hidden(x)  # (..., N, H), zero mean and unit RMS per row
        offset = _gather_bias(self.item_bias, items) + self.global_mean  # (..., N)
        scale = 1.0 / math.sqrt(z.shape[-1])  # |z| / sqrt(H) = 1: see hidden()
        if head_inputs:
            return z * scale, offset
        # Scaling the (..., N) output rather than the (..., N, H) features: same math,
        # fewer elementwise ops in every backward and double backward.
        return (z @ self.head["weight"]).squeeze(-1) * scale + self.head["bias"] + offset

    def encode(self, items: Tensor, users: Tensor) -> Tensor:
        """Input features of (user, item) pairs: (..., N, F)."""
        parts = [
            _bag(self.emb["genre"], self.item_genres[items]),  # (..., N, D)
            _lookup(self.emb["year"], self.item_year[items]),
        ]
        if self.item_id_embedding:
            parts.append(_lookup(self.emb["item"], self.item_id_index[items]))
        if self.use_user:
            feats = self.user_table[users]  # (..., 4)
            user = torch.cat(
                [_lookup(self.emb[n], feats[..., k : k + 1]) for k, n in enumerate(USER_FEATURES)],
                -1,
            )  # (..., 1, 4D)
            parts.append(user.expand(*items.shape, user.shape[-1]))
        return torch.cat(parts, -1)

    def hidden(self, x: Tensor) -> Tensor:
        """MLP on encoded inputs: (..., N, F) -> unit-RMS features (..., N, H)."""
        n_layers = len(self.mlp) // 2
        for k in range(n_layers):
            x = torch.relu(x @ self.mlp[f"{k}_weight"] + self.mlp[f"{k}_bias"].unsqueeze(-2))
        # Unit-norm features into the head (z / sqrt(H), applied in forward) bound the
        # curvature of the inner loss (its Hessian in the head is h h^T, |h|^2 = 1), so one
        # inner_lr stays stable however the representation grows during meta-training.
        return _unit_rms(x)


def _unit_rms(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer norm without affine (zero mean, unit RMS per row): (..., H) -> (..., H).

    Written with elementary ops rather than F.layer_norm, whose third derivative is wrong in
    torch 2.13 (gradgradcheck of the MAML meta-gradient fails with it; see tests/test_meta).
    """
    x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def _init_emb(n: int, d: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, d) * 0.1)


def _init_linear(fan_in: int, fan_out: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(fan_in, fan_out).uniform_(-bound, bound) * math.sqrt(3))


def _lookup(table: Tensor, idx: Tensor) -> Tensor:
    """Embedding rows; ``table`` is (V, D) shared or (T, V, D) per task with idx (T, ...)."""
    if table.dim() == 2:  # F.embedding: its CPU backward is deterministic, indexing's is not
        return torch.nn.functional.embedding(idx, table)
    flat = idx.reshape(idx.shape[0], -1)  # (T, M)
    rows = torch.gather(table, 1, flat.unsqueeze(-1).expand(-1, -1, table.shape[-1]))
    return rows.reshape(*idx.shape, table.shape[-1])


def _bag(table: Tensor, weights: Tensor) -> Tensor:
    """Mean embedding of a multi-hot bag: weights (..., N, G) @ table ((T,) G, D)."""
    return weights @ table


def _gather_bias(bias: Tensor, items: Tensor) -> Tensor:
    if bias.dim() == 1:
        return torch.nn.functional.embedding(items, bias.unsqueeze(-1)).squeeze(-1)
    return torch.gather(bias, 1, items.reshape(items.shape[0], -1)).reshape(items.shape)
