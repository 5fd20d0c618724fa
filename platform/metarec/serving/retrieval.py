"""Candidate retrieval for catalogues too large for the network to score per request.

A served user's score of item i is, to first order, an inner product: the head's adapted
weights [w_u; p_u] against the item's head inputs [z_i; q_i] (``Recommender.head_inputs``),
plus the item's offset (μ + b_i) and, on implicit models, a per-user item-bias term (the
neighbourhood scores the ridge head folds in). Without user features and with only the head
adapted the inner product *is* the score; otherwise the item side is taken for a user whose
features are unknown, and the re-ranking stage corrects it. So each item gets one vector
[z_i; q_i; μ + b_i] and each user one query [w_u; p_u; 1], and retrieval is a maximum inner
product search:

* ``exact``: a blocked matmul top-n over the catalogue (at most ``max_scores`` scores at a
  time, so memory is bounded), the per-user bias term added block by block. Exact for the
  inner product; the item vectors are stored transposed (F, I), which the matmul streams
  fastest, and it is memory-bound: every request batch reads all of them.
* ``ann``: a FAISS IVF index (inner-product metric, sqrt(I) lists, k-means on 64 points a
  list) built once at load; ``nprobe`` lists searched per query. The per-user bias term
  cannot live in a shared index, so the items where it can be large are added to the
  ANN's n before re-ranking: each user's n largest, or (``also``) the items the engine
  knows carry it (an implicit model's: the support's graph neighbours).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["Retriever"]


class Retriever:
    """Top-n candidates by inner product over fixed item vectors.

    Args:
        vectors: (I, F) item vectors.
        kind: ``exact`` (blocked matmul) or ``ann`` (FAISS IVF, inner product).
        nprobe: IVF lists searched per query (``ann``).
        max_scores: (users x items) scores per block of the exact search.
        seed: the IVF's k-means seed (the index is a function of the model alone).
    """

    def __init__(
        self,
        vectors: Tensor,
        *,
        kind: Literal["exact", "ann"] = "exact",
        nprobe: int = 32,
        max_scores: int = 1 << 24,
        seed: int = 0,
    ) -> None:
        self.n_items = vectors.shape[0]
        self.max_scores = max_scores
        self.index, self.columns = None, None
        if kind == "ann":
            self.index = _ivf_index(vectors.float().contiguous().numpy(), nprobe, seed)
        else:
            self.columns = vectors.float().T.contiguous()  # (F, I)

    def __len__(self) -> int:
        return self.n_items

    def search(
        self,
        queries: Tensor,
        n: int,
        extra: Tensor | None = None,
        also: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B, M) candidate item indices, M >= min(n, I), and (B, M) which of them count
        (a row's repeats and FAISS's empty slots do not; their index is a valid item, 0).

        Args:
            queries: (B, F) user queries.
            extra: (B, I) per-user additive term of the score (None: zero).
            also: (B, K) items to add to the candidates whatever their score (-1: none).
        """
        n = min(n, len(self))
        queries = queries.float()
        if self.index is None:
            found = self._exact(queries, n, extra)
            if also is None:
                return found, torch.ones_like(found, dtype=torch.bool)
        else:
            _, ids = self.index.search(np.ascontiguousarray(queries.numpy()), n)
            found = torch.from_numpy(ids)
            if extra is not None:  # the per-user term's best: an index cannot hold it
                found = torch.cat([found, extra.topk(n, dim=1).indices], 1)
        return _unique_rows(found if also is None else torch.cat([found, also], 1))

    def _exact(self, queries: Tensor, n: int, extra: Tensor | None) -> Tensor:
        assert self.columns is not None
        best_s = torch.full((queries.shape[0], 0), -math.inf)
        best_i = torch.zeros(queries.shape[0], 0, dtype=torch.long)
        block = max(n, self.max_scores // queries.shape[0])
        for lo in range(0, len(self), block):
            hi = min(lo + block, len(self))
            s = queries @ self.columns[:, lo:hi]
            if extra is not None:
                s += extra[:, lo:hi]
            top = s.topk(min(n, hi - lo), dim=1)
            best_s = torch.cat([best_s, top.values], 1)
            best_i = torch.cat([best_i, top.indices + lo], 1)
            keep = best_s.topk(min(n, best_s.shape[1]), dim=1).indices
            best_s, best_i = best_s.gather(1, keep), best_i.gather(1, keep)
        return best_i


def _ivf_index(vectors: np.ndarray, nprobe: int, seed: int) -> Any:
    """An IVF-Flat index, inner product, sqrt(I) lists: a million items load in seconds
    (4 sqrt(I) lists trained on the whole catalogue took minutes on 2 cores)."""
    import faiss

    n, dim = vectors.shape
    lists = max(1, min(int(math.sqrt(n)), n // 39))  # k-means wants >= 39 points a list
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = vectors
    if n > 64 * lists:  # k-means on a sample
        rows = np.random.default_rng(seed).choice(n, 64 * lists, replace=False)
        sample = vectors[np.sort(rows)]
    index.train(sample)
    index.add(vectors)
    index.nprobe = min(nprobe, lists)
    return index


def _unique_rows(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's ids sorted, and which are its first occurrence of a real item (FAISS
    pads with -1); the others become item 0, flagged False."""
    ids, _ = ids.sort(dim=1)
    valid = ids >= 0
    valid[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    return torch.where(valid, ids, 0), valid
