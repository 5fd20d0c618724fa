"""Negative sampling for implicit tasks: never a positive, distinct, mixed by popularity."""

import torch

from metarec.negatives import draw_candidates, keep_negatives


def sample_negatives(positives, mask, n_items, count, **kw):
    """Draw, then reject: what training does for a meta-batch."""
    return keep_negatives(
        draw_candidates(len(positives), n_items, count, **kw), positives, mask, count
    )


def _tasks(seed=0, t=64, n_items=300, longest=40):
    g = torch.Generator().manual_seed(seed)
    positives = torch.randint(0, n_items, (t, longest), generator=g)
    mask = torch.arange(longest)[None, :] < torch.randint(1, longest + 1, (t, 1), generator=g)
    return positives, mask, n_items


def test_negatives_are_distinct_and_never_a_positive_of_their_task():
    for seed in range(5):
        positives, mask, n = _tasks(seed)
        pop = torch.rand(n) ** 4
        items, ok = sample_negatives(
            positives, mask, n, 50, popularity=pop, generator=torch.Generator().manual_seed(seed)
        )
        assert items.shape == ok.shape == (64, 50) and bool(ok.all())
        for row in range(64):
            own = set(positives[row][mask[row]].tolist())
            drawn = items[row].tolist()
            assert not own & set(drawn) and len(set(drawn)) == len(drawn)


def test_popular_share_draws_popular_items_more_often():
    positives, mask, n = _tasks()
    pop = torch.zeros(n)
    pop[:10] = 1.0  # ten popular items
    share = {}
    for s in (0.0, 0.8):
        items, ok = sample_negatives(
            positives,
            mask,
            n,
            20,
            popularity=pop,
            popular_share=s,
            generator=torch.Generator().manual_seed(1),
        )
        share[s] = float((items[ok] < 10).double().mean())
    assert share[0.0] < 0.1 < 0.25 < share[0.8]


def test_a_tiny_catalogue_masks_what_cannot_be_drawn_and_seeds_repeat():
    positives = torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    items, ok = sample_negatives(positives, mask, 6, 4, generator=torch.Generator().manual_seed(0))
    assert set(items[0][ok[0]].tolist()) <= {4, 5} and int(ok[0].sum()) <= 2
    assert not (items[1][ok[1]] == 0).any()
    again, _ = sample_negatives(positives, mask, 6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(items, again)


def test_tasks_without_any_positive_keep_every_candidate():
    """A cold-start task (a support cut to nothing) has a zero-width positives tensor."""
    cand = torch.tensor([[3, 1, 3, 2], [0, 0, 4, 1]])
    none = torch.zeros(2, 0, dtype=torch.long)
    items, ok = keep_negatives(cand, none, none.bool(), 3)
    assert items.tolist() == [[3, 1, 2], [0, 4, 1]] and ok.all()
