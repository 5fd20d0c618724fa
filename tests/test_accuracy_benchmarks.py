"""The accuracy benchmarks run end to end and print what README's Results quote.

``benchmarks/accuracy.py`` (defaults against the classic baselines, paired CIs) and
``benchmarks/defaults_search.py`` (validation-only candidate search) are run as a user runs
them, in a fresh interpreter, on tiny data.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

# fresh interpreters, whole evaluations: `make test-all` runs them (make test stays in budget)
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_accuracy_benchmark_reports_methods_and_paired_verdicts(tmp_path):
    stdout = _run(
        "benchmarks/accuracy.py", "--quick", "--datasets", "synthetic:default", "--work",
        str(tmp_path),
    )  # fmt: skip
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["config"] == "defaults (no YAML)" and report["scenario"] == "user_cold"
    res = report["synthetic:default"]
    meta = res["meta"]
    assert set(res["methods"]) == {meta, "global_mean", "item_mean", "user_mean", "bias",
                                   "mf_foldin"}  # fmt: skip
    for rival in ("mf_foldin", "bias"):
        for metric in ("mae", "rmse", "ndcg@3"):
            cmp = res[f"{meta}_vs"][rival][metric]
            lo, hi = cmp["ci95"]
            assert lo <= cmp["diff"] <= hi
            assert cmp["verdict"] in {"win", "loss", "tie"}
            assert (cmp["verdict"] == "tie") == (lo <= 0 <= hi)
    assert res["adapt"]["solver"] == "ridge"  # the defaults' solver, scale chosen on valid
    assert res["methods"][meta]["mae"] < res["methods"]["global_mean"]["mae"]
    assert res["test_users"] > 0 and res["split_seeds"] == [0]


def test_defaults_search_compares_candidates_on_the_same_baselines(synthetic_prepared):
    stdout = _run(
        "benchmarks/defaults_search.py", "--data", str(synthetic_prepared.root),
        "--split-seeds", "100", "--try", '{"train.epochs": 1}',
        "--try", '{"train.epochs": 1, "meta.prior_precision": 3.0}',
    )  # fmt: skip
    rows = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["try"] for r in rows] == [
        {"train.epochs": 1},
        {"train.epochs": 1, "meta.prior_precision": 3.0},
    ]
    for r in rows:
        assert set(r) >= {"maml", "bias", "mf_foldin", "adapt", "best_epoch"}
        assert r["epochs_run"] == 1 and 0 < r["maml"]["mae"] < r["maml"]["rmse"]
    # the same baselines on the same validation users, whatever the candidate
    assert rows[0]["mf_foldin"] == rows[1]["mf_foldin"]
    assert rows[0]["maml"] != rows[1]["maml"]


def test_defaults_search_scores_the_mean_of_several_seeds(synthetic_prepared):
    stdout = _run(
        "benchmarks/defaults_search.py", "--data", str(synthetic_prepared.root),
        "--split-seeds", "100", "--ensemble", "2", "--try", '{"train.epochs": 1}',
    )  # fmt: skip
    (row,) = [json.loads(line) for line in stdout.strip().splitlines()]
    one, mean = row["maml"], row["maml_mean2"]
    assert mean != one  # another seed's model went into it
    assert 0 < mean["mae"] < mean["rmse"] and row["mf_foldin"]["mae"] > 0
