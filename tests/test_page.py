"""The page at GET /: served from the package with no external asset, and walked through in
a real browser (Debian's Chromium, driven by Playwright through ``serve/page_tour.py``)
against a real `metarec serve` on 127.0.0.1, with a catalogue title that is an attack.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from metarec.catalog import Catalog
from metarec.checkpoint import learner_from_checkpoint, save_checkpoint
from metarec.serving.app import PAGE, PAGE_POLICY
from tests.ci import require_module, skip_or_fail
from tests.serve_process import REPO, Server, trained_checkpoint

TOKEN = secrets.token_hex(8)
# A title that would run script if the page ever put data into markup.
HOSTILE = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">Hostile'


def test_the_page_is_the_packages_files_with_no_external_address():
    for name, body in PAGE.items():
        text = body.decode()
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, never fetched
        assert not re.search(r"(?i)https?:|url\(|@import", text), name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, name
    html = PAGE["index.html"].decode()
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == [
        "/page/icon.svg",
        "/page/style.css",
        "/page/app.js",
    ]
    assert "'unsafe-inline'" not in PAGE_POLICY and "script-src 'self'" in PAGE_POLICY


@pytest.fixture(scope="module")
def hostile_checkpoint(tmp_path_factory, synthetic_cfg, synthetic_prepared):
    """A trained model whose first onboarding item's title is ``HOSTILE``."""
    ckpt = trained_checkpoint(synthetic_cfg, synthetic_prepared)
    model = learner_from_checkpoint(ckpt, best=False).model
    first = Catalog.from_checkpoint(ckpt, model.item_genres, model.item_year).onboarding(1)[0]
    ckpt["catalog"]["title"] = list(ckpt["catalog"]["title"])
    ckpt["catalog"]["title"][first] = HOSTILE
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("model"))


def _chromium() -> str:
    require_module("playwright.sync_api")
    sys.path.insert(0, str(REPO / "serve"))
    from page_tour import chromium_path

    chromium = chromium_path()
    if chromium is None:
        skip_or_fail("no chromium on PATH (`make setup-browser` installs Debian's)")
    return chromium


def _tour(server: Server, shots: Path, rate: int, token: str | None) -> tuple[dict, list[dict]]:
    """``serve/page_tour.py`` against ``server``: what the page showed, and the cold-start
    list the API gives for as many items as the page asks for."""
    run = subprocess.run(
        [
            *(sys.executable, str(REPO / "serve" / "page_tour.py"), "--url", server.url),
            *("--rate", str(rate), "--out", str(shots), "--chromium", _chromium()),
            *(("--token", token) if token else ()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    cold = requests.post(
        f"{server.url}/v1/recommend", json={"k": 10 + rate}, headers=auth, timeout=30
    ).json()["items"]
    return seen, cold


def _check_the_walk(seen: dict, cold: list[dict], rate: int) -> None:
    """What any model's page must have shown: the cold start, one list per answer (the
    last given with the keyboard) that moved and names only answered items as reasons, the
    toggle, a page with no error, nothing run from data, every control named, no sideways
    scroll, and both screenshots."""
    assert seen["errors"] == [], seen["errors"]
    for audit in (seen["audit_desktop"], seen["audit_phone"]):
        assert audit["pwned"] is None and audit["injected"] == 0
        assert audit["unnamed"] == [] and not audit["overflow"]
    assert [r["title"] for r in seen["before"]] == [x["title"] for x in cold[:10]]
    assert [s["keyboard"] for s in seen["steps"]] == [False] * (rate - 1) + [True]
    titles = [[r["title"] for r in s["list"]] for s in seen["steps"]]
    assert titles[-1] != [r["title"] for r in seen["before"]]  # the list moved
    moves = [r["move"] for r in seen["steps"][-1]["list"]]
    assert any(m == "new" or m.startswith(("▲", "▼")) for m in moves), moves
    rated = set(seen["asked"][:rate])
    assert not rated & set(titles[-1])  # answered items are not recommended back
    lines = [r["because"] for r in seen["after"] if r["because"] is not None]
    assert lines and all(re.match(r"Because you (liked|rated) ", b) for b in lines), lines
    reasons = [x for r in seen["after"] for x in r["reasons"]]
    assert all(re.fullmatch(r"you (liked|rated) .+ \(\+\d+\.\d\d\)", x, re.S) for x in reasons)
    assert all(any(t in x for t in rated) for x in reasons), reasons
    # the toggle: the meta-learned starting point, without the answered items
    plain = [x["title"] for x in cold if x["title"] not in rated][:10]
    assert [r["title"] for r in seen["plain"]] == plain
    assert f"Adapted to {rate} answers" in seen["status"]
    for path in seen["screenshots"]:
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width = int.from_bytes(Path(seen["screenshots"][1]).read_bytes()[16:20], "big")
    assert width == 390  # the phone screenshot is phone-wide: nothing forced it wider


@pytest.mark.integration
def test_a_person_rates_three_items_and_sees_the_list_adapt_with_reasons(
    hostile_checkpoint, tmp_path
):
    _chromium()  # before a server starts: skip (or fail on CI) at once
    server = Server(hostile_checkpoint, tmp_path, token=TOKEN)
    try:
        page = requests.get(f"{server.url}/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == PAGE_POLICY
        assert requests.get(f"{server.url}/page/nope.js", timeout=10).status_code == 404
        assert requests.get(f"{server.url}/v1/model", timeout=10).status_code == 401
        seen, cold = _tour(server, tmp_path / "shots", 3, TOKEN)
    finally:
        server.stop()
    _check_the_walk(seen, cold, 3)
    # the server asked for its token once; the hostile title is shown as text
    assert len(seen["refused"]) == 1 and "401" in seen["refused"][0], seen["refused"]
    assert seen["asked"][0] == HOSTILE
    assert [s["answer"] for s in seen["steps"]] == ["5", "5", "1"]


@pytest.mark.integration
def test_a_shop_model_asks_for_events_and_needs_no_token_when_it_has_none(
    tmp_path, shop_cfg, shop_prepared
):
    _chromium()
    ckpt = save_checkpoint(trained_checkpoint(shop_cfg, shop_prepared, epochs=4), tmp_path)
    server = Server(ckpt, tmp_path)
    try:
        seen, cold = _tour(server, tmp_path / "shots", 2, None)
    finally:
        server.stop()
    _check_the_walk(seen, cold, 2)
    assert seen["refused"] == []
    # the heaviest event for the first item, the lightest for the last
    assert [s["answer"] for s in seen["steps"]] == ["purchase", "view"]
