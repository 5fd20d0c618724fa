"""evaluate.py: chunked scoring, which scenarios a given model may be scored on, and the
report of a registered model logged to its MLflow run."""

import json

import pytest
import torch

from metarec.baselines import Bias
from metarec.batch import from_table
from metarec.config import apply_overrides
from metarec.evaluate import model_fits, score_tasks
from metarec.loop import fit


def test_model_fits_only_where_it_saw_no_held_out_rating(synthetic_prepared):
    ds = synthetic_prepared
    assert model_fits(ds, "user_cold", "user_cold")
    assert model_fits(ds, "user_cold", "temporal")  # the same training ratings
    assert model_fits(ds, "warm", "user_cold")  # saw less than user_cold may
    assert model_fits(ds, "warm", "item_cold")
    # user_cold trains on the ratings warm/item_cold hold out of training users
    for scenario in ("warm", "item_cold", "user_item_cold"):
        assert not model_fits(ds, "user_cold", scenario)


def test_scoring_in_chunks_equals_scoring_at_once(synthetic_prepared):
    ds = synthetic_prepared
    train = from_table(ds.tasks("user_cold", "train"))
    test = from_table(ds.tasks("user_cold", "test"))
    n_items = ds.manifest["counts"]["items"]
    bias = Bias().fit(train, n_items=n_items)
    whole = score_tasks(bias, test, n_items, chunk=10_000)
    parts = score_tasks(bias, test, n_items, chunk=7)
    assert set(whole) >= {"mae", "ndcg@3", "recall@10"}
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], equal_nan=True)
        assert whole[k].shape == (test.num_tasks,)


@pytest.fixture(scope="module")
def registered(synthetic_cfg, synthetic_prepared, tmp_path_factory):
    """A user_cold model trained in process and registered in a SQLite MLflow store."""
    from metarec.checkpoint import make_checkpoint, save_checkpoint
    from metarec.loop import TrainState
    from metarec.tracking import finish_run, resolve_tracking_uri, start_run

    cfg = apply_overrides(
        synthetic_cfg,
        **{"meta.algorithm": "fomaml", "meta.inner_steps": 1, "train.epochs": 2},
    )
    res = fit(cfg, synthetic_prepared)
    state = TrainState(epoch=2, best_epoch=res.best_epoch, history=res.history)
    ds_hash = synthetic_prepared.manifest["dataset_hash"]
    work = tmp_path_factory.mktemp("work")
    ckpt_dir = work / "ckpt"
    save_checkpoint(make_checkpoint(cfg, res.learner, None, state, dataset_hash=ds_hash), ckpt_dir)
    uri = resolve_tracking_uri(None, work)
    run_id = start_run(
        uri, run_name="r", config=cfg.to_dict(), manifest=synthetic_prepared.manifest
    )
    model = finish_run(
        uri, run_id, checkpoint_dir=ckpt_dir, history=res.history, summary={}, model_name="m"
    )
    return work, uri, run_id, model


def test_report_of_a_registered_model_is_logged_to_its_run(
    registered, synthetic_prepared, tmp_path
):
    from mlflow.tracking import MlflowClient

    from metarec.cli import main

    work, uri, run_id, model = registered
    out = tmp_path / "r"
    args = ["report", "--data", str(synthetic_prepared.root), "--out", str(out)]
    args += ["--model", model, "--work-dir", str(work), "--seeds", "0", "--baselines", "bias"]
    args += ["--scenario", "user_cold", "--scenario", "temporal", "--shots", "1", "8"]
    args += ["--curve-steps", "2"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["user_cold"]["fomaml"]["source"] == "model"
    assert results["temporal"]["fomaml"]["source"] == "model"
    curves = json.loads((out / "curves.json").read_text())
    assert curves["user_cold"]["learning_curves"][0]["label"] == "the given model"
    client = MlflowClient(uri)
    logged = {f.path for f in client.list_artifacts(run_id, "eval")}
    assert {"eval/report.md", "eval/results.json", "eval/shot_curve.png"} <= logged
    metric = client.get_run(run_id).data.metrics["eval/user_cold/fomaml/ndcg_at_3"]
    assert metric == pytest.approx(results["user_cold"]["fomaml"]["ndcg@3"])
