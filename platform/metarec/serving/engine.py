"""Adapt a micro-batch of users at once, then score what each request asks for.

The same ``MetaLearner.adapt`` as training and evaluation runs on a padded batch of
requests, so a served prediction is exactly what ``metarec evaluate`` measured. A new user
has no row in the model's ``user_table`` buffer, so the batch brings its own: the request's
feature codes are passed as that buffer (``functional_call`` swaps buffers like parameters)
and user ``b`` of the batch is row ``b``. Item representations (the embedding lookups of
every catalog item) are computed once at load when embeddings do not adapt.

What a job scores: the items it names (``/v1/predict``, candidates), nothing else; or the
best ``top`` of the catalogue. An ``explain`` job also gets, for each item it returns, every
support item's leave-one-out influence: the item's score minus its score after adapting
without that support item (``_explain``).

Up to ``RetrievalConfig.full_below`` items the network scores the whole catalogue (in item
blocks, memory bounded); above, two stages: a ``Retriever`` (inner product over per-item
vectors built at load) proposes ``candidates`` items per user and the adapted network
re-ranks them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.func import functional_call

from metarec.batch import append_negatives
from metarec.layers import take_rows
from metarec.meta import SPARSE_NEIGHBOURS, MetaLearner
from metarec.model import call_with, sparse_lookup
from metarec.sections import RetrievalConfig
from metarec.serving.retrieval import Retriever

__all__ = ["Engine", "Job", "Result"]

Weights = dict[str, Tensor]  # one user's adapted parameters (no task dimension)


@dataclass(frozen=True)
class Job:
    """One user to score: adapt on (items, ratings), or reuse cached ``weights``; then
    score the items ``score`` names, or find the catalogue's best ``top``, or (neither)
    score every catalogue item."""

    features: tuple[int, ...] | None = None  # encoded user features (Catalog.encode_user)
    items: tuple[int, ...] = ()
    ratings: tuple[float, ...] = ()
    weights: Weights | None = None
    score: tuple[int, ...] | None = None
    top: int = 0
    explain: bool = False  # also each support item's influence on what is returned


@dataclass(frozen=True)
class Result:
    scores: Tensor  # (N,) predicted ratings of ``items``, or (I,) of the whole catalogue
    weights: Weights  # the user's fast weights (cache them to skip adaptation next time)
    items: Tensor | None = None  # (N,) catalogue indices (``top``: best first); None: all
    # ``explain``: (M, S) influence of each support item (job order) on each of the
    # ``explained`` items (M,), the ones a top-k answer can return
    influence: Tensor | None = None
    explained: Tensor | None = None


class Engine:
    """Batched adaptation + catalog scoring for one trained learner.

    Args:
        learner: the meta-learner (its adaptation settings are the served ones).
        steps: inner steps at serve time (default: the learner's own).
        max_rows: (users x items) rows scored at once; bounds activation memory.
        max_user_items: (users x catalogue items) adapted and scored at once: a batch of
            more users than fit runs in parts.
        retrieval: when the catalogue is large enough for two-stage scoring, and how.
    """

    def __init__(
        self,
        learner: MetaLearner,
        *,
        steps: int | None = None,
        device: str | torch.device = "cpu",
        max_rows: int = 1 << 14,
        max_user_items: int = 1 << 22,
        retrieval: RetrievalConfig | None = None,
    ) -> None:
        self.learner = learner.to(device).eval()
        self.model = learner.model
        self.device = torch.device(device)
        self.steps = steps
        self.max_rows = max_rows
        self.max_user_items = max_user_items
        self.params = {n: p.detach() for n, p in learner.params().items()}
        lrs = learner.lrs()
        self.lrs = {n: v.detach() for n, v in lrs.items()} if isinstance(lrs, dict) else lrs
        self.n_items = int(self.model.item_genres.shape[0])
        # What a user's adaptation sets; a neighbour model's item-KNN term stays sparse
        # (the items the support reaches), so a user costs their support, not the catalogue.
        self.personal = learner.adapted + list(SPARSE_NEIGHBOURS) * self.model.has_neighbours
        # Served batches, jobs and engine seconds: mean batch size and time per user are
        # what tell whether micro-batching works (reported at GET /v1/model).
        self.stats = {"batches": 0, "jobs": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        self.n_features = 4 if self.model.use_user else 0
        # Item-side inputs of every item, once, unless adaptation changes them.
        self.item_x: Tensor | None = None
        # ``Recommender.item_side`` of the catalogue, kept at the first batch that scores
        # with ``predict_shared`` (self.params, which it depends on, never change)
        self.item_side: tuple[Tensor, Tensor | None] | None = None
        if not any(n.startswith(("emb.", "item_bias")) for n in learner.adapted):
            with torch.no_grad():
                items = torch.arange(self.n_items, device=self.device)[None]
                users = torch.zeros(1, dtype=torch.long, device=self.device)
                self.item_x = self.model.encode_parts(items, users)[0][0]  # (I, Fi)
        self.retrieval = retrieval or RetrievalConfig()
        self.retriever: Retriever | None = None
        if self.n_items > self.retrieval.full_below:
            kind = "ann" if self.n_items > self.retrieval.ann_above else "exact"
            self.retriever = Retriever(
                self._item_vectors(), kind=kind, nprobe=self.retrieval.nprobe
            )
            # One cold start at load: what the first request would otherwise wait for (the
            # catalogue's item side, when scoring shares it) is computed and kept.
            with torch.no_grad():
                self._run([Job(top=1)])

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> list[Result]:
        """Adapt the jobs that need it (one padded batch), then score all of them."""
        start, cpu = time.perf_counter(), time.thread_time()
        results = self._run(jobs)
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["cpu_seconds"] += time.thread_time() - cpu
        return results

    def _run(self, jobs: list[Job]) -> list[Result]:
        # Per-user (I,) tensors of a large catalogue, a batch at a time: past a few users
        # they outgrow the caches, and every fresh allocation is an mmap that page-faults.
        chunk = max(1, self.max_user_items // self.n_items)
        if len(jobs) > chunk and any(self._whole_catalogue(j) for j in jobs):
            return [
                r for lo in range(0, len(jobs), chunk) for r in self._run(jobs[lo : lo + chunk])
            ]
        todo = [j for j in jobs if j.weights is None]
        fresh = iter(self._adapt(todo) if todo else [])
        weights = [j.weights if j.weights is not None else next(fresh) for j in jobs]
        results: list[Result | None] = [None] * len(jobs)
        kinds: dict[str, list[int]] = {"items": [], "top": [], "all": []}
        for b, j in enumerate(jobs):  # without a retriever, a top is the whole catalogue
            top = "top" if j.top and self.retriever else "all"
            kinds["items" if j.score is not None else top].append(b)
        for kind, rows in kinds.items():
            if not rows:
                continue
            group = [jobs[b] for b in rows]
            stacked = self._stack([weights[b] for b in rows])
            table = self._user_table(group)
            if kind == "all":
                out = [(s, None) for s in self._score(stacked, table)]
            elif kind == "items":
                out = self._score_asked(stacked, table, [j.score for j in group])
            else:
                out = self._two_stage(stacked, table, group)
            for b, (s, items) in zip(rows, out, strict=True):
                results[b] = Result(s, weights[b], items)
        if any(j.explain for j in jobs):
            results = self._explain(jobs, results)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _whole_catalogue(self, job: Job) -> bool:
        """Whether scoring ``job`` holds a per-user tensor of every catalogue item: all
        its scores, or an exact search's per-user term (an index's search does not)."""
        if job.score is not None:
            return False
        return not (job.top and self.retriever is not None and self.retriever.index is not None)

    def _explain(self, jobs: list[Job], results: list[Result]) -> list[Result]:
        """Each explain job's result with every support item's influence on the items it
        can return: score(item | support) - score(item | support without that item).

        Exact leave-one-out, not a gradient: it is by definition what removing the rating
        does (the faithfulness an explanation needs), it holds for every adaptation (ridge,
        gradient steps, implicit supports whose negatives depend on the support), and at
        serving's support sizes its S extra adaptations are one more padded batch. The
        full scores are re-scored by the same path as the reduced ones, so an influence
        carries no difference of summation order.
        """
        extra: list[Job] = []
        spans = []
        for j, r in zip(jobs, results, strict=True):
            if not (j.explain and j.items):
                spans.append(None)
                continue
            if r.items is not None:  # what was scored: the asked items or the candidates
                asked = r.items
            else:  # the whole catalogue: a top-k answer comes from its best ``top``
                asked = r.scores.topk(min(max(j.top, 1), len(r.scores))).indices
            asked_t = tuple(asked.tolist())
            spans.append((len(extra), len(j.items), asked))
            extra.append(Job(features=j.features, weights=r.weights, score=asked_t))
            for s in range(len(j.items)):
                extra.append(
                    Job(
                        features=j.features,
                        items=j.items[:s] + j.items[s + 1 :],
                        ratings=j.ratings[:s] + j.ratings[s + 1 :],
                        score=asked_t,
                    )
                )
        scored = self._run(extra)
        out = []
        for r, span in zip(results, spans, strict=True):
            if span is None:
                out.append(r)
                continue
            lo, n, asked = span
            full = scored[lo].scores
            without = torch.stack([x.scores for x in scored[lo + 1 : lo + 1 + n]])  # (S, M)
            influence = (full[None] - without).T.contiguous()  # (M, S)
            out.append(replace(r, influence=influence, explained=asked))
        return out

    def _user_table(self, jobs: list[Job]) -> Tensor | None:
        if not self.n_features:
            return None
        rows = [j.features or (0,) * self.n_features for j in jobs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _with_users(self, params: Weights, table: Tensor | None) -> Weights:
        return params if table is None else {**params, "user_table": table}

    def _adapt(self, jobs: list[Job]) -> list[Weights]:
        b = len(jobs)
        items, mask = _padded([j.items for j in jobs], torch.long)
        ratings, _ = _padded([j.ratings for j in jobs], torch.float32)
        dtype = next(iter(self.params.values())).dtype
        dev = self.device
        users = torch.arange(b, device=dev)
        if self.learner.loss != "mse":  # implicit: negatives beside the support, as evaluated
            negatives = self.learner.support_negatives(items, mask)
            items, ratings, mask = append_negatives(items, ratings, mask, negatives)
        support = (users, items.to(dev), ratings.to(dev, dtype), mask.to(dev))
        params = self._with_users(self.params, self._user_table(jobs))
        fast = self.learner.adapt(
            params, support, steps=self.steps, inner_lr=self.lrs, sparse_neighbours=True
        )
        adapted = {n: fast[n] for n in self.personal if n in fast}  # 0 steps: no neighbours
        # Clones: a cached user must not keep the whole batch's tensors alive; and of the
        # batch's sparse neighbour scores, only the user's (one padding slot if none).
        reached = adapted.get(SPARSE_NEIGHBOURS[0])
        width = (
            [None] * b if reached is None else (reached < self.n_items).sum(1).clamp_min(1).tolist()
        )
        return [
            {
                n: (w[row, : width[row]] if n in SPARSE_NEIGHBOURS[:2] else w[row]).clone()
                for n, w in adapted.items()
            }
            for row in range(b)
        ]

    def _score_asked(
        self, weights: Weights, table: Tensor | None, asked: list[tuple[int, ...]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Each job's named items, and nothing else, in the order asked."""
        items, _ = _padded(asked, torch.long)
        scores = self._score_items(weights, table, items.to(self.device)).cpu()
        return [(scores[r, : len(a)], items[r, : len(a)]) for r, a in enumerate(asked)]

    def _two_stage(
        self, weights: Weights, table: Tensor | None, jobs: list[Job]
    ) -> list[tuple[Tensor, Tensor]]:
        """Retrieve candidates by inner product, re-rank them with the adapted network."""
        assert self.retriever is not None
        params = self._params(weights)
        b, tops = len(jobs), [j.top for j in jobs]
        w = params["head.weight"].expand(b, -1, 1).squeeze(-1)
        parts = [w, params["head.factor"].expand(b, -1)] if self.model.has_factor_head else [w]
        queries = torch.cat([*parts, torch.ones(b, 1, dtype=w.dtype, device=w.device)], 1)
        n = max(self.retrieval.candidates, *tops)
        extra = also = None
        if SPARSE_NEIGHBOURS[0] in weights:  # the items whose neighbourhood term is not the rest's
            reached = weights[SPARSE_NEIGHBOURS[0]]
            if self.retriever.index is not None:  # an index has no per-user term: add them
                also = torch.where(reached < self.n_items, reached, -1).cpu()  # -1: none
            else:  # exact: the term added to every block
                extra = self._catalogue_neighbour_term(weights).cpu()
        elif params["item_bias"].dim() == 2:  # per-user biases: their change from the shared
            extra = (params["item_bias"] - self.params["item_bias"]).cpu()
        found, valid = self.retriever.search(queries.cpu(), n, extra, also)
        scores = self._score_items(weights, table, found.to(self.device)).cpu()
        scores = scores.masked_fill(~valid, float("-inf"))
        out = []
        for row, top in enumerate(tops):
            best = scores[row].topk(min(top, int(valid[row].sum())))
            out.append((best.values, found[row, best.indices]))
        return out

    def _stack(self, weights: list[Weights]) -> Weights:
        """Users' weights as one batch; sparse neighbour scores padded with the catalogue
        size (an item no lookup asks for)."""
        out = {}
        for n in weights[0]:
            rows = [w[n] for w in weights]
            if n in SPARSE_NEIGHBOURS[:2]:
                pad = self.n_items if n == SPARSE_NEIGHBOURS[0] else 0
                out[n] = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
            else:
                out[n] = torch.stack(rows)
        return out

    def _neighbour_term(self, weights: Weights, items: Tensor) -> Tensor | float:
        """(B, N) the neighbourhood term of each user's score of ``items`` (B, N): its
        weight times the support's item-KNN score (0 without a neighbour graph)."""
        if SPARSE_NEIGHBOURS[0] not in weights:
            return 0.0
        scores = sparse_lookup(*(weights[n] for n in SPARSE_NEIGHBOURS), items)
        return weights["head.neighbour"] * scores

    def _catalogue_neighbour_term(self, weights: Weights) -> Tensor:
        """``_neighbour_term`` of every catalogue item, (B, I): the rest's term, and the
        reached items' scattered over it (a lookup per item would search each user's
        reached items a million times)."""
        reached, scores, rest = (weights[n] for n in SPARSE_NEIGHBOURS)
        weight = weights["head.neighbour"]
        term = (weight * rest[:, None]).expand(-1, self.n_items + 1).clone()
        return term.scatter_(1, reached, weight * scores)[:, : self.n_items]  # padding: col I

    def _score_items(self, weights: Weights, table: Tensor | None, items: Tensor) -> Tensor:
        """(B, N) scores of each user's own ``items`` (B, N) under the adapted network."""
        return self._network_scores(weights, table, items) + self._neighbour_term(weights, items)

    def _network_scores(self, weights: Weights, table: Tensor | None, items: Tensor) -> Tensor:
        """``_score_items`` but for the neighbourhood term."""
        b = items.shape[0]
        params = self._with_users(self._params(weights), table)
        if self.model.shares_item_side(params):
            return self.model.predict_shared(params, items, self._item_side())
        users = torch.arange(b, device=self.device)
        if self.item_x is None:  # embeddings adapt: the general forward
            return functional_call(self.model, params, (items, users))
        user_x = call_with(self.model, params, "encode_parts", items[:, :1], users)[1]
        return self.model.predict_encoded(params, take_rows(self.item_x, items), user_x, items)

    def _params(self, weights: Weights) -> Weights:
        """The network's parameters under a user's weights (the model does not know the
        sparse neighbour scores, ``_neighbour_term`` adds them)."""
        return {**self.params, **{n: w for n, w in weights.items() if n not in SPARSE_NEIGHBOURS}}

    def _item_side(self) -> tuple[Tensor, Tensor | None]:
        """``Recommender.item_side`` of the catalogue under the shared weights, computed
        once (they never change in a server)."""
        if self.item_side is None:
            catalogue = torch.arange(self.n_items, device=self.device)
            self.item_side = call_with(self.model, self.params, "item_side", catalogue)
        return self.item_side

    def _item_vectors(self) -> Tensor:
        """(I, F) retrieval vectors [z_i; q_i; μ + b_i] (``Recommender.head_inputs``) under
        the shared weights, for a user whose features are unknown, in item blocks."""
        params = self._with_users(self.params, self._user_table([Job()]))
        users = torch.zeros(1, dtype=torch.long, device=self.device)
        out = []
        for lo in range(0, self.n_items, self.max_rows):
            items = torch.arange(lo, min(lo + self.max_rows, self.n_items), device=self.device)
            x, offset = call_with(self.model, params, "head_inputs", items[None], users)
            out.append(torch.cat([x[0], offset[0, :, None]], 1).cpu())
        return torch.cat(out)

    def _score(self, weights: Weights, table: Tensor | None) -> Tensor:
        """(B, I) ratings of every catalog item under each user's fast weights."""
        scores = self._network_catalogue(weights, table)
        if SPARSE_NEIGHBOURS[0] in weights:
            scores += self._catalogue_neighbour_term(weights).cpu()
        return scores

    def _network_catalogue(self, weights: Weights, table: Tensor | None) -> Tensor:
        """``_score`` but for the neighbourhood term."""
        b = next(iter(weights.values())).shape[0]
        params = self._with_users(self._params(weights), table)
        if self.model.shares_item_side(params):  # the MLP once per item, heads as a matmul
            items = torch.arange(self.n_items, device=self.device).expand(b, -1)
            return self.model.predict_shared(params, items, self._item_side()).cpu()
        users = torch.arange(b, device=self.device)
        out = torch.empty(b, self.n_items)
        block = max(1, self.max_rows // b)
        for lo in range(0, self.n_items, block):
            hi = min(lo + block, self.n_items)
            items = torch.arange(lo, hi, device=self.device).expand(b, hi - lo)
            if self.item_x is None:  # embeddings adapt: encode per user, the general forward
                scores = functional_call(self.model, params, (items, users))
            else:
                user_x = call_with(self.model, params, "encode_parts", items[:, :1], users)[1]
                item_x = self.item_x[lo:hi].expand(b, hi - lo, -1)
                scores = self.model.predict_encoded(params, item_x, user_x, items)
            out[:, lo:hi] = scores.cpu()
        return out


def _padded(rows: list[tuple], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Request lists -> a zero-padded (B, longest) tensor and its mask (at least one
    column): building tensors from request lists, not compute."""
    width = max([1, *(len(r) for r in rows)])
    out = torch.zeros(len(rows), width, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, values in enumerate(rows):
        out[row, : len(values)] = torch.tensor(values, dtype=dtype)
        mask[row, : len(values)] = True
    return out, mask
