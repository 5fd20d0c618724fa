"""Implicit feedback end to end: the meta-learner trained on a synthetic shop's events ranks
the whole catalogue better than popularity and than where it started, and `metarec serve`
answers events over HTTP, its top-k moving toward a category a user buys in."""

from __future__ import annotations

import pytest
import requests
import torch

from metarec.batch import from_table
from metarec.checkpoint import save_checkpoint, standalone_checkpoint
from metarec.implicit_baselines import Popularity
from metarec.implicit_metrics import valid_ndcg
from metarec.initialise import build_learner
from metarec.loop import fit
from metarec.scorers import AdaptedScorer
from tests.test_serve import AUTH, Server

pytestmark = pytest.mark.integration  # meta-training, and a `metarec serve` process


@pytest.fixture(scope="module")
def trained(shop_cfg, shop_prepared):
    return fit(shop_cfg, shop_prepared).learner


def test_meta_learner_beats_popularity_and_its_untrained_start(trained, shop_cfg, shop_prepared):
    ds = shop_prepared
    n = ds.manifest["counts"]["items"]
    train, test = (from_table(ds.tasks("user_cold", s)) for s in ("train", "test"))
    meta = valid_ndcg(AdaptedScorer(trained), test, n)
    start = valid_ndcg(AdaptedScorer(build_learner(shop_cfg, ds, train)), test, n)
    popularity = valid_ndcg(Popularity().fit(train, n_items=n), test, n)
    print(f"test NDCG@10: meta {meta:.4f}, untrained {start:.4f}, popularity {popularity:.4f}")
    assert meta > popularity + 0.02
    assert meta > start + 0.02


@pytest.fixture(scope="module")
def server(trained, shop_cfg, shop_prepared, tmp_path_factory):
    ds = shop_prepared
    train = from_table(ds.tasks("user_cold", "train"))
    path = save_checkpoint(
        standalone_checkpoint(shop_cfg, trained, ds, train), tmp_path_factory.mktemp("model")
    )
    s = Server(path, tmp_path_factory.mktemp("serve-work"))
    yield s
    s.stop()


def _post(server: Server, path: str, body: dict) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60)


def test_served_implicit_model_answers_events(server, shop_prepared):
    items = shop_prepared.items().column("raw_id").to_pylist()
    ok = _post(
        server,
        "/v1/recommend",
        {"events": [{"item": items[0], "event": "cart"}, {"item": items[1], "value": 2}], "k": 5},
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["adapted_on"] == 2 and len(ok.json()["items"]) == 5
    for body, field in [
        ({"ratings": [{"item": items[0], "rating": 4}]}, "ratings"),
        ({"events": [{"item": items[0], "event": "click"}]}, "event"),
        ({"events": [{"item": items[0], "value": -1}]}, "value"),
    ]:
        r = _post(server, "/v1/recommend", body)
        assert r.status_code == 422 and field in r.text, (body, r.text)
    onboarding = requests.get(f"{server.url}/v1/onboarding", headers=AUTH, timeout=30).json()
    assert onboarding["rule"].startswith("popular and diverse")


def test_top_k_moves_toward_a_category_after_purchases_in_it(server, shop_prepared):
    """For each of the 8 largest categories: a user buys 5 of its items; how much of the
    top 50 is that category, for a brand-new user and for this one?"""
    items = shop_prepared.items()
    vocab = shop_prepared.manifest["vocab"]["genre"]
    raw = items.column("raw_id").to_pylist()
    tags = [{vocab[g] for g in gs} for gs in items.column("genres").to_pylist()]
    sizes = {c: sum(c in t for t in tags) for c in vocab if c.startswith("category:")}
    cold = requests.get(
        f"{server.url}/v1/users/nobody/recommendations", params={"k": 50}, headers=AUTH, timeout=30
    ).json()["items"]
    gains = []
    for c in sorted(sizes, key=sizes.get, reverse=True)[:8]:
        bought = [r for r, t in zip(raw, tags, strict=True) if c in t][:5]
        r = _post(
            server,
            f"/v1/users/buyer-{c.replace(':', '-')}/feedback",
            {"events": [{"item": i, "event": "purchase"} for i in bought], "k": 50},
        )
        assert r.status_code == 200, r.text

        def share(ranking: list[dict], c=c) -> float:
            return sum(c in tags[raw.index(x["item"])] for x in ranking) / len(ranking)

        gains.append(share(r.json()["items"]) - share(cold))
    gain = torch.tensor(gains)
    print(f"category share of the top 50 after 5 purchases: +{gain.mean():.3f} ({gains})")
    assert gain.mean() > 0.1
    assert (gain > 0).float().mean() >= 0.75
