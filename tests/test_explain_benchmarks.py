"""The explanation benchmarks run as a user runs them, in fresh interpreters, on a small
trained synthetic model: ``benchmarks/explain.py`` (faithfulness: the README's figure) and
``benchmarks/serve_load.py --explain`` (the latency of ``explain: true`` against plain
requests, over real HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metarec.checkpoint import save_checkpoint
from tests.conftest import REPO
from tests.serve_process import trained_checkpoint

pytestmark = pytest.mark.integration  # fresh interpreters, one of them with its own Ray


@pytest.fixture(scope="module")
def model(tmp_path_factory, synthetic_cfg, synthetic_prepared):
    ckpt = trained_checkpoint(synthetic_cfg, synthetic_prepared)
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("model"))


def _run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_removing_the_top_reason_drops_the_score_more_than_a_random_rating(
    model, synthetic_prepared
):
    report = _run(
        "benchmarks/explain.py", "--data", str(synthetic_prepared.root), "--model", str(model),
        "--ratings", "10", "--users", "40",
    )  # fmt: skip
    assert report["users"] == 40 and report["k"] == 10
    assert report["max_abs_stated_minus_measured"] < 1e-4  # a reason is a measured removal
    lo, hi = report["difference_ci95"]
    assert 0 < lo <= report["difference"] <= hi
    assert report["mean_drop_top_reason"] > report["mean_drop_random_support"]
    assert 0 < report["mean_reasons_per_item"] <= 3


@pytest.mark.slow  # its own Ray and Serve (~45 s): `make test-all`; make test stays in budget
def test_serve_load_measures_explained_beside_plain_requests(model, synthetic_prepared):
    report = _run(
        "benchmarks/serve_load.py", "--data", str(synthetic_prepared.root), "--model",
        str(model), "--ratings", "10", "--modes", "on", "--concurrency", "1", "--explain",
        "--requests", "16", "--budget-s", "5",
    )  # fmt: skip
    plain, explained = report["results"]["on_c1"], report["results"]["on_explain_c1"]
    assert plain["errors"] == 0 and explained["errors"] == 0
    assert plain["requests"] >= 16 and explained["requests"] >= 16
    ratio = report["explain_p50_ratio_on_c1"]
    assert ratio == pytest.approx(explained["p50_ms"] / plain["p50_ms"])
