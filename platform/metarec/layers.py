"""The network's building blocks, as plain functions of tensors (``metarec.model`` composes
them; the hand-derived gradients there rely on exactly these definitions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["affine", "bag", "dot", "gather_bias", "init_emb", "init_linear", "lookup", "unit_rms"]

RMS_EPS = 1e-5  # unit-RMS epsilon (hidden() and support_grads() must agree)


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


def gather_bias(bias: Tensor, items: Tensor) -> Tensor:
    if bias.dim() == 1:
        return torch.nn.functional.embedding(items, bias.unsqueeze(-1)).squeeze(-1)
    return torch.gather(bias, 1, items.reshape(items.shape[0], -1)).reshape(items.shape)
