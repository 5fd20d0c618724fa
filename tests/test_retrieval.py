"""The retrieval stage on its own: the exact search is a brute-force top-n, block by block,
per-user term included; an IVF index that probes every list finds the same items; and a
row's repeats and FAISS's empty slots never count twice."""

from __future__ import annotations

import torch

from metarec.serving.retrieval import Retriever, _unique_rows


def _data(n_items=1000, dim=8, users=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n_items, dim, generator=g), torch.randn(users, dim, generator=g)


def test_exact_search_is_a_brute_force_top_n_over_blocks():
    vectors, queries = _data()
    extra = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    for term in (None, extra):
        found, valid = Retriever(vectors, max_scores=4 * 64).search(queries, 25, term)
        full = queries @ vectors.T + (0 if term is None else term)
        assert valid.all()
        assert found.tolist() == full.topk(25).indices.tolist()


def test_an_ivf_index_probing_every_list_finds_the_exact_top_n():
    vectors, queries = _data()
    found, valid = Retriever(vectors, kind="ann", nprobe=10**6).search(queries, 25)
    exact = (queries @ vectors.T).topk(25).indices
    assert valid.all()
    for row in range(4):
        assert set(found[row].tolist()) == set(exact[row].tolist())


def test_repeats_and_empty_slots_do_not_count():
    ids, valid = _unique_rows(torch.tensor([[5, -1, 3, 5, 3], [2, 1, 0, -1, -1]]))
    assert [sorted(set(r[v].tolist())) for r, v in zip(ids, valid, strict=True)] == [
        [3, 5],
        [0, 1, 2],
    ]
    assert valid.sum().item() == 5 and (ids >= 0).all()
