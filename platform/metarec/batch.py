"""Task tensors: padded batches, and a flat store of a whole split to cut them from.

Support and query sizes differ per user, so tasks are padded to the longest in a batch with
boolean masks. Conversion from the prepared Parquet list columns is vectorized (offsets and
one scatter), and batches are cut from length-sorted windows so little of a batch is padding.
A whole split is either one ``TaskBatch`` (padded to its longest task: fine when every user
has at most a hundred ratings) or ``RaggedTasks`` (flat, offsets per task: memory is the
ratings themselves, so users with thousands of ratings pad nobody but their own batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

__all__ = [
    "RaggedTasks",
    "TaskBatch",
    "Tasks",
    "append_negatives",
    "bucketed_batches",
    "from_table",
    "item_marks",
    "ragged_from_blocks",
    "ragged_from_table",
]


@dataclass(frozen=True)
class TaskBatch:
    """T tasks; padded entries have mask False (their item index 0 and rating 0 are dummies)."""

    users: Tensor  # (T,) long
    support_items: Tensor  # (T, S) long
    support_ratings: Tensor  # (T, S) float
    support_mask: Tensor  # (T, S) bool
    query_items: Tensor  # (T, Q) long
    query_ratings: Tensor  # (T, Q) float
    query_mask: Tensor  # (T, Q) bool

    @property
    def num_tasks(self) -> int:
        return int(self.users.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        out = {}
        for f in fields(self):
            t = getattr(self, f.name).to(device)
            out[f.name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return TaskBatch(**out)

    def select(self, index: Tensor) -> TaskBatch:
        """Rows ``index``, trimmed to the longest support/query among them."""
        s_len = int(self.support_mask[index].sum(1).max())
        q_len = int(self.query_mask[index].sum(1).max())
        return TaskBatch(
            users=self.users[index],
            support_items=self.support_items[index, :s_len],
            support_ratings=self.support_ratings[index, :s_len],
            support_mask=self.support_mask[index, :s_len],
            query_items=self.query_items[index, :q_len],
            query_ratings=self.query_ratings[index, :q_len],
            query_mask=self.query_mask[index, :q_len],
        )

    def lengths(self) -> tuple[Tensor, Tensor]:
        """(T,) support sizes and (T,) query sizes."""
        return self.support_mask.sum(1), self.query_mask.sum(1)

    def flat(self, *, support_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(row, item, rating) of every rating (or every support rating), task by task,
        support before query: the order of ``merged()[mask]``."""
        if support_only:
            items, ratings, mask = self.support_items, self.support_ratings, self.support_mask
        else:
            items, ratings, mask = self.merged()
        rows = torch.arange(self.num_tasks).unsqueeze(1).expand_as(mask)
        return rows[mask], items[mask], ratings[mask]

    def merged(self) -> tuple[Tensor, Tensor, Tensor]:
        """Support and query side by side: all of a task's ratings, (T, S+Q) each."""
        return (
            torch.cat([self.support_items, self.query_items], 1),
            torch.cat([self.support_ratings, self.query_ratings], 1),
            torch.cat([self.support_mask, self.query_mask], 1),
        )

    def resampled(self, query_size: int, keys: Tensor) -> TaskBatch:
        """Re-split each task's ratings into a fresh random query of ``query_size``.

        Meta-training sees a new support/query split of each training user every epoch, so
        the learner cannot memorise which ratings are asked (vectorized: random keys + sort).

        Args:
            keys: (T, L) uniform random numbers, L >= every task's rating count; a task's
                j-th rating (support first, then query) gets key ``keys[t, j]`` however the
                batch is padded, so a task splits the same way in any batch it lands in.
        """
        items, ratings, mask = self.merged()
        position = (mask.cumsum(1) - 1).clamp_min(0)  # j of each valid entry, (T, S+Q)
        keys = keys.to(mask.device).gather(1, position).masked_fill(~mask, 2.0)  # padding last
        order = keys.argsort(1)
        items, ratings, mask = (t.gather(1, order) for t in (items, ratings, mask))
        rank = torch.arange(mask.shape[1], device=mask.device)
        in_query = mask & (rank < query_size)
        out_support = mask & ~in_query
        s_len = int(out_support.sum(1).max())
        return replace(
            self,
            support_items=items[:, query_size:][:, :s_len],
            support_ratings=ratings[:, query_size:][:, :s_len],
            support_mask=out_support[:, query_size:][:, :s_len],
            query_items=items[:, :query_size],
            query_ratings=ratings[:, :query_size],
            query_mask=in_query[:, :query_size],
        )

    def with_negatives(
        self, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor] | None = None
    ) -> TaskBatch:
        """Implicit tasks with sampled negatives ``(items (T, K), mask (T, K))`` appended to
        the support (and the query) as target 0 (``append_negatives``)."""
        s = append_negatives(self.support_items, self.support_ratings, self.support_mask, support)
        out = replace(self, support_items=s[0], support_ratings=s[1], support_mask=s[2])
        if query is None:
            return out
        q = append_negatives(self.query_items, self.query_ratings, self.query_mask, query)
        return replace(out, query_items=q[0], query_ratings=q[1], query_mask=q[2])

    def cut_support(self, n: int) -> TaskBatch:
        """Implicit evaluation tasks whose support keeps its first ``n`` interactions (in
        the support's order: random for ``user_cold``, oldest first for ``temporal``: a new
        customer's first few); the others move to the query with target 0, where scoring
        neither ranks them nor counts them as positives
        (``implicit_metrics.score_implicit``): a user with only ``n`` interactions, the rest
        of their history out of the way. Masks stay left-packed, as ``select`` expects."""
        mask = self.support_mask
        kept = mask & (mask.cumsum(1) <= n)
        items = torch.cat([self.query_items, self.support_items], 1)
        ratings = torch.cat([self.query_ratings, torch.zeros_like(self.support_ratings)], 1)
        in_query = torch.cat([self.query_mask, mask & ~kept], 1)
        order = (~in_query).to(torch.int8).argsort(dim=1, stable=True)  # valid entries first
        width = max(1, int(in_query.sum(1).max()))
        items, ratings, in_query = (
            t.gather(1, order)[:, :width] for t in (items, ratings, in_query)
        )
        s_len = max(1, int(kept.sum(1).max()))
        return replace(
            self,
            support_items=self.support_items[:, :s_len],
            support_ratings=self.support_ratings[:, :s_len],
            support_mask=kept[:, :s_len],
            query_items=items,
            query_ratings=ratings,
            query_mask=in_query,
        )

    def windowed(self, n: int) -> TaskBatch:
        """Each task keeps at most its first ``n`` support ratings (after ``resampled``, a
        random window of its history, drawn again every epoch): a user with thousands of
        ratings costs a meta-batch ``n``, not thousands."""
        if self.support_items.shape[1] <= n:
            return self
        kept = self.support_mask & (self.support_mask.cumsum(1) <= n)
        return replace(
            self,
            support_items=self.support_items[:, :n],
            support_ratings=self.support_ratings[:, :n],
            support_mask=kept[:, :n],
        )

    def shortened(self, keep: Tensor) -> TaskBatch:
        """Each task keeps the first ``floor(keep[t] * n_t)`` of its n_t support ratings.

        Meta-training on short supports trains the prior where it decides the answer
        (``meta.short_supports``); after ``resampled`` the support order is random, so the
        first ratings are a random subset.

        Args:
            keep: (T,) fractions in [0, 1].
        """
        mask = self.support_mask
        n = mask.sum(1, keepdim=True)
        rank = mask.cumsum(1) - 1
        kept = mask & (rank < (keep.to(mask.device)[:, None] * n).floor())
        return replace(self, support_mask=kept)


def append_negatives(
    items: Tensor, targets: Tensor, mask: Tensor, negatives: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Padded ``(T, L)`` items, targets and mask with negatives ``(items (T, K), mask (T, K))``
    appended as target 0: the losses of ``meta.task_loss`` read a strength > 0 as a
    positive and 0 as a negative."""
    neg, neg_mask = (t.to(items.device) for t in negatives)
    return (
        torch.cat([items, neg], 1),
        torch.cat([targets, targets.new_zeros(neg.shape)], 1),
        torch.cat([mask, neg_mask], 1),
    )


def item_marks(items: Tensor, mask: Tensor, n_items: int) -> Tensor:
    """``(T, n_items)`` bool: which catalogue items each task lists in ``items`` (where
    ``mask``), e.g. its support items to exclude from a ranking, or its positives."""
    out = torch.zeros(items.shape[0], n_items, dtype=torch.bool, device=items.device)
    rows = torch.arange(items.shape[0], device=items.device)[:, None].expand_as(items)
    out[rows[mask], items[mask]] = True
    return out


def _pad(column: pa.ChunkedArray, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A list column -> (T, L) padded values and (T, L) mask, without a loop over rows."""
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy()
    values = arr.flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(values)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    width = int(lengths.max(initial=1))
    out = torch.zeros(len(lengths), width, dtype=dtype)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    r, c = torch.as_tensor(rows), torch.as_tensor(cols)
    out[r, c] = torch.from_numpy(np.array(values)).to(dtype)  # copy: arrow buffers are read-only
    mask[r, c] = True
    return out, mask


def from_table(table: pa.Table) -> TaskBatch:
    """A prepared tasks table (one row per user) -> one padded TaskBatch of every task."""
    s_items, s_mask = _pad(table.column("support_items"), torch.long)
    s_ratings, _ = _pad(table.column("support_ratings"), torch.float32)
    q_items, q_mask = _pad(table.column("query_items"), torch.long)
    q_ratings, _ = _pad(table.column("query_ratings"), torch.float32)
    users = torch.as_tensor(table.column("user").to_numpy().astype(np.int64))
    return TaskBatch(users, s_items, s_ratings, s_mask, q_items, q_ratings, q_mask)


@dataclass(frozen=True)
class RaggedTasks:
    """T tasks stored flat: each task's support then query ratings, one task after another.

    What a training worker holds of a long-tailed split: memory is proportional to the
    ratings, where a ``TaskBatch`` of the split is T x the longest task (a user with 8,000
    ratings would pad 128,000 others to 8,000). ``select`` cuts a padded ``TaskBatch`` of
    a few rows, identical to ``TaskBatch.select`` of the same rows.
    """

    users: Tensor  # (T,) long
    items: Tensor  # (R,) long
    ratings: Tensor  # (R,) float
    offsets: Tensor  # (T + 1,) long: task t is [offsets[t], offsets[t + 1])
    n_support: Tensor  # (T,) long: the first n_support[t] of task t are its support

    @property
    def num_tasks(self) -> int:
        return int(self.users.shape[0])

    def lengths(self) -> tuple[Tensor, Tensor]:
        """(T,) support sizes and (T,) query sizes."""
        total = self.offsets[1:] - self.offsets[:-1]
        return self.n_support, total - self.n_support

    def flat(self, *, support_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(row, item, rating) of every rating (or every support rating), as
        ``TaskBatch.flat``."""
        total = self.offsets[1:] - self.offsets[:-1]
        rows = torch.repeat_interleave(torch.arange(self.num_tasks), total)
        if not support_only:
            return rows, self.items, self.ratings
        keep = (torch.arange(len(rows)) - self.offsets[:-1][rows]) < self.n_support[rows]
        return rows[keep], self.items[keep], self.ratings[keep]

    def take(self, index: Tensor) -> RaggedTasks:
        """Rows ``index``, still flat: a sample of a split costs its ratings, no padding."""
        total = (self.offsets[1:] - self.offsets[:-1])[index]
        offsets = torch.zeros(len(index) + 1, dtype=torch.long)
        offsets[1:] = total.cumsum(0)
        shift = torch.repeat_interleave(self.offsets[:-1][index] - offsets[:-1], total)
        at = torch.arange(int(offsets[-1])) + shift
        return RaggedTasks(
            self.users[index], self.items[at], self.ratings[at], offsets, self.n_support[index]
        )

    def select(self, index: Tensor) -> TaskBatch:
        """Rows ``index`` as a padded ``TaskBatch``, trimmed to their longest support and
        query."""
        s_len, q_len = (n[index] for n in self.lengths())
        start = self.offsets[:-1][index]
        support = self._pad(start, s_len)
        query = self._pad(start + s_len, q_len)
        return TaskBatch(self.users[index], *support, *query)

    def _pad(self, start: Tensor, length: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        width = int(length.max()) if len(length) else 0
        j = torch.arange(width)[None]
        mask = j < length[:, None]
        at = torch.where(mask, start[:, None] + j, 0)
        return (
            self.items[at].masked_fill(~mask, 0),
            self.ratings[at].masked_fill(~mask, 0.0),
            mask,
        )


Tasks = TaskBatch | RaggedTasks  # a whole split: padded, or flat


def ragged_from_table(table: pa.Table) -> RaggedTasks:
    """A prepared tasks table -> ``RaggedTasks`` in the table's row order."""
    return ragged_from_blocks([table])


# Tasks ``ragged_from_blocks`` copies out of a block at once: Ray Data hands a worker the
# driver's whole table as one block, and copying a worker's share of it in one piece held
# several transient copies of that share (taken rows, combined chunks, destinations).
COPY_ROWS = 4096


def ragged_from_blocks(
    blocks: Sequence[pa.Table], users: np.ndarray | None = None, *, by_user: bool = False
) -> RaggedTasks:
    """The tasks of ``blocks`` (those of ``users`` only, when given) as one ``RaggedTasks``,
    in block order or, ``by_user``, in user-id order.

    Written straight into the final arrays in two passes (the rows and their lengths, then
    each block's ratings to their places, ``COPY_ROWS`` tasks at a time), so the peak is
    the result plus one slice's rows:
    a worker that concatenated, sorted and then flattened its share held about three more
    copies of it at once, which is most of what its memory grew by with the data.
    """
    picks, ids, lengths = [], [], {"support": [], "query": []}
    for block in blocks:
        user = block.column("user").to_numpy()
        rows = np.arange(len(user)) if users is None else np.flatnonzero(np.isin(user, users))
        picks.append(rows)
        ids.append(user[rows].astype(np.int64))
        for side, out in lengths.items():
            n = pc.list_value_length(block.column(f"{side}_items")).to_numpy()
            out.append(n[rows].astype(np.int64))
    user_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    s_len, q_len = (np.concatenate(v) if v else np.zeros(0, np.int64) for v in lengths.values())
    order = np.argsort(user_ids, kind="stable") if by_user else np.arange(len(user_ids))
    place = np.empty_like(order)
    place[order] = np.arange(len(order))  # the output row of each gathered row
    offsets = np.concatenate([[0], np.cumsum((s_len + q_len)[order])]).astype(np.int64)
    items = np.zeros(int(offsets[-1]), dtype=np.int64)
    ratings = np.zeros(int(offsets[-1]), dtype=np.float32)
    done = 0
    for block, rows in zip(blocks, picks, strict=True):
        for lo in range(0, len(rows), COPY_ROWS):  # a slice's copies at a time, not a block's
            cut = rows[lo : lo + COPY_ROWS]
            here = slice(done, done + len(cut))
            done += len(cut)
            part = block.take(pa.array(cut)) if users is not None else block.slice(lo, len(cut))
            start = offsets[place[here]]
            for side, shift in (("support", start), ("query", start + s_len[here])):
                its = part.column(f"{side}_items").combine_chunks()
                rs = part.column(f"{side}_ratings").combine_chunks()
                begin = its.offsets.to_numpy().astype(np.int64)
                values = its.flatten().to_numpy(zero_copy_only=False)
                dest = np.repeat(shift - (begin[:-1] - begin[0]), np.diff(begin))
                dest += np.arange(len(values))
                items[dest], ratings[dest] = values, rs.flatten().to_numpy(zero_copy_only=False)
    return RaggedTasks(
        users=torch.from_numpy(user_ids[order]),
        items=torch.from_numpy(items),
        ratings=torch.from_numpy(ratings),
        offsets=torch.from_numpy(offsets),
        n_support=torch.from_numpy(s_len[order]),
    )


def bucketed_batches(
    lengths: Tensor, batch_size: int, generator: torch.Generator, *, window: int = 8
) -> list[Tensor]:
    """Shuffled meta-batches of similar support length (less padding, same randomness).

    Tasks are shuffled, cut into windows of ``window * batch_size``, sorted by length inside
    each window, cut into batches, and the batches are shuffled again.
    """
    perm = torch.randperm(len(lengths), generator=generator)
    batches: list[Tensor] = []
    span = window * batch_size
    for lo in range(0, len(perm), span):
        chunk = perm[lo : lo + span]
        chunk = chunk[lengths[chunk].argsort(stable=True)]
        batches.extend(chunk.split(batch_size))
    order = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in order]
