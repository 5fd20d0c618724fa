"""What each endpoint does, without HTTP or Ray: validate, build engine jobs, shape answers.

Request handling is split in two around the engine so that Ray Serve can micro-batch the
middle: ``*_job`` validates a request and turns it into an ``engine.Job`` (raising
``FieldError`` for anything wrong, which the app answers with 422), the engine runs many
jobs at once, and ``*_response`` turns one ``engine.Result`` into the JSON answer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch

from metarec.catalog import ONBOARDING_RULES, Catalog, FieldError
from metarec.sections import LimitsConfig
from metarec.serving.engine import Engine, Job, Result
from metarec.serving.schemas import (
    Event,
    FeedbackRequest,
    PredictRequest,
    Rating,
    RecommendRequest,
    UserFeatures,
)
from metarec.serving.sessions import FeedbackLog, Session, Sessions

__all__ = ["Service"]

Loc = tuple[str | int, ...]
MAX_REASONS = 3  # support items named per recommended item (``explain``)


class Service:
    """The API's behaviour over one loaded model (one per Serve replica)."""

    def __init__(
        self,
        engine: Engine,
        catalog: Catalog,
        *,
        model_info: dict[str, Any],
        limits: LimitsConfig,
        sessions: Sessions,
        feedback: FeedbackLog,
    ) -> None:
        self.engine, self.catalog, self.limits = engine, catalog, limits
        self.model_info = model_info
        self.sessions, self.feedback_log = sessions, feedback

    # -- validation ---------------------------------------------------------------------

    def _check_len(self, values: list | None, limit: int, loc: Loc, what: str) -> None:
        if values is not None and len(values) > limit:
            raise FieldError(loc, f"{len(values)} {what}; at most {limit} allowed")

    def _ratings(self, ratings: list[Rating], loc: Loc) -> tuple[list[int], list[float]]:
        self._check_len(ratings, self.limits.max_ratings, loc, "ratings")
        lo, hi = self.catalog.rating_range
        values = []
        for k, r in enumerate(ratings):
            if not (lo <= r.rating <= hi):  # also catches NaN if a client slips one in
                raise FieldError((*loc, k, "rating"), f"{r.rating} is outside [{lo}, {hi}]")
            values.append(float(r.rating))
        items = self.catalog.item_index([str(r.item) for r in ratings], loc, ("item",))
        latest = dict(zip(items, values, strict=True))  # a repeated item keeps its last rating,
        return list(latest), list(latest.values())  # as in training data (data.features)

    def _events(self, events: list[Event], loc: Loc) -> tuple[list[int], list[float]]:
        """Events -> (items, strengths) as training weighed them: the event's weight (from
        the data's ``event_weights``) times the value, or the value alone; a repeated
        item's strengths add up (the training policy, ``data.events``)."""
        self._check_len(events, self.limits.max_ratings, loc, "events")
        weights = self.catalog.event_weights
        strengths = []
        for k, e in enumerate(events):
            if e.event is None and e.value is None:
                raise FieldError((*loc, k), "give an event, a value, or both")
            weight = 1.0
            if e.event is not None:
                if e.event not in weights:
                    expected = sorted(weights) or "none: this data had counts, send a value"
                    raise FieldError(
                        (*loc, k, "event"), f"{e.event!r} has no weight; expected {expected}"
                    )
                weight = weights[e.event]
            strengths.append(weight * (1.0 if e.value is None else e.value))
        items = self.catalog.item_index([str(e.item) for e in events], loc, ("item",))
        total: dict[int, float] = {}
        for i, s in zip(items, strengths, strict=True):
            total[i] = total.get(i, 0.0) + s
        return list(total), list(total.values())

    def _support(
        self, ratings: list[Rating], events: list[Event], loc: Loc
    ) -> tuple[list[int], list[float]]:
        """A request's support set in the kind of feedback the model learned from; the
        other kind is refused, naming its field."""
        implicit = self.catalog.feedback == "implicit"
        wrong, given = ("ratings", ratings) if implicit else ("events", events)
        if given:
            learned = "implicit feedback: send events" if implicit else "ratings: send ratings"
            raise FieldError((*loc, wrong), f"this model learned from {learned}")
        if implicit:
            return self._events(events, (*loc, "events"))
        return self._ratings(ratings, (*loc, "ratings"))

    def _k(self, k: int, loc: Loc) -> None:
        if k > self.limits.max_k:
            raise FieldError(loc, f"{k} is larger than the limit {self.limits.max_k}")

    def _features(self, user: UserFeatures | None) -> tuple[int, ...] | None:
        if user is None:
            return None
        return tuple(self.catalog.encode_user(user.model_dump(), ("body", "user")))

    def adapt_job(self, req: RecommendRequest | PredictRequest) -> Job:
        items, values = self._support(req.ratings, req.events, ("body",))
        return Job(features=self._features(req.user), items=tuple(items), ratings=tuple(values))

    # -- stateless endpoints ------------------------------------------------------------

    def recommend_job(self, req: RecommendRequest) -> Job:
        """The job: score the candidates only, or find the catalogue's best."""
        self._k(req.k, ("body", "k"))
        self._check_len(req.candidates, self.limits.max_items, ("body", "candidates"), "items")
        job = self.adapt_job(req)
        if req.candidates is not None:
            candidates = self.catalog.item_index(
                [str(c) for c in req.candidates], ("body", "candidates")
            )
            return dataclasses.replace(job, score=tuple(candidates), explain=req.explain)
        return dataclasses.replace(_ranking(job, req.k, req.exclude_seen), explain=req.explain)

    def recommend_response(self, req: RecommendRequest, job: Job, result: Result) -> dict:
        seen = job.items if req.exclude_seen else ()
        return {
            "model": self.model_info["label"],
            "adapted_on": len(job.items),
            "items": self.top_k(result, req.k, seen, support=job.items),
        }

    def predict_job(self, req: PredictRequest) -> Job:
        """The job: adapt, then score exactly the items asked for."""
        self._check_len(req.items, self.limits.max_items, ("body", "items"), "items")
        items = self.catalog.item_index([str(i) for i in req.items], ("body", "items"))
        return dataclasses.replace(self.adapt_job(req), score=tuple(items))

    def predict_response(self, job: Job, result: Result) -> dict:
        assert job.score is not None
        scores = result.scores.tolist()
        return {
            "model": self.model_info["label"],
            "adapted_on": len(job.items),
            "predictions": [
                {**self.catalog.item(i), "score": s} for i, s in zip(job.score, scores, strict=True)
            ],
        }

    def request_examples(self) -> dict[str, dict[str, Any]]:
        """One valid body per request schema, with real ids of this catalog (onboarding
        items), for the OpenAPI page: Swagger's "Try it out" then works as it is."""
        a, b, c = (self.catalog.raw_ids[i] for i in self.catalog.onboarding(3))
        if self.catalog.feedback == "implicit":  # the heaviest and the lightest event
            weights = self.catalog.event_weights
            field, names = "events", sorted(weights, key=weights.get)
            how = [{"event": names[-1]}, {"event": names[0]}] if names else [{"value": 2.0}] * 2
            support = [{"item": a, **how[0]}, {"item": b, **how[1]}]
        else:
            field, (lo, hi) = "ratings", self.catalog.rating_range
            support = [{"item": a, "rating": hi}, {"item": b, "rating": lo}]
        user = {"user": {"age": 30}} if self.catalog.has_user_features else {}
        return {
            "RecommendRequest": {**user, field: support, "k": 5},
            "PredictRequest": {**user, field: support, "items": [c]},
            "FeedbackRequest": {field: support[:1], "k": 5},
        }

    def search(self, q: str, n: int) -> dict[str, Any]:
        """Catalog items whose title contains every word of ``q`` (case-insensitive), the
        most rated first: how a person finds the ids the other endpoints take."""
        self._k(n, ("query", "n"))
        found = self.catalog.search(q)
        found.sort(key=lambda i: -int(self.catalog.item_count[i]))
        return {"query": q, "items": [self.catalog.item(i) for i in found[:n]]}

    def top_k(
        self,
        result: Result,
        k: int,
        exclude: tuple[int, ...] | list[int] = (),
        support: tuple[int, ...] = (),
    ) -> list[dict[str, Any]]:
        """The k best-scored items of a result (every item, or those it scored), never
        ``exclude``; each with ``because`` when the result carries influences of the
        ``support`` items."""
        s = result.scores.clone()
        items = torch.arange(len(s)) if result.items is None else result.items
        if exclude:
            s[torch.isin(items, torch.tensor(list(exclude), dtype=items.dtype))] = -math.inf
        top = torch.topk(s, min(k, len(s)))
        kept = [
            (v, i)
            for v, i in zip(top.values.tolist(), items[top.indices].tolist(), strict=True)
            if v > -math.inf
        ]
        out = [{**self.catalog.item(i), "score": v} for v, i in kept]
        if result.influence is not None:
            for entry, (_, i) in zip(out, kept, strict=True):
                entry["because"] = self._reasons(result, i, support)
        return out

    def _reasons(self, result: Result, item: int, support: tuple[int, ...]) -> list[dict]:
        """The (up to) ``MAX_REASONS`` support items whose removal would lower ``item``'s
        score most, largest first; none that would raise it (an item can be recommended
        despite the support, from what the model learned of everyone)."""
        assert result.influence is not None and result.explained is not None
        row = int((result.explained == item).nonzero()[0, 0])
        best = result.influence[row].topk(min(MAX_REASONS, len(support)))
        return [
            {**self.catalog.item(support[s]), "contribution": c}
            for c, s in zip(best.values.tolist(), best.indices.tolist(), strict=True)
            if c > 0
        ]

    def onboarding(self, n: int) -> dict[str, Any]:
        self._k(n, ("query", "n"))
        return {
            "rule": ONBOARDING_RULES[self.catalog.feedback],
            "items": [self.catalog.item(i) for i in self.catalog.onboarding(n)],
        }

    # -- sessions -----------------------------------------------------------------------

    def feedback_job(self, user_id: str, req: FeedbackRequest) -> tuple[Job, Session, int]:
        """Validate, log durably (fsync), then update the session: a 200 means on disk.
        (The server runs the same three steps with the fsync in a worker thread.)"""
        events = self.feedback_events(user_id, req)
        return self.apply_feedback(user_id, req, events, self.feedback_log.append(events))

    def feedback_events(self, user_id: str, req: FeedbackRequest) -> list[dict[str, Any]]:
        """The log records of a feedback request, or ``FieldError`` before anything is
        written."""
        self._k(req.k, ("body", "k"))
        if not (req.ratings or req.events):
            field = "events" if self.catalog.feedback == "implicit" else "ratings"
            raise FieldError(("body", field), "at least one is required")
        items, values = self._support(req.ratings, req.events, ("body",))
        features = req.user.model_dump(exclude_none=True) if req.user is not None else None
        if features is not None:
            self.catalog.encode_user(features, ("body", "user"))  # reject before logging
        now = time.time()
        label = self.model_info["label"]
        return [
            {
                "user_id": user_id,
                "item": self.catalog.raw_ids[i],
                # a rating, or an implicit model's strength: what the sessions replay
                self.sessions.value_key: r,
                "timestamp": now,
                "user": features,
                "model": label,
            }
            for i, r in zip(items, values, strict=True)
        ]

    def apply_feedback(
        self,
        user_id: str,
        req: FeedbackRequest,
        events: list[dict[str, Any]],
        logged: tuple[Path, list[int]],
    ) -> tuple[Job, Session, int]:
        """The session after the logged ``events`` (``logged``: where they were written),
        and the job that re-adapts it."""
        value = self.sessions.value_key
        items = [self.catalog.index[e["item"]] for e in events]
        features = events[0]["user"]
        session = self.sessions.get(user_id) or Session()
        if features:
            session.features = features
        session.add(
            items,
            [e[value] for e in events],
            self.limits.max_ratings,
            add_up=self.catalog.feedback == "implicit",
        )
        self.sessions.record(user_id, session, logged)
        return _ranking(self._session_job(session), req.k), session, session.version

    def session_job(
        self, user_id: str, k: int, exclude_seen: bool = True
    ) -> tuple[Job, Session | None, int]:
        self._k(k, ("query", "k"))
        session = self.sessions.get(user_id)
        if session is None:  # nobody by that id yet: a brand-new user, cold start
            return Job(top=k), None, 0
        return _ranking(self._session_job(session), k, exclude_seen), session, session.version

    def _session_job(self, session: Session) -> Job:
        features = tuple(self.catalog.encode_user(session.features)) if session.features else None
        return Job(
            features=features,
            items=tuple(session.ratings),
            ratings=tuple(session.ratings.values()),
            weights=session.weights,
        )

    def session_response(
        self,
        user_id: str,
        session: Session | None,
        version: int,
        job: Job,
        result: Result,
        k: int,
        exclude_seen: bool = True,
    ) -> dict[str, Any]:
        """Cache the fast weights (unless newer feedback arrived meanwhile) and answer."""
        if session is not None and session.version == version:
            session.weights = result.weights
        return {
            "user_id": user_id,
            "model": self.model_info["label"],
            "adapted_on": len(job.items),
            "items": self.top_k(result, k, job.items if exclude_seen else ()),
        }


def _ranking(job: Job, k: int, exclude_seen: bool = True) -> Job:
    """``job`` asking for the catalogue's best k, and as many more as it may exclude."""
    return dataclasses.replace(job, top=k + len(job.items) * exclude_seen)
