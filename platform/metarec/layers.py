"""The network's building blocks, as plain functions of tensors (``metarec.model`` composes
them; the hand-derived gradients there rely on exactly these definitions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "MLP",
    "FeatureEncoder",
    "Head",
    "affine",
    "bag",
    "dot",
    "gather_bias",
    "init_emb",
    "init_linear",
    "lookup",
    "take_rows",
    "unit_rms",
]

RMS_EPS = 1e-5  # unit-RMS epsilon (MLP.features and support_grads must agree)


def affine(bias: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """bias + x @ weight for x (T, N, F); one fused op when the weight has a task dim."""
    if weight.dim() == 3:
        return torch.baddbmm(bias, x, weight)
    return x @ weight + bias


def unit_rms(x: Tensor, eps: float = RMS_EPS) -> Tensor:
    """Layer norm without affine (zero mean, unit RMS per row): (..., H) -> (..., H).

    Written with elementary ops rather than F.layer_norm, whose third derivative is wrong in
    torch 2.13 (gradgradcheck of the MAML meta-gradient fails with it; see tests/test_meta).
    """
    x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def init_emb(n: int, d: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, d) * 0.1)


def init_linear(fan_in: int, fan_out: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(fan_in, fan_out).uniform_(-bound, bound) * math.sqrt(3))


def lookup(table: Tensor, idx: Tensor) -> Tensor:
    """Embedding rows; ``table`` is (V, D) shared or (T, V, D) per task with idx (T, ...)."""
    if table.dim() == 2:  # F.embedding: its CPU backward is deterministic, indexing's is not
        return torch.nn.functional.embedding(idx, table)
    flat = idx.reshape(idx.shape[0], -1)  # (T, M)
    rows = torch.gather(table, 1, flat.unsqueeze(-1).expand(-1, -1, table.shape[-1]))
    return rows.reshape(*idx.shape, table.shape[-1])


def bag(table: Tensor, weights: Tensor) -> Tensor:
    """Mean embedding of a multi-hot bag: weights (..., N, G) @ table ((T,) G, D)."""
    return weights @ table


def dot(q: Tensor, p: Tensor) -> Tensor:
    """q (..., N, D) · p, with p (D,) shared or (T, D) per task: (..., N)."""
    return (q @ p.unsqueeze(-1)).squeeze(-1)


def take_rows(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` (index of any shape) by ``index_select``: on CPU several times
    faster than advanced indexing with a 2-D index, and gathering candidate rows of a large
    catalogue is most of serving's scoring."""
    return table.index_select(0, index.flatten()).view(*index.shape, *table.shape[1:])


def gather_bias(bias: Tensor, items: Tensor) -> Tensor:
    if bias.dim() == 1:
        return torch.nn.functional.embedding(items, bias.unsqueeze(-1)).squeeze(-1)
    return torch.gather(bias, 1, items.reshape(items.shape[0], -1)).reshape(items.shape)


class FeatureEncoder(nn.ParameterDict):
    """The embedding tables (``genre``, ``year``, ``item`` ids, one per user feature) and
    how gathered codes become the MLP's item-side and user-side inputs."""

    def __init__(
        self,
        vocab_sizes: dict[str, int],
        dim: int,
        n_items: int,
        *,
        item_ids: bool,
        user_names: tuple[str, ...],
    ) -> None:
        tables = {"genre": init_emb(vocab_sizes["genre"], dim)}
        tables["year"] = init_emb(vocab_sizes["year_bucket"], dim)
        if item_ids:  # row 0: every item unseen in training (kept at zero), i + 1: item i
            tables["item"] = init_emb(n_items + 1, dim)
            with torch.no_grad():
                tables["item"][0].zero_()
        for name in user_names:
            tables[name] = init_emb(vocab_sizes[name], dim)
        super().__init__(tables)
        self.user_names = user_names

    def encode_items(self, genres: Tensor, years: Tensor, id_rows: Tensor | None) -> Tensor:
        """(..., N, G) genre bags, (..., N) year buckets and item-id rows -> (..., N, Fi)."""
        parts = [bag(self["genre"], genres), lookup(self["year"], years)]
        if id_rows is not None:
            parts.append(lookup(self["item"], id_rows))
        return torch.cat(parts, -1)

    def encode_users(self, codes: Tensor) -> Tensor:
        """(..., F) user feature codes -> (..., 1, F D)."""
        names = enumerate(self.user_names)
        return torch.cat([lookup(self[n], codes[..., k : k + 1]) for k, n in names], -1)


class MLP(nn.ParameterDict):
    """``{k}_weight``/``{k}_bias`` layers with ReLU, then unit-RMS features (the reference
    path; ``Recommender.predict_encoded`` and ``support_grads`` are its fast paths). Like
    every ``ParameterDict`` it is not callable: ``features`` is its forward."""

    def __init__(self, widths: list[int]) -> None:
        layers: dict[str, nn.Parameter] = {}
        for k in range(len(widths) - 1):
            layers[f"{k}_weight"] = init_linear(widths[k], widths[k + 1])
            layers[f"{k}_bias"] = nn.Parameter(torch.zeros(widths[k + 1]))
        super().__init__(layers)

    def features(self, item_x: Tensor, user_x: Tensor | None = None) -> Tensor:
        """Encoded inputs -> unit-RMS features (..., N, H)."""
        w0 = self["0_weight"]
        if user_x is None:
            x = item_x @ w0
        else:  # split (not slicing: its backward is one cat, not zero-fill + copy per part)
            w_item, w_user = w0.split([item_x.shape[-1], user_x.shape[-1]], dim=-2)
            x = item_x @ w_item + user_x @ w_user  # (..., 1, H) broadcast over the N rows
        x = torch.relu(x + self["0_bias"].unsqueeze(-2))
        for k in range(1, len(self) // 2):
            x = torch.relu(x @ self[f"{k}_weight"] + self[f"{k}_bias"].unsqueeze(-2))
        # Unit-norm features into the head (z / sqrt(H), applied by the head) bound the
        # curvature of the inner loss (its Hessian in the head is h h^T, |h|^2 = 1), so one
        # inner_lr stays stable however the representation grows during meta-training.
        return unit_rms(x)


class Head(nn.ParameterDict):
    """The per-user linear head: ``weight``, ``bias`` and, as a factor head, ``factor`` (p_u
    of MF, multiplying the item's id embedding q_i), and with a neighbour graph
    ``neighbour``: the weight of the support's item-KNN scores. That term is not in
    ``predict``: the ridge solver fits it per user and folds weight x scores into the user's
    item biases (``meta.ridge_head``), where every scoring path already reads them."""

    def __init__(self, width: int, factor_dim: int | None = None, neighbour: bool = False) -> None:
        head = {"weight": init_linear(width, 1), "bias": nn.Parameter(torch.zeros(1))}
        if factor_dim is not None:
            # The MF part starts as MF fold-in's prior (p_u = 0) and the MLP part at zero,
            # so the initial model is exactly MF fold-in; meta-training moves it from there.
            head["weight"] = nn.Parameter(torch.zeros(width, 1))
            head["factor"] = nn.Parameter(torch.zeros(factor_dim))
        if neighbour:  # one standard deviation of item-KNN score is worth one logit
            head["neighbour"] = nn.Parameter(torch.ones(1))
        super().__init__(head)

    def predict(self, z: Tensor, q: Tensor | None, offset: Tensor) -> Tensor:
        """Features z (..., N, H), item factors q (..., N, D) and offsets (..., N) -> ratings."""
        # Scaling the (..., N) output rather than the (..., N, H) features: same math,
        # fewer elementwise ops in every backward and double backward.
        out = (z @ self["weight"]).squeeze(-1) * (1.0 / math.sqrt(z.shape[-1]))
        out = out + self["bias"] + offset
        if "factor" in self:
            out = out + dot(q, self["factor"])
        return out
