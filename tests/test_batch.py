"""Padded task tensors: built without loops, resampled without losing ratings."""

from dataclasses import fields

import pyarrow as pa
import pytest
import torch

from metarec.batch import TaskBatch, bucketed_batches, from_table
from metarec.data.tasks import TASK_SCHEMA


def small_table():
    return pa.Table.from_pylist(
        [
            {
                "user": 4,
                "support_items": [1, 2, 3],
                "support_ratings": [5.0, 4.0, 3.0],
                "query_items": [7],
                "query_ratings": [1.0],
            },
            {
                "user": 9,
                "support_items": [8],
                "support_ratings": [2.0],
                "query_items": [5, 6],
                "query_ratings": [3.0, 4.0],
            },
        ],
        schema=TASK_SCHEMA,
    )


def test_from_table_pads_and_masks():
    b = from_table(small_table())
    assert b.users.tolist() == [4, 9]
    assert b.support_items.tolist() == [[1, 2, 3], [8, 0, 0]]
    assert b.support_mask.tolist() == [[True, True, True], [True, False, False]]
    assert b.query_ratings.tolist() == [[1.0, 0.0], [3.0, 4.0]]
    sub = b.select(torch.tensor([1]))
    assert sub.support_items.shape == (1, 1) and sub.query_items.shape == (1, 2)


def test_resampled_keeps_every_rating_and_the_query_size():
    b = from_table(small_table())
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        r = b.resampled(1, torch.rand(2, 8, generator=g))
        assert r.query_mask.sum(1).tolist() == [1, 1]
        for t in range(2):
            before = sorted(
                zip(
                    *(
                        x[t][m[t]].tolist()
                        for x, m in ((b.merged()[0], b.merged()[2]), (b.merged()[1], b.merged()[2]))
                    ),
                    strict=True,
                )
            )
            items, ratings, mask = r.merged()
            after = sorted(
                zip(items[t][mask[t]].tolist(), ratings[t][mask[t]].tolist(), strict=True)
            )
            assert before == after


def test_a_task_resamples_the_same_way_whatever_batch_it_is_padded_in():
    b = from_table(small_table())
    keys = torch.rand(2, 8, generator=torch.Generator().manual_seed(3))
    together = b.resampled(1, keys)
    alone = b.select(torch.tensor([1])).resampled(1, keys[1:])
    assert together.query_items[1:].tolist() == alone.query_items.tolist()
    s = alone.support_mask.shape[1]
    assert together.support_items[1:, :s].tolist() == alone.support_items.tolist()


def test_bucketed_batches_cover_every_task_once_with_similar_lengths():
    lengths = torch.randint(3, 100, (1000,), generator=torch.Generator().manual_seed(0))
    batches = bucketed_batches(lengths, 32, torch.Generator().manual_seed(1))
    flat = torch.cat(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    spread = torch.tensor([float(lengths[b].max() - lengths[b].min()) for b in batches])
    assert spread.mean() < 0.5 * (lengths.max() - lengths.min())  # far less padding than random


def test_shortened_keeps_the_first_fraction_of_each_support():
    b = from_table(small_table())
    cut = b.shortened(torch.tensor([0.7, 0.0]))
    assert cut.support_mask.tolist() == [[True, True, False], [False, False, False]]
    assert torch.equal(cut.query_mask, b.query_mask)  # queries untouched
    assert torch.equal(b.shortened(torch.ones(2)).support_mask, b.support_mask)


def test_cut_support_keeps_the_first_n_and_moves_the_rest_packed_to_the_query():
    """Padded tasks of mixed sizes: after the cut and any ``select``, each task's support
    is its first n items and its query its own plus the rest of its support (target 0),
    with no entry lost to trimming (masks stay left-packed)."""
    g = torch.Generator().manual_seed(0)
    s_len, q_len = [7, 2, 5, 0], [3, 1, 2, 2]
    s_mask = torch.arange(7)[None] < torch.tensor(s_len)[:, None]
    q_mask = torch.arange(3)[None] < torch.tensor(q_len)[:, None]
    tasks = TaskBatch(
        users=torch.arange(4),
        support_items=torch.randint(0, 100, (4, 7), generator=g),
        support_ratings=torch.rand(4, 7, generator=g) + 1,
        support_mask=s_mask,
        query_items=torch.randint(100, 200, (4, 3), generator=g),
        query_ratings=torch.rand(4, 3, generator=g) + 1,
        query_mask=q_mask,
    )
    cut = tasks.cut_support(3)
    for index in (torch.arange(4), torch.tensor([2, 0]), torch.tensor([1])):
        sub = cut.select(index)
        for row, t in enumerate(index.tolist()):
            support = tasks.support_items[t, s_mask[t]].tolist()
            assert sub.support_items[row, sub.support_mask[row]].tolist() == support[:3]
            q = sub.query_mask[row]
            asked = q & (sub.query_ratings[row] > 0)
            assert sub.query_items[row, asked].tolist() == tasks.query_items[t, q_mask[t]].tolist()
            assert sorted(sub.query_items[row, q & ~asked].tolist()) == sorted(support[3:])


def test_ragged_tasks_cut_the_same_batches_as_the_padded_split(synthetic_prepared):
    """The flat store holds a split in its ratings' memory and cuts exactly the padded
    batches ``TaskBatch.select`` cuts, and the same flat (row, item, rating) list."""
    from metarec.batch import ragged_from_table

    table = synthetic_prepared.tasks("user_cold", "train")
    padded, ragged = from_table(table), ragged_from_table(table)
    assert ragged.items.numel() == int(padded.support_mask.sum() + padded.query_mask.sum())
    for rows in (torch.tensor([5, 0, 17, 3]), torch.arange(padded.num_tasks)):
        a, b = padded.select(rows), ragged.select(rows)
        for f in fields(a):
            assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    for support_only in (False, True):
        for x, y in zip(
            padded.flat(support_only=support_only),
            ragged.flat(support_only=support_only),
            strict=True,
        ):
            assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(padded.lengths(), ragged.lengths(), strict=True))
    rows = torch.tensor([9, 2, 40])  # a flat sample cuts what the padded one does
    taken = ragged.take(rows)
    assert taken.num_tasks == 3 and taken.items.numel() == int(
        padded.select(rows).support_mask.sum() + padded.select(rows).query_mask.sum()
    )
    a, b = padded.select(rows), taken.select(torch.arange(3))
    assert all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def test_a_window_keeps_at_most_n_support_ratings_and_all_of_a_short_support():
    tasks = TaskBatch(
        torch.arange(2),
        torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]),
        torch.ones(2, 4),
        torch.tensor([[True] * 4, [True, True, False, False]]),
        torch.tensor([[7], [8]]),
        torch.ones(2, 1),
        torch.ones(2, 1, dtype=torch.bool),
    )
    cut = tasks.windowed(3)
    assert cut.support_items.tolist() == [[1, 2, 3], [5, 6, 0]]
    assert cut.support_mask.sum(1).tolist() == [3, 2]
    assert tasks.windowed(4) is tasks


@pytest.mark.parametrize("copy_rows", [4096, 7])
def test_a_share_of_blocks_is_written_flat_as_the_concatenated_sorted_table(
    synthetic_prepared, monkeypatch, copy_rows
):
    """``ragged_from_blocks`` (a Ray worker's read: its users' tasks out of many blocks, in
    user-id order) equals filtering, concatenating and sorting the table first, then
    flattening it; without users or sorting it is the table as it comes. Copied a few
    tasks at a time (``COPY_ROWS``), blocks larger than a slice come out the same."""
    import itertools

    import numpy as np

    from metarec import batch
    from metarec.batch import ragged_from_blocks, ragged_from_table

    monkeypatch.setattr(batch, "COPY_ROWS", copy_rows)

    table = synthetic_prepared.tasks("user_cold", "train")
    order = np.random.default_rng(0).permutation(table.num_rows)
    shuffled = table.take(pa.array(order))  # blocks hold users in no particular order
    cuts = [0, 1, 1, 57, 200, shuffled.num_rows]  # an empty block and a one-row block
    blocks = [shuffled.slice(a, b - a) for a, b in itertools.pairwise(cuts)]
    users = shuffled.column("user").to_numpy()
    mine = np.sort(users)[1::3]
    expected = shuffled.filter(pa.array(np.isin(users, mine)))
    expected = expected.take(pa.array(np.argsort(expected.column("user").to_numpy())))

    def same(a, b):
        return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))

    got = ragged_from_blocks(blocks, mine, by_user=True)
    assert got.num_tasks == len(mine) and same(got, ragged_from_table(expected))
    assert same(got.select(torch.arange(len(mine))), from_table(expected))  # the padded path
    assert same(ragged_from_blocks(blocks), ragged_from_table(shuffled))
    assert ragged_from_blocks(blocks, mine[:0], by_user=True).num_tasks == 0
