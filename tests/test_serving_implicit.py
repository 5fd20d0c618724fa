"""Serving a model trained on implicit feedback, without Ray or HTTP: events in, strengths
as training weighed them, negatives drawn as evaluation draws them, sessions that add
events up, and an onboarding page that spans the catalogue."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metarec.batch import from_table
from metarec.catalog import Catalog, FieldError
from metarec.checkpoint import learner_from_checkpoint, standalone_checkpoint
from metarec.initialise import build_learner
from metarec.loop import predict_items
from metarec.sections import LimitsConfig
from metarec.serving.engine import Engine, Job
from metarec.serving.schemas import Event, FeedbackRequest, PredictRequest, Rating, RecommendRequest
from metarec.serving.service import Service
from metarec.serving.sessions import FeedbackLog, Sessions


@pytest.fixture(scope="module")
def served(shop_cfg, shop_prepared):
    ds = shop_prepared
    train = from_table(ds.tasks("user_cold", "train"))
    learner = build_learner(shop_cfg, ds, train)
    ckpt = standalone_checkpoint(shop_cfg, learner, ds, train)
    loaded = learner_from_checkpoint(ckpt, best=False)
    catalog = Catalog.from_checkpoint(ckpt, loaded.model.item_genres, loaded.model.item_year)
    return learner, loaded, catalog


def _service(served, tmp_path) -> Service:
    _, loaded, catalog = served
    return Service(
        Engine(loaded),
        catalog,
        model_info={"label": "test"},
        limits=LimitsConfig(),
        sessions=Sessions(
            tmp_path, max_sessions=4, max_ratings=50, index=catalog.index, implicit=True
        ),
        feedback=FeedbackLog(tmp_path, "w0"),
    )


def test_the_checkpoint_knows_its_feedback_and_event_weights(served, shop_cfg):
    learner, loaded, catalog = served
    assert loaded.feedback == "implicit" and loaded.loss == shop_cfg.meta.implicit_loss
    assert catalog.feedback == "implicit"
    assert catalog.event_weights == {"view": 1.0, "cart": 3.0, "purchase": 5.0}
    torch.testing.assert_close(loaded.item_popularity, learner.item_popularity)


def test_engine_equals_evaluation_with_the_same_negatives(served, shop_prepared):
    """Served scores = ``loop.predict_items`` on the same support: the negatives beside a
    support depend on the support alone, not on the batch or the user id."""
    learner, loaded, catalog = served
    tasks = from_table(shop_prepared.tasks("user_cold", "test")).select(torch.arange(5))
    n = len(catalog)
    expected = predict_items(learner, tasks, torch.arange(n).expand(5, n))
    jobs = []
    for t in range(5):
        m = tasks.support_mask[t]
        jobs.append(
            Job(
                items=tuple(tasks.support_items[t, m].tolist()),
                ratings=tuple(tasks.support_ratings[t, m].tolist()),
            )
        )
    results = Engine(loaded).run(jobs[::-1])  # another order
    got = torch.stack([r.scores for r in results])
    torch.testing.assert_close(got.flip(0), expected, rtol=1e-5, atol=1e-5)
    # A user's weights are their support's reach, never a tensor of the catalogue's size.
    graph = loaded.model.neighbour_index
    for job, r in zip(jobs[::-1], results, strict=True):
        assert "item_bias" not in r.weights
        reach = graph[list(job.items)].flatten().unique()
        assert torch.equal(r.weights["neighbour.items"], reach)
        assert max(w.numel() for w in r.weights.values()) == len(reach) < n


def test_events_become_strengths_and_the_other_kind_is_refused(served, tmp_path):
    service = _service(served, tmp_path)
    catalog = served[2]
    a, b = catalog.raw_ids[:2]
    req = RecommendRequest(
        events=[
            Event(item=a, event="view"),
            Event(item=a, event="purchase"),
            Event(item=b, value=2.5),
            Event(item=b, event="cart", value=2),
        ]
    )
    job = service.recommend_job(req)
    assert dict(zip(job.items, job.ratings, strict=True)) == {
        catalog.index[a]: 6.0,
        catalog.index[b]: 8.5,
    }
    cases = [
        (RecommendRequest(ratings=[Rating(item=a, rating=4)]), ("body", "ratings")),
        (RecommendRequest(events=[Event(item=a, event="click")]), ("body", "events", 0, "event")),
        (RecommendRequest(events=[Event(item=a)]), ("body", "events", 0)),
        (RecommendRequest(events=[Event(item="nope", value=1)]), ("body", "events", 0, "item")),
    ]
    for bad, loc in cases:
        with pytest.raises(FieldError) as e:
            service.recommend_job(bad)
        assert e.value.loc == loc, e.value.loc
    with pytest.raises(FieldError) as e:
        service.feedback_job("u", FeedbackRequest())
    assert e.value.loc == ("body", "events")


def test_sessions_add_events_up_and_rebuild_from_the_log(served, tmp_path):
    service = _service(served, tmp_path)
    catalog = served[2]
    item = catalog.raw_ids[3]
    for event in ("view", "cart", "purchase"):
        service.feedback_job("ann", FeedbackRequest(events=[Event(item=item, event=event)]))
    assert service.sessions.get("ann").ratings == {catalog.index[item]: 9.0}
    service.feedback_log.close()
    rebuilt = Sessions(tmp_path, max_sessions=4, max_ratings=50, index=catalog.index, implicit=True)
    assert rebuilt.get("ann").ratings == {catalog.index[item]: 9.0}
    # a model trained on ratings replays none of these strengths
    assert (
        Sessions(tmp_path, max_sessions=4, max_ratings=50, index=catalog.index).get("ann") is None
    )


def test_implicit_onboarding_spans_the_categories(served):
    catalog = served[2]
    picked = catalog.onboarding(20)
    assert len(set(picked)) == 20

    def categories(items: list[int]) -> int:
        return len({g for i in items for g in catalog.genres[i] if g.startswith("category:")})

    best_sellers = torch.topk(catalog.item_count, 20).indices.tolist()
    assert categories(picked) >= 18  # of the shop's 20 categories
    assert categories(picked) > categories(best_sellers)  # which crowd into fewer
    assert picked[0] == best_sellers[0]


def test_the_openapi_examples_of_an_implicit_model_are_valid_requests(served, tmp_path):
    service = _service(served, tmp_path)
    examples = service.request_examples()
    assert examples["RecommendRequest"]["events"][0]["event"] == "purchase"
    job = service.recommend_job(RecommendRequest(**examples["RecommendRequest"]))
    assert len(job.items) == 2
    service.feedback_job("ex", FeedbackRequest(**examples["FeedbackRequest"]))


def test_two_stage_top_is_the_exact_ranking_when_the_score_is_an_inner_product(served):
    """No user features and only the head adapted: the retrieval score is the network's
    score, the per-user neighbourhood term included, so the exact search's 10 candidates
    are the full ranking's top 10."""
    full, two = _two_stage(served, ann=False)
    for f, t in zip(full, two, strict=True):
        best = f.scores.topk(10)
        assert t.items.tolist() == best.indices.tolist()
        torch.testing.assert_close(t.scores, best.values, rtol=1e-5, atol=1e-5)


def test_two_stage_with_an_ann_index_re_ranks_with_the_network(served):
    """An IVF index probing every list, plus every item the support's neighbour graph
    reaches (where the per-user term differs from its constant), re-ranked with the
    network's exact score: with a positive neighbourhood weight, the full ranking's top."""
    full, two = _two_stage(served, ann=True)
    positive = 0
    for f, t in zip(full, two, strict=True):
        torch.testing.assert_close(t.scores, f.scores[t.items], rtol=1e-5, atol=1e-5)
        assert t.scores.tolist() == sorted(t.scores.tolist(), reverse=True)
        if float(t.weights["head.neighbour"]) > 0:  # else neighbours may fall below the rest
            positive += 1
            assert t.items.tolist() == f.scores.topk(10).indices.tolist()
    assert positive >= 1


def _two_stage(served, *, ann: bool):
    from metarec.sections import RetrievalConfig

    _, loaded, catalog = served
    a, b, c = (catalog.index[i] for i in catalog.raw_ids[:3])
    jobs = [Job(), Job(items=(a, b), ratings=(5.0, 1.0)), Job(items=(c,), ratings=(3.0,))]
    settings = RetrievalConfig(
        full_below=0, ann_above=0 if ann else 10**9, candidates=10, nprobe=10**6
    )
    engine = Engine(loaded, retrieval=settings)
    assert engine.retriever is not None and (engine.retriever.index is not None) == ann
    two = engine.run([dataclasses.replace(j, top=10) for j in jobs])
    return Engine(loaded).run(jobs), two


def test_an_explanation_is_the_drop_without_that_event(served, shop_prepared, tmp_path):
    """Implicit supports carry negatives drawn by the support itself: a contribution must
    still be exactly what a request without that event scores (its own negatives)."""
    service = _service(served, tmp_path)
    catalog = served[2]
    tasks = from_table(shop_prepared.tasks("user_cold", "test")).select(torch.arange(4))
    for t in range(4):
        m = tasks.support_mask[t]
        items, values = tasks.support_items[t, m][:6], tasks.support_ratings[t, m][:6]
        events = [
            Event(item=catalog.raw_ids[i], value=v)
            for i, v in zip(items.tolist(), values.tolist(), strict=True)
        ]
        req = RecommendRequest(events=events, k=2, explain=True)
        job = service.recommend_job(req)
        (result,) = service.engine.run([job])
        best = service.recommend_response(req, job, result)["items"][0]
        row = int((result.explained == catalog.index[best["item"]]).nonzero()[0, 0])
        for s, contribution in enumerate(result.influence[row].tolist()):
            fewer = PredictRequest(events=events[:s] + events[s + 1 :], items=[best["item"]])
            again = service.predict_job(fewer)
            (alone,) = service.engine.run([again])
            assert best["score"] - float(alone.scores[0]) == pytest.approx(contribution, abs=1e-4)


def test_a_batch_in_parts_scores_as_one_batch(served):
    """A catalogue too large for a batch's per-user rows is scored a few users at a time;
    a top from an index holds no such row and is not split. Either way each user's answer
    is the one a batch of one gives, with supports of different reach stacked together."""
    from metarec.sections import RetrievalConfig

    _, loaded, catalog = served
    a, b, c, d = (catalog.index[i] for i in catalog.raw_ids[:4])
    jobs = [
        Job(items=(a, b, c), ratings=(5.0, 1.0, 2.0)),
        Job(),
        Job(items=(d,), ratings=(3.0,)),
        Job(items=(a, d), ratings=(1.0, 1.0)),
    ]
    ann = RetrievalConfig(full_below=0, ann_above=0, candidates=10, nprobe=10**6)
    one_user = len(catalog)  # max_user_items: parts of one user where a part holds rows
    for retrieval, top, most in ((None, 0, 1 << 22), (None, 0, one_user), (ann, 10, one_user)):
        asked = [dataclasses.replace(j, top=top) for j in jobs]
        alone = [Engine(loaded, retrieval=retrieval).run([j])[0] for j in asked]
        parts = Engine(loaded, retrieval=retrieval, max_user_items=most).run(asked)
        for one, part in zip(alone, parts, strict=True):
            torch.testing.assert_close(part.scores, one.scores, rtol=1e-5, atol=1e-5)
            if top:
                assert part.items.tolist() == one.items.tolist()
