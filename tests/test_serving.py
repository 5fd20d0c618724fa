"""The serving core without Ray or HTTP: engine, catalog, sessions and feedback log, service.

The engine must give exactly what evaluation measures (``loop.predict_items``: the same
``adapt`` + forward), for brand-new users whose features are not in the model's tables,
with any mix of support sizes (zero = cold start) and with cached fast weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import replace

import pytest
import torch

from metarec.batch import from_table
from metarec.catalog import Catalog, FieldError
from metarec.checkpoint import learner_from_checkpoint, standalone_checkpoint
from metarec.initialise import build_learner
from metarec.loop import predict_items
from metarec.sections import LimitsConfig
from metarec.serving.engine import Engine, Job
from metarec.serving.schemas import PredictRequest, Rating, RecommendRequest
from metarec.serving.service import Service
from metarec.serving.sessions import FeedbackLog, Session, Sessions, read_feedback


@pytest.fixture(scope="module")
def served(synthetic_cfg, synthetic_prepared):
    """An (untrained) learner rebuilt from a checkpoint, as a server loads it."""
    ds = synthetic_prepared
    train = from_table(ds.tasks("user_cold", "train"))
    learner = build_learner(synthetic_cfg, ds, train)
    ckpt = standalone_checkpoint(synthetic_cfg, learner, ds, train)
    loaded = learner_from_checkpoint(ckpt, best=False)
    catalog = Catalog.from_checkpoint(ckpt, loaded.model.item_genres, loaded.model.item_year)
    return learner, loaded, catalog


def _jobs_for(tasks, user_table, support_sizes):
    jobs = []
    for t, n in enumerate(support_sizes):
        m = tasks.support_mask[t].nonzero().flatten()[:n]
        jobs.append(
            Job(
                features=tuple(user_table[tasks.users[t]].tolist()),
                items=tuple(tasks.support_items[t, m].tolist()),
                ratings=tuple(tasks.support_ratings[t, m].tolist()),
            )
        )
    return jobs


def test_engine_equals_adapt_and_score_of_evaluation(served, synthetic_prepared):
    learner, loaded, catalog = served
    tasks = from_table(synthetic_prepared.tasks("user_cold", "test")).select(torch.arange(6))
    sizes = [0, 1, 3, 100, 5, 2]  # cold start, tiny, and a full support set, in one batch
    jobs = _jobs_for(tasks, learner.model.user_table, sizes)
    # The reference: the training-side learner with each task's support cut to the same size.
    keep = torch.arange(tasks.support_mask.shape[1])[None] < torch.tensor(sizes)[:, None]
    cut = tasks.select(torch.arange(6))
    cut = type(cut)(**{**cut.__dict__, "support_mask": cut.support_mask & keep})
    n = len(catalog)
    expected = predict_items(learner, cut, torch.arange(n).expand(6, n))

    engine = Engine(loaded)
    results = engine.run(jobs)
    got = torch.stack([r.scores for r in results])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cached = engine.run(
        [Job(features=j.features, weights=r.weights) for j, r in zip(jobs, results, strict=True)]
    )
    torch.testing.assert_close(torch.stack([r.scores for r in cached]), got, rtol=0, atol=0)
    # Bounded memory: scoring in item blocks gives the same numbers.
    small = Engine(loaded, max_rows=37)
    torch.testing.assert_close(torch.stack([r.scores for r in small.run(jobs)]), got)


def test_new_user_features_matter_and_unknown_values_are_errors(served):
    _, loaded, catalog = served
    occupations = catalog.vocab["occupation"][1:]
    a = catalog.encode_user({"age": 23, "gender": "f", "occupation": occupations[0].upper()})
    assert a[0] == 2 and catalog.vocab["gender"][a[1]] == "F"  # 18-24; case-normalised
    assert catalog.vocab["occupation"][a[2]] == occupations[0]
    assert catalog.encode_user(None) == [0, 0, 0, 0]  # all unknown
    assert catalog.encode_user({"zip": "55455"})[3] == 6  # first digit 5 -> code 6
    with pytest.raises(FieldError, match="unknown value 'astronaut'") as e:
        catalog.encode_user({"occupation": "astronaut"})
    assert e.value.loc == ("user", "occupation")
    b = catalog.encode_user({"age": 70, "gender": "m", "occupation": occupations[-1]})
    loaded = copy.deepcopy(loaded)
    with torch.no_grad():  # an untrained ridge head starts at zero weight: MF fold-in
        loaded.model.head["weight"].normal_(generator=torch.Generator().manual_seed(0))
    engine = Engine(loaded)
    ra, rb = engine.run([Job(features=tuple(a)), Job(features=tuple(b))])
    assert not torch.equal(ra.scores, rb.scores)  # features reach the prediction


def test_onboarding_prefers_popular_disputed_items(served):
    _, _, catalog = served
    picked = catalog.onboarding(10)
    score = torch.log1p(catalog.item_count) * catalog.item_std
    assert len(picked) == 10 and len(set(picked)) == 10
    assert (catalog.item_count[picked] >= 5).all()
    eligible = score.masked_fill(catalog.item_count < 5, -1)
    assert score[picked].min() >= eligible.sort(descending=True).values[9] - 1e-9


def test_feedback_log_is_durable_and_a_torn_line_is_cut(tmp_path):
    log = FeedbackLog(tmp_path, "r1")
    log.append([{"user_id": "u", "item": "1", "rating": 4.0}])
    log.append(
        [{"user_id": "u", "item": "2", "rating": 2.0}, {"user_id": "v", "item": "1", "rating": 5.0}]
    )
    log.close()
    with open(log.path, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"user_id": "u", "ite')
    assert [e["item"] for _, _, e in read_feedback(tmp_path)] == ["1", "2", "1"]
    again = FeedbackLog(tmp_path, "r1")  # reopening cuts the torn tail, appends cleanly
    again.append([{"user_id": "w", "item": "3", "rating": 1.0}])
    again.close()
    lines = log.path.read_bytes().splitlines()
    assert [json.loads(x)["user_id"] for x in lines] == ["u", "u", "v", "w"]


def test_sessions_rebuild_from_the_log_after_restart_and_eviction(tmp_path):
    index = {str(i): i for i in range(10)}
    log = FeedbackLog(tmp_path, "a")
    events = [("u", "1", 4.0), ("v", "2", 5.0), ("u", "3", 1.0), ("u", "1", 2.0), ("w", "4", 3)]
    log.append([{"user_id": u, "item": i, "rating": r} for u, i, r in events])
    log.close()
    # A restart with room for two sessions: the two most recently active are replayed.
    sessions = Sessions(tmp_path, max_sessions=2, max_ratings=50, index=index)
    assert len(sessions) == 2
    u = sessions.get("u")
    assert u is not None and u.ratings == {3: 1.0, 1: 2.0}  # re-rated item: latest wins
    v = sessions.get("v")  # evicted at start: rebuilt from the log on demand
    assert v is not None and v.ratings == {2: 5.0}
    assert sessions.get("nobody") is None
    s = Session()
    s.add([1, 2, 3], [1.0, 2.0, 3.0], max_ratings=2)
    assert s.ratings == {2: 2.0, 3: 3.0} and s.version == 1  # the most recent are kept


def test_the_log_rotates_segments_and_replays_them_in_order(tmp_path):
    log = FeedbackLog(tmp_path, "r1", segment_bytes=80)
    for k in range(6):  # 40 bytes a line: a new segment every 2 appends
        log.append([{"user_id": "u", "item": str(k), "rating": 1.0 + k % 5}])
    log.close()
    names = sorted(p.name for p in tmp_path.glob("feedback-*"))
    assert names == ["feedback-r1+000001.jsonl", "feedback-r1+000002.jsonl", "feedback-r1.jsonl"]
    assert [e["item"] for _, _, e in read_feedback(tmp_path)] == [str(k) for k in range(6)]
    again = FeedbackLog(tmp_path, "r1", segment_bytes=80)  # reopens the last segment
    assert again.path.name == "feedback-r1+000002.jsonl"
    again.close()


def test_an_evicted_session_is_rebuilt_from_its_own_lines_not_a_rescan(tmp_path, monkeypatch):
    import metarec.serving.sessions as sessions_module

    index = {str(i): i for i in range(10)}
    log = FeedbackLog(tmp_path, "a", segment_bytes=120)
    for u, i, r in [("u", "1", 4.0), ("v", "2", 5.0), ("u", "3", 1.0), ("w", "4", 3.0)]:
        log.append([{"user_id": u, "item": i, "rating": r}])
    sessions = Sessions(tmp_path, max_sessions=1, max_ratings=50, index=index)

    def rescan(*args):
        raise AssertionError("the whole log was read again")

    monkeypatch.setattr(sessions_module, "scan_feedback", rescan)
    # feedback after the start, into a new segment, goes into the index too
    where = log.append([{"user_id": "u", "item": "5", "rating": 2.0}])
    u = sessions.get("u")
    u.add([5], [2.0], max_ratings=50)
    sessions.record("u", u, where)
    assert sessions.get("w").ratings == {4: 3.0}  # evicts u
    assert sessions.get("u").ratings == {1: 4.0, 3: 1.0, 5: 2.0}
    assert sessions.get("v").ratings == {2: 5.0}
    log.close()


def test_appends_from_threads_never_interleave_and_their_offsets_are_their_lines(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    log = FeedbackLog(tmp_path, "t", segment_bytes=1 << 30)
    batches = [
        [{"user_id": f"u{k}", "item": str(j), "rating": 3.0} for j in range(3)] for k in range(40)
    ]
    with ThreadPoolExecutor(8) as pool:
        written = list(pool.map(log.append, batches))
    log.close()
    data = log.path.read_bytes()
    for batch, (path, offsets) in zip(batches, written, strict=True):
        assert path == log.path
        got = [json.loads(data[o : data.index(b"\n", o)]) for o in offsets]
        assert got == batch


def _service(tmp_path, catalog, loaded, **limits):
    return Service(
        Engine(loaded),
        catalog,
        model_info={"label": "m"},
        limits=LimitsConfig(**limits),
        sessions=Sessions(tmp_path, max_sessions=10, max_ratings=5, index=catalog.index),
        feedback=FeedbackLog(tmp_path, "t"),
    )


def test_service_rejects_bad_requests_naming_the_field(tmp_path, served):
    _, loaded, catalog = served
    svc = _service(tmp_path, catalog, loaded, max_ratings=3, max_k=20)
    item = catalog.raw_ids[0]

    def req(**kw):
        return RecommendRequest(**kw)

    cases = [
        (req(ratings=[Rating(item="nope", rating=3)]), ("body", "ratings", 0, "item"), "unknown"),
        (req(ratings=[Rating(item=item, rating=9)]), ("body", "ratings", 0, "rating"), "outside"),
        (req(ratings=[Rating(item=item, rating=3)] * 4), ("body", "ratings"), "at most 3"),
        (req(k=21), ("body", "k"), "limit 20"),
        (req(candidates=[item, "nope"]), ("body", "candidates", 1), "unknown"),
    ]
    for request, loc, msg in cases:
        with pytest.raises(FieldError, match=msg) as e:
            svc.recommend_job(request)
        assert e.value.loc == loc
    other = catalog.raw_ids[1]
    twice = [Rating(item=item, rating=1), Rating(item=other, rating=4), Rating(item=item, rating=5)]
    job = svc.recommend_job(req(ratings=twice))  # a re-rated item keeps its latest rating
    assert job.items == (0, 1) and job.ratings == (5.0, 4.0)


def test_recommendations_respect_exclusions_and_candidates(tmp_path, served):
    _, loaded, catalog = served
    svc = _service(tmp_path, catalog, loaded, max_k=len(catalog))
    rated = catalog.raw_ids[:5]
    request = RecommendRequest(ratings=[Rating(item=i, rating=5) for i in rated], k=len(catalog))
    job = svc.recommend_job(request)
    (result,) = svc.engine.run([job])
    out_all = svc.recommend_response(request, job, result)["items"]
    ids = [x["item"] for x in out_all]
    assert len(ids) == len(catalog) - 5 and not set(ids) & set(rated)
    scores = [x["score"] for x in out_all]
    assert scores == sorted(scores, reverse=True)
    some = catalog.raw_ids[3:9]
    request = RecommendRequest(ratings=request.ratings, k=100, candidates=some)
    job = svc.recommend_job(request)
    (result,) = svc.engine.run([job])
    assert len(result.scores) == len(some)  # the candidates are scored, nothing else
    out = svc.recommend_response(request, job, result)
    got = [x["item"] for x in out["items"]]
    assert got == [i for i in ids if i in some]  # 5..8 only, in the whole ranking's order
    assert [x["score"] for x in out["items"]] == pytest.approx(
        [x["score"] for x in out_all if x["item"] in some], rel=1e-6
    )


def test_feedback_is_on_disk_before_the_answer(tmp_path, served):
    _, loaded, catalog = served
    svc = _service(tmp_path, catalog, loaded)
    from metarec.serving.schemas import FeedbackRequest

    item = catalog.raw_ids[7]
    job, session, version = svc.feedback_job(
        "alice", FeedbackRequest(ratings=[Rating(item=item, rating=4.5)], user={"age": 30})
    )
    (event,) = [e for _, _, e in read_feedback(tmp_path)]
    assert event["user_id"] == "alice" and event["item"] == item and event["rating"] == 4.5
    assert event["user"] == {"age": 30.0} and os.path.getsize(svc.feedback_log.path) > 0
    (result,) = svc.engine.run([job])
    svc.session_response("alice", session, version, job, result, 3)
    assert session.weights is not None  # cached: the next GET skips adaptation
    again, _, _ = svc.session_job("alice", 3)
    assert again.weights is session.weights


def test_search_finds_titles_by_every_word_most_rated_first(tmp_path, served):
    _, loaded, catalog = served
    svc = _service(tmp_path, catalog, loaded, max_k=len(catalog))
    title = catalog.titles[7]
    words = title.split()
    out = svc.search(" ".join(w.upper() for w in words), len(catalog))
    assert 7 in [catalog.index[x["item"]] for x in out["items"]]
    counts = [int(catalog.item_count[catalog.index[x["item"]]]) for x in out["items"]]
    assert counts == sorted(counts, reverse=True)
    assert svc.search("no title has this", 5)["items"] == []
    with pytest.raises(FieldError, match="limit"):
        svc.search("a", len(catalog) + 1)


def test_two_stage_re_ranks_with_the_adapted_network(served, synthetic_prepared):
    """With user features the inner product is only the first stage; the returned scores
    are the network's, and with every item a candidate the ranking is the full one."""
    from metarec.sections import RetrievalConfig

    learner, loaded, catalog = served
    tasks = from_table(synthetic_prepared.tasks("user_cold", "test")).select(torch.arange(3))
    jobs = [
        dataclasses.replace(j, top=10)
        for j in _jobs_for(tasks, learner.model.user_table, [0, 4, 20])
    ]
    full = Engine(loaded).run(jobs)
    for candidates in (10, len(catalog)):
        engine = Engine(loaded, retrieval=RetrievalConfig(full_below=0, candidates=candidates))
        for f, t in zip(full, engine.run(jobs), strict=True):
            torch.testing.assert_close(t.scores, f.scores[t.items], rtol=1e-5, atol=1e-5)
            if candidates == len(catalog):
                assert t.items.tolist() == f.scores.topk(10).indices.tolist()


def test_explanations_are_what_removing_the_rating_does(tmp_path, served, synthetic_prepared):
    """Faithful by measurement, not by construction: each reason's contribution equals the
    drop of the item's score when a separate ``/v1/predict``-style request leaves that
    rating out, and leaving out the top reason lowers the item's score more than leaving
    out a random rating, on average over users."""
    _, loaded, catalog = served
    svc = _service(tmp_path, catalog, loaded, max_k=len(catalog), max_ratings=100)
    tasks = from_table(synthetic_prepared.tasks("user_cold", "test"))
    gen = torch.Generator().manual_seed(0)
    raw = catalog.raw_ids

    def score(ratings, item):
        req = PredictRequest(ratings=ratings, items=[item])
        job = svc.predict_job(req)
        return svc.predict_response(job, svc.engine.run([job])[0])["predictions"][0]["score"]

    top_drops, random_drops, reasons = [], [], 0
    for t in range(min(40, tasks.num_tasks)):
        m = tasks.support_mask[t].nonzero().flatten()[:8]
        support = [int(i) for i in tasks.support_items[t, m]]
        values = tasks.support_ratings[t, m].tolist()
        ratings = [Rating(item=raw[i], rating=r) for i, r in zip(support, values, strict=True)]
        req = RecommendRequest(ratings=ratings, k=3, explain=True)
        job = svc.recommend_job(req)
        (result,) = svc.engine.run([job])
        answer = svc.recommend_response(req, job, result)["items"]
        plain = svc.recommend_response(req, job, svc.engine.run([replace(job, explain=False)])[0])
        assert [a["item"] for a in answer] == [a["item"] for a in plain["items"]]
        first = answer[0]
        row = int((result.explained == catalog.index[first["item"]]).nonzero()[0, 0])
        influence = result.influence[row]
        top = int(influence.argmax())
        drop = first["score"] - score(_without(ratings, top), first["item"])
        assert drop == pytest.approx(float(influence[top]), abs=1e-4)
        for reason in first["because"]:  # every reason named is a real removal effect
            s = support.index(catalog.index[reason["item"]])
            assert reason["contribution"] > 0
            assert first["score"] - score(_without(ratings, s), first["item"]) == pytest.approx(
                reason["contribution"], abs=1e-4
            )
        reasons += len(first["because"])
        top_drops.append(drop)
        s = int(torch.randint(len(support), (1,), generator=gen))
        random_drops.append(first["score"] - score(_without(ratings, s), first["item"]))
    assert reasons > 0
    assert sum(top_drops) / len(top_drops) > sum(random_drops) / len(random_drops) + 1e-3


def _without(ratings: list, s: int) -> list:
    return [r for k, r in enumerate(ratings) if k != s]
