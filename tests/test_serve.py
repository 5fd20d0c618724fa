"""The real thing: `metarec serve` (Ray Serve + FastAPI) over HTTP on 127.0.0.1.

One trained synthetic model, one server process (its own local Ray, stopped by pid), every
endpoint, the bearer token, bad input (4xx naming the field, never 5xx), a schemathesis fuzz
run against the OpenAPI schema, taste following feedback, served numbers equal to
``adapt()`` + scoring called directly, and a crash-restart that loses no feedback.
"""

from __future__ import annotations

import re
import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from metarec.batch import TaskBatch, from_table
from metarec.checkpoint import (
    learner_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from metarec.loop import predict_items
from metarec.serving.sessions import read_feedback
from tests.ci import require_module
from tests.processes import is_loopback, listening_sockets
from tests.serve_process import Server, trained_checkpoint

TOKEN = secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
pytestmark = pytest.mark.integration  # a `metarec serve` process with its own Ray


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_cfg, synthetic_prepared):
    """A meta-trained (10 epochs, ~10 s) model with its catalog, as `metarec train` saves."""
    ckpt = trained_checkpoint(synthetic_cfg, synthetic_prepared)
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-work")


@pytest.fixture(scope="module")
def server(checkpoint, work):
    holder = {"server": Server(checkpoint, work, token=TOKEN)}
    yield holder
    holder["server"].stop()


def post(server, path, body, **kw):
    return requests.post(f"{server['server'].url}{path}", json=body, headers=AUTH, timeout=30, **kw)


def get(server, path, **kw):
    return requests.get(f"{server['server'].url}{path}", headers=AUTH, timeout=30, **kw)


def test_api_docs_load_with_no_external_url(server):
    base = server["server"].url
    html = requests.get(f"{base}/docs", timeout=10).text
    assert "SwaggerUIBundle" in html and "http://" not in html and "https://" not in html
    for asset in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert requests.get(f"{base}{asset}", timeout=10).status_code == 200, asset


def test_metarec_serve_and_its_own_ray_listen_on_loopback_only(server):
    sockets = listening_sockets(server["server"].proc.pid)
    names = {name for name, *_ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the Ray that `metarec serve` started
    assert server["server"].port in {port for *_, port in sockets}
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond 127.0.0.1: {exposed}"


def test_openapi_examples_are_real_requests(server):
    schemas = get(server, "/openapi.json").json()["components"]["schemas"]
    for name, path in (("RecommendRequest", "/v1/recommend"), ("PredictRequest", "/v1/predict")):
        (example,) = schemas[name]["examples"]
        assert post(server, path, example).status_code == 200, (name, example)


def test_every_endpoint_answers(server, checkpoint, synthetic_prepared):
    assert requests.get(f"{server['server'].url}/healthz", timeout=5).json() == {"status": "ok"}
    model = get(server, "/v1/model").json()
    assert model["uri"] == str(checkpoint) and model["items"] == 300
    assert model["dataset"]["dataset_hash"] == synthetic_prepared.manifest["dataset_hash"]
    onboarding = get(server, "/v1/onboarding", params={"n": 5}).json()
    assert len(onboarding["items"]) == 5 and "Rashid" in onboarding["rule"]
    first = onboarding["items"][0]
    assert {"item", "title", "genres", "year"} <= set(first)
    word = first["title"].split()[0].upper()  # any case finds it
    found = get(server, "/v1/items", params={"q": word, "n": 300}).json()["items"]
    assert first["item"] in {x["item"] for x in found}
    assert all(word.casefold() in x["title"].casefold() for x in found)
    pred = post(server, "/v1/predict", {"items": [first["item"]]}).json()["predictions"]
    assert pred[0]["title"] == first["title"] and set(pred[0]) >= {"item", "genres", "score"}

    cold = post(server, "/v1/recommend", {"k": 4}).json()  # no ratings: the meta-init answers
    assert cold["adapted_on"] == 0 and len(cold["items"]) == 4
    rated = [{"item": x["item"], "rating": 5} for x in onboarding["items"]]
    warm = post(server, "/v1/recommend", {"ratings": rated, "k": 4, "user": {"age": 30}})
    assert warm.status_code == 200 and warm.json()["adapted_on"] == 5
    assert not {x["item"] for x in warm.json()["items"]} & {r["item"] for r in rated}
    seen = post(server, "/v1/recommend", {"ratings": rated, "k": 300, "exclude_seen": False})
    assert len(seen.json()["items"]) == 300
    cands = [x["item"] for x in cold["items"][:3]]
    ranked = post(server, "/v1/recommend", {"k": 10, "candidates": cands}).json()["items"]
    assert sorted(x["item"] for x in ranked) == sorted(cands)

    pred = post(server, "/v1/predict", {"ratings": rated, "items": cands}).json()
    assert [p["item"] for p in pred["predictions"]] == cands

    fb = post(server, "/v1/users/ann/feedback", {"ratings": rated[:2], "k": 3})
    assert fb.status_code == 200 and fb.json()["adapted_on"] == 2
    again = get(server, "/v1/users/ann/recommendations", params={"k": 3}).json()
    assert again["items"] == fb.json()["items"]  # from the cached fast weights
    new = get(server, "/v1/users/nobody-yet/recommendations", params={"k": 4}).json()
    assert new["adapted_on"] == 0 and new["items"] == cold["items"]

    url = server["server"].url
    assert requests.post(f"{url}/v1/recommend", json={}, timeout=5).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert requests.get(f"{url}/v1/model", headers=wrong, timeout=5).status_code == 401
    assert requests.get(f"{url}/openapi.json", timeout=5).status_code == 200  # schema is public


def test_served_predictions_equal_adapt_and_scoring_called_directly(
    server, checkpoint, synthetic_prepared
):
    learner = learner_from_checkpoint(load_checkpoint(checkpoint))
    tasks = from_table(synthetic_prepared.tasks("user_cold", "test")).select(torch.arange(12))
    raw = synthetic_prepared.items().column("raw_id").to_pylist()
    n_items = len(raw)

    def body(t: int) -> dict:
        m = tasks.support_mask[t]
        ratings = [
            {"item": raw[i], "rating": r}
            for i, r in zip(
                tasks.support_items[t, m].tolist(),
                tasks.support_ratings[t, m].tolist(),
                strict=True,
            )
        ]
        return {"user": user_features(t), "ratings": ratings[:50], "items": raw}

    table, vocab = learner.model.user_table, synthetic_prepared.manifest["vocab"]
    ages = [None, 15, 20, 30, 40, 47, 52, 60]  # one age inside each age bucket

    def user_features(t: int) -> dict:
        """The raw features a client would send for this test user."""
        age, gender, occupation, zip_code = table[tasks.users[t]].tolist()
        return {
            "age": ages[age],
            "gender": vocab["gender"][gender] if gender else None,
            "occupation": vocab["occupation"][occupation] if occupation else None,
            "zip": str(zip_code - 1) if zip_code else None,
        }

    cut = _cut_support(tasks, 50)
    expected = predict_items(learner, cut, torch.arange(n_items).expand(12, n_items))
    # Concurrent requests: adapted together in micro-batches, each must get its own answer.
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda t: post(server, "/v1/predict", body(t)).json(), range(12)))
    got = torch.tensor([[p["score"] for p in a["predictions"]] for a in answers])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _cut_support(tasks: TaskBatch, n: int) -> TaskBatch:
    keep = tasks.support_mask.cumsum(1) <= n
    return TaskBatch(**{**tasks.__dict__, "support_mask": tasks.support_mask & keep})


def test_recommendations_move_toward_a_stated_taste(server, synthetic_prepared):
    """Per genre: a user rates 10 of its items 5 and 10 others 1; where do the genre's unseen
    items rank among all 300, before (cold start) and after the feedback?"""
    items = synthetic_prepared.items()
    vocab = synthetic_prepared.manifest["vocab"]["genre"]
    raw = items.column("raw_id").to_pylist()
    genres = [[vocab[g] for g in gs] for gs in items.column("genres").to_pylist()]
    cold = get(server, "/v1/users/cold/recommendations", params={"k": 300}).json()["items"]
    before, after = [], []
    for g in vocab[1:]:
        has = [g in gs for gs in genres]
        liked = [r for r, h in zip(raw, has, strict=True) if h][:10]
        other = [r for r, h in zip(raw, has, strict=True) if not h][:10]
        ratings = [{"item": i, "rating": 5} for i in liked] + [
            {"item": i, "rating": 1} for i in other
        ]
        fb = post(
            server,
            f"/v1/users/taste-{g.replace(chr(39), '')}/feedback",
            {"ratings": ratings, "k": 300},
        )
        assert fb.status_code == 200, fb.text
        unseen = {r for r, h in zip(raw, has, strict=True) if h} - set(liked)

        def percentile(ranking: list[dict], unseen=unseen) -> float:
            order = [x["item"] for x in ranking]
            return sum(order.index(i) / len(order) for i in unseen) / len(unseen)

        before.append(percentile([x for x in cold if x["item"] not in set(liked + other)]))
        after.append(percentile(fb.json()["items"]))
    moved = torch.tensor(before) - torch.tensor(after)  # > 0: ranked higher after feedback
    print(f"taste: mean percentile gain {moved.mean():.3f}, {int((moved > 0).sum())}/18 genres")
    assert moved.mean() > 0.05, moved
    assert (moved > 0).float().mean() >= 2 / 3, moved


BAD = [
    ("post", "/v1/recommend", {"ratings": [{"item": "no-such-item", "rating": 3}]}, "item"),
    ("post", "/v1/recommend", {"ratings": [{"item": "1", "rating": 7}]}, "rating"),
    ("post", "/v1/recommend", {"ratings": [{"item": "1", "rating": "high"}]}, "rating"),
    ("post", "/v1/recommend", {"ratings": [{"item": "1", "rating": 3}] * 51}, "ratings"),
    ("post", "/v1/recommend", {"k": 0}, "k"),
    ("post", "/v1/recommend", {"k": 1001}, "k"),
    ("post", "/v1/recommend", {"user": {"gender": "X", "occupation": "astronaut"}}, "user"),
    ("post", "/v1/recommend", {"user": {"age": -3}}, "age"),
    ("post", "/v1/recommend", {"kk": 3}, "kk"),
    ("post", "/v1/recommend", {"events": [{"item": "1", "event": "view"}]}, "events"),
    ("post", "/v1/predict", {"items": []}, "items"),
    ("post", "/v1/users/bob/feedback", {"ratings": []}, "ratings"),
    ("get", "/v1/users/bob/recommendations?k=-1", None, "k"),
    ("get", "/v1/onboarding?n=abc", None, "n"),
    ("get", "/v1/items?q=", None, "q"),
    ("get", "/v1/items", None, "q"),
    ("get", "/v1/items?q=a&n=0", None, "n"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), BAD)
def test_bad_input_is_a_4xx_naming_the_field(server, method, path, body, field):
    r = post(server, path, body) if method == "post" else get(server, path)
    assert r.status_code == 422, r.text
    assert any(field in map(str, e["loc"]) for e in r.json()["detail"]), r.text


def test_malformed_json_nan_and_huge_bodies_are_4xx(server):
    url = f"{server['server'].url}/v1/recommend"
    headers = {**AUTH, "Content-Type": "application/json"}
    for data in ('{"ratings": [', '{"ratings": [{"item": "1", "rating": NaN}]}', "[]", "null"):
        r = requests.post(url, data=data, headers=headers, timeout=10)
        assert r.status_code == 422, (data, r.text)
    r = requests.post(url, data=b" " * (5 << 20), headers=headers, timeout=30)
    assert r.status_code == 413


def test_fuzzing_the_openapi_schema_finds_no_server_error(server):
    schemathesis = require_module("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    url = server["server"].url
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    tried, errors = [], []
    for op in schema.get_all_operations():
        operation = op.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # derandomize (and the rest) comes from the profile tests/conftest.py loads
            @settings(
                max_examples=50,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(mode))
            def run(case):
                response = case.call(base_url=url, headers=AUTH, timeout=30)
                tried.append(response.status_code)
                if response.status_code >= 500:
                    errors.append((case.method, case.formatted_path, case.body, response.text))

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (e.g. GET /healthz, no params)
                assert mode == GenerationMode.NEGATIVE
    print(f"schemathesis: {len(tried)} requests, {len(errors)} server errors")
    assert len(tried) >= 200 and not errors, errors[:3]


def test_feedback_survives_a_crash_and_restart(server, checkpoint, work):
    user, n = "crash-test", 8
    raw = [x["item"] for x in get(server, "/v1/onboarding", params={"n": n}).json()["items"]]
    for k, item in enumerate(raw):  # one event per request: each acknowledged one must stay
        r = post(
            server, f"/v1/users/{user}/feedback", {"ratings": [{"item": item, "rating": 1 + k % 5}]}
        )
        assert r.status_code == 200
    before = get(server, f"/v1/users/{user}/recommendations", params={"k": 10}).json()
    server["server"].stop(crash=True)  # SIGKILL: no shutdown hook runs
    logged = [e for _, _, e in read_feedback(work / "feedback") if e["user_id"] == user]
    assert [e["item"] for e in logged] == raw

    server["server"] = Server(checkpoint, work, token=TOKEN)  # restart on the same log
    after = get(server, f"/v1/users/{user}/recommendations", params={"k": 10}).json()
    assert after["adapted_on"] == n
    assert [x["item"] for x in after["items"]] == [x["item"] for x in before["items"]]
    for a, b in zip(after["items"], before["items"], strict=True):
        assert abs(a["score"] - b["score"]) < 1e-5


def test_the_shipped_serve_config_runs_with_serve_run(checkpoint, tmp_path):
    """`serve run serve/config.yaml`: the YAML's args validate, build_app loads the model,
    the deployment's default batching applies, and the token from the environment is enforced."""
    server = Server(checkpoint, tmp_path, token=TOKEN, yaml=True)
    try:
        r = requests.post(f"{server.url}/v1/recommend", json={"k": 3}, headers=AUTH, timeout=30)
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        assert requests.get(f"{server.url}/v1/model", timeout=10).status_code == 401
        model = requests.get(f"{server.url}/v1/model", headers=AUTH, timeout=10).json()
        assert model["uri"] == str(checkpoint) and model["limits"]["max_k"] == 100
    finally:
        server.stop()


def test_serve_run_args_are_the_config_serve_section_checked_like_any_config():
    """`serve run`'s args: a misspelt key names itself and the known ones; the address
    belongs to http_options; batching and replicas set there shape the deployment."""
    from metarec.errors import ConfigError
    from metarec.serving.app import build_app

    with pytest.raises(ConfigError, match=r"serve.max_sesions: unknown config key; expected one"):
        build_app({"max_sesions": 10})
    with pytest.raises(ConfigError, match=r"serve.limits.max_k: got 0; expected an int >= 1"):
        build_app({"limits": {"max_k": 0}})
    with pytest.raises(ConfigError, match=r"serve.port: .* http_options.port"):
        build_app({"port": 9000})
    deployment = build_app({"replicas": 2, "max_batch_size": 8})._bound_deployment  # no public view
    assert deployment.num_replicas == 2
    assert deployment.user_config["max_batch_size"] == 8
