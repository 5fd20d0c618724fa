"""`metarec report`: support truncation, bold best cells, and the report directory end to end."""

import json
import math
import re

import numpy as np
import pytest
import torch

from metarec.batch import TaskBatch
from metarec.config import load_config
from metarec.data.prepare import prepare
from metarec.report import activity_buckets, markdown_results, truncate_support
from metarec.results import method_rows
from tests.conftest import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def _tasks(support_lengths, width=6):
    """Tasks whose support item j of task t is 10 * t + j (so kept entries are traceable)."""
    t = len(support_lengths)
    items = torch.arange(width).expand(t, width) + 10 * torch.arange(t)[:, None]
    mask = torch.arange(width) < torch.tensor(support_lengths)[:, None]
    q = torch.ones(t, 2, dtype=torch.long)
    return TaskBatch(
        users=torch.arange(t),
        support_items=items * mask,
        support_ratings=(items.float() / 10) * mask,
        support_mask=mask,
        query_items=q,
        query_ratings=q.float(),
        query_mask=q.bool(),
    )


def test_truncate_support_keeps_min_k_valid_ratings_with_smallest_keys():
    tasks = _tasks([5, 2, 0, 6])
    keys = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 4, 8):
        cut = truncate_support(tasks, k, keys)
        assert cut.support_mask.sum(1).tolist() == [min(k, n) for n in (5, 2, 0, 6)]
        assert cut.support_mask.shape[1] == min(k, 6)
        for t in range(4):
            kept = cut.support_items[t][cut.support_mask[t]].tolist()
            valid = tasks.support_mask[t]
            # oracle: sort the task's valid entries by key, take the first k
            order = keys[t][valid].argsort()[:k]
            assert kept == tasks.support_items[t][valid][order].tolist()
            # ratings travel with their items
            ratings = cut.support_ratings[t][cut.support_mask[t]]
            torch.testing.assert_close(ratings, torch.tensor(kept).float() / 10)


def test_truncated_subsets_are_nested_and_survive_select():
    tasks = _tasks([6, 3, 5])
    keys = torch.rand(3, 6, generator=torch.Generator().manual_seed(1))
    previous = None
    for k in (1, 2, 4, 8):
        cut = truncate_support(tasks, k, keys)
        sets = [set(cut.support_items[t][cut.support_mask[t]].tolist()) for t in range(3)]
        if previous is not None:
            assert all(p <= s for p, s in zip(previous, sets, strict=True))
        previous = sets
        # kept entries sit in front, so trimming to the longest valid prefix loses none
        again = cut.select(torch.arange(3))
        assert again.support_mask.sum().item() == cut.support_mask.sum().item()
    cold = truncate_support(tasks, 0, keys)  # zero shots: every user is a cold start
    assert cold.support_mask.shape == (3, 1) and not cold.support_mask.any()
    assert torch.equal(cold.query_items, tasks.query_items)
    with pytest.raises(ValueError, match="k: got -1"):
        truncate_support(tasks, -1, keys)


def _row(mae, ndcg):
    return {"mae": mae, "ndcg@3": ndcg, "std": {"mae": 0.01, "ndcg@3": 0.02}}


def test_markdown_results_bolds_the_best_of_each_column():
    results = {
        "user_cold": {
            "maml": _row(0.70, 0.88),
            "bias": _row(0.80, 0.88),  # tied on nDCG as printed: both bold
            "mf_foldin": _row(0.75, math.nan),  # undefined never wins
            "user_mean": _row(0.90, 0.80),
        }
    }
    text = markdown_results(results, metrics=("mae", "ndcg@3"))
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if "±" in line}
    assert "**0.7000 ± 0.0100**" in lines["maml"]  # lowest MAE
    assert "**0.8800 ± 0.0200**" in lines["maml"] and "**0.8800 ± 0.0200**" in lines["bias"]
    assert "**" not in lines["mf_foldin"]
    assert text.startswith("### user_cold")
    all_tied = {"s": {"a": _row(0.5, 0.0), "b": _row(0.6, 0.0)}}
    assert "**0.0000" not in markdown_results(all_tied, metrics=("mae", "ndcg@3"))


def test_one_run_prints_means_without_a_made_up_spread():
    from metarec.results import format_table

    one = {"split_seeds": [0], "init_seeds": [0], "test_users": [58]}
    results = {"user_cold": {"maml": _row(0.70, 0.88), "_protocol": one}}
    assert "±" not in markdown_results(results, metrics=("mae", "ndcg@3"))
    assert "±" not in format_table(results, metrics=("mae", "ndcg@3"))
    results["user_cold"]["_protocol"] = {**one, "init_seeds": [0, 1]}
    assert "0.7000 ± 0.0100" in markdown_results(results, metrics=("mae", "ndcg@3"))
    assert "0.7000±0.0100" in format_table(results, metrics=("mae", "ndcg@3"))


def test_activity_buckets_split_users_by_support_size():
    sizes = np.array([3, 3, 4, 10, 11, 40, 41, 90])
    bucket, labels = activity_buckets(sizes)
    assert bucket.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # two users each, by size
    assert labels == ["3", "4-10", "11-40", "41-90"]
    ties = np.array([1, 1, 1, 1, 1, 1, 2, 3])  # equal sizes never straddle two buckets
    bucket, labels = activity_buckets(ties)
    assert bucket.tolist() == [0] * 6 + [1, 1] and labels == ["1", "2-3"]
    same, one = activity_buckets(np.full(5, 7))
    assert same.tolist() == [0] * 5 and one == ["7"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small synthetic dataset with all five scenarios (the report trains on each)."""
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        **{"data.synthetic.n_users": 200, "data.synthetic.n_items": 120},
    )
    return prepare(cfg, tmp_path_factory.mktemp("tiny") / "data", progress=False)


@pytest.mark.integration  # a whole CLI report: five scenarios, four plots
def test_report_writes_results_for_every_scenario_and_four_plots(tiny, tmp_path, capsys):
    from metarec.cli import main

    out = tmp_path / "report"
    code = main(
        [
            "report",
            "--data",
            str(tiny.root),
            "--out",
            str(out),
            "--config",
            "configs/demo.yaml",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--baselines",
            "finetune",
            "--algorithm",
            "fomaml",
            "--shots",
            "1",
            "4",
            "16",
            "--curve-steps",
            "3",
            "--set",
            "meta.inner_solver=gd",
            "--set",
            "meta.inner_steps=1",
            "--set",
            "model.pretrain_items=false",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    assert f"report:     {out / 'report.md'}" in printed.out
    assert "## " not in printed.out  # the path, not the file
    n = len(tiny.scenarios)
    progress = [line for line in printed.err.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert [p.split("]")[0] for p in progress] == [f"[{i}/{n}" for i in range(1, n + 1)]
    assert all("left)" in p for p in progress[:-1]) and "left" not in progress[-1]
    results = json.loads((out / "results.json").read_text())
    assert list(results) == tiny.scenarios == list(tiny.manifest["scenarios"])
    for rows in results.values():
        assert set(method_rows(rows)) == {"fomaml", "finetune"}
        assert rows["fomaml"]["source"] == "fit"
        assert set(rows["_paired"]["fomaml"]) == {"finetune"}
    for name in ("shot_curve", "step_curve", "per_user", "learning_curves"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert all(f"### {s}" in report for s in tiny.scenarios)
    assert "`fomaml` minus each method" in report and "95% bootstrap CI" in report
    assert "**" in report and "![Shot curve" in report and tiny.manifest["dataset_hash"] in report
    curves = json.loads((out / "curves.json").read_text())
    shot = curves["user_cold"]["shot_curve"]
    assert set(shot) == {"fomaml", "finetune"} and len(shot["fomaml"]["mae"]) == 3
    paired = curves["user_cold"]["shot_paired"]
    assert set(paired) == {"finetune"} and len(paired["finetune"]) == 3  # per shot
    for k, d in enumerate(paired["finetune"]):  # one split, one seed: the means' difference
        want = shot["fomaml"]["mae"][k][0] - shot["finetune"]["mae"][k][0]
        assert d["mae"]["diff"] == pytest.approx(want, abs=1e-6)
        lo, hi = d["mae"]["ci95"]
        assert lo <= d["mae"]["diff"] <= hi
    assert "## Shot curve, paired" in report and "| finetune | " in report
    assert len(curves["user_cold"]["step_curve"]["fomaml"]) == 4
    assert len(curves["warm"]["learning_curves"]) == 1


def test_markdown_results_shows_paired_cis_and_calls_a_tie_a_tie():
    ci = {
        "mae": {"diff": -0.02, "ci95": [-0.03, -0.01]},  # excludes 0, lower is better: win
        "ndcg@3": {"diff": 0.01, "ci95": [-0.005, 0.02]},  # contains 0: tie
    }
    results = {
        "user_cold": {
            "maml": _row(0.70, 0.88),
            "bias": _row(0.72, 0.87),
            "_paired": {"maml": {"bias": ci}},
            "_protocol": {
                "split_seeds": [0, 1],
                "test_users": [50, 50],
                "relevance_threshold": 4.0,
                "adapt": {"steps": 5},
            },
        }
    }
    text = markdown_results(results, metrics=("mae", "ndcg@3"))
    row = next(line for line in text.splitlines() if line.startswith("| bias | **-0.0200"))
    assert "**-0.0200 [-0.0300, -0.0100] win**" in row
    assert "+0.0100 [-0.0050, +0.0200] tie" in row
    assert "100 test users of splits [0, 1]" in text
    assert "_paired" not in text.split("`maml` minus")[0]  # not a method row
