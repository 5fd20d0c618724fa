"""evaluate.py: chunked scoring, which scenarios a given model may be scored on, and the
report of a registered model logged to its MLflow run."""

import json

import pytest
import torch

from metarec.baselines import Bias, classic_baselines
from metarec.batch import from_table, ragged_from_table
from metarec.config import apply_overrides
from metarec.data.splits import resplit
from metarec.evaluate import (
    evaluate,
    fit_methods,
    model_fits,
    score_tasks,
    tuned_fit,
    valid_objective_for,
)
from metarec.initialise import build_learner
from metarec.loop import fit
from metarec.metrics import masked_mae
from metarec.mf import users_for_grid
from metarec.results import method_rows
from metarec.scorers import AdaptedScorer, adaptation_grid, relevance_threshold


def test_model_fits_only_where_it_saw_no_held_out_rating(synthetic_prepared):
    ds = synthetic_prepared
    assert model_fits(ds, "user_cold", "user_cold")
    assert model_fits(ds, "user_cold", "temporal")  # the same training ratings
    assert model_fits(ds, "warm", "user_cold")  # saw less than user_cold may
    assert model_fits(ds, "warm", "item_cold")
    # user_cold trains on the ratings warm/item_cold hold out of training users
    for scenario in ("warm", "item_cold", "user_item_cold"):
        assert not model_fits(ds, "user_cold", scenario)
    # another user split puts some of the model's training users in test
    assert model_fits(ds, "user_cold", "user_cold", resplit(ds, ds.manifest["protocol"]["seed"]))
    assert not model_fits(ds, "user_cold", "user_cold", resplit(ds, 7))


def test_relevance_threshold_scales_with_the_rating_range():
    assert relevance_threshold({"ratings": {"min": 1.0, "max": 5.0}}) == 4.0
    assert relevance_threshold({"ratings": {"min": 0.5, "max": 5.0}}) == 4.0
    assert relevance_threshold({"ratings": {"min": 1.0, "max": 10.0}}) == 8.0


@pytest.fixture(scope="module")
def quick(synthetic_cfg):
    return apply_overrides(
        synthetic_cfg,
        **{
            "train.epochs": 2,
            "meta.inner_solver": "gd",
            "meta.adapt": "mlp",
            "meta.inner_steps": 2,
            "meta.support_prior": 10,
        },
    )


@pytest.mark.parametrize("solver", ["gd", "ridge"])
def test_adaptation_is_chosen_on_validation_users(quick, synthetic_cfg, synthetic_prepared, solver):
    ds = synthetic_prepared
    if solver == "ridge":  # the defaults: the prior precision is scaled, there are no steps
        quick = apply_overrides(synthetic_cfg, **{"train.epochs": 2})
    fitted = fit_methods(quick, ds, "user_cold", ())
    meta = fitted.scorers[quick.meta.algorithm]
    valid = from_table(ds.tasks("user_cold", "valid"))
    grid = adaptation_grid(quick.meta)
    first = (
        {"steps": 2, "lr_scale": 1.0, "support_prior": 10}
        if solver == "gd"
        else {"prior_scale": 1.0}
    )
    assert grid[0] == first  # trained first
    maes = [
        masked_mae(AdaptedScorer(meta.learner, **hp).predict_items(valid, valid.query_items), valid)
        for hp in grid
    ]
    assert fitted.adapt["valid_mae"] == pytest.approx(min(maes))
    assert len(set(maes)) == len(maes)  # every knob changes the prediction
    chosen = grid[maes.index(min(maes))]
    assert {k: fitted.adapt[k] for k in chosen} == chosen


def test_on_large_data_the_knobs_are_chosen_on_a_sample_of_validation_users(
    synthetic_cfg, synthetic_prepared
):
    ds = synthetic_prepared
    valid = from_table(ds.tasks("user_cold", "valid"))
    budget = len(valid.flat()[0]) // 3
    cfg = apply_overrides(synthetic_cfg, **{"evaluate.tune_ratings": budget, "seed": 4})
    learner = build_learner(cfg, ds, ragged_from_table(ds.tasks("user_cold", "train")), valid)
    fitted = fit_methods(cfg, ds, "user_cold", (), learner=learner)
    sample = users_for_grid(valid, budget, seed=4)
    assert 0 < sample.num_tasks < valid.num_tasks / 2
    maes = [
        masked_mae(AdaptedScorer(learner, **hp).predict_items(sample, sample.query_items), sample)
        for hp in adaptation_grid(cfg.meta)
    ]
    assert fitted.adapt["valid_mae"] == pytest.approx(min(maes))
    everyone = apply_overrides(cfg, **{"evaluate.tune_ratings": None})
    on_all = fit_methods(everyone, ds, "user_cold", (), learner=learner).adapt["valid_mae"]
    assert on_all != pytest.approx(fitted.adapt["valid_mae"])


def test_a_baselines_grid_is_compared_on_a_sample_of_large_training_data(synthetic_prepared):
    ds = synthetic_prepared
    train = ragged_from_table(ds.tasks("user_cold", "train"))
    valid = from_table(ds.tasks("user_cold", "valid"))
    grid, n = classic_baselines()["bias"], ds.manifest["counts"]["items"]
    budget = len(train.flat()[0]) // 4
    sample = users_for_grid(train, budget, seed=1)
    maes = [
        masked_mae(grid.cls(**hp).fit(sample, n_items=n).predict(valid), valid) for hp in grid.grid
    ]
    chosen = grid.grid[maes.index(min(maes))]
    got = tuned_fit(grid, train, valid, n, seed=1, max_ratings=budget)
    assert {k: got.get_params()[k] for k in chosen} == chosen
    on_all = grid.cls(**chosen).fit(train, n_items=n)  # the chosen point refitted on everyone
    assert torch.equal(got.predict(valid), on_all.predict(valid))
    assert not torch.equal(
        got.predict(valid), grid.cls(**chosen).fit(sample, n_items=n).predict(valid)
    )


def test_implicit_evaluation_chooses_every_method_on_one_validation_sample(shop_cfg, shop_prepared):
    """The implicit baselines' grids, the network's knobs and the validation NDCG@10 that
    picks the reference all read the same sample of validation users."""
    from metarec.implicit_evaluate import _split_scores

    ds = shop_prepared
    valid = from_table(ds.tasks("user_cold", "valid"))
    budget = len(valid.flat()[0]) // 3
    cfg = apply_overrides(shop_cfg, **{"evaluate.tune_ratings": budget})
    learner = build_learner(cfg, ds, ragged_from_table(ds.tasks("user_cold", "train")), valid)
    seen = []
    out = _split_scores(
        cfg, ds, "user_cold", ("item_knn",), None, lambda _: None, learner, seen.append
    )
    sample, objective = users_for_grid(valid, budget, cfg.seed), valid_objective_for(ds)
    assert 0 < sample.num_tasks < valid.num_tasks / 2
    assert set(out) == {"item_knn", cfg.meta.algorithm}
    for name, scorer in seen[0].scorers.items():
        assert out[name]["valid"] == pytest.approx(1.0 - objective(scorer, sample))
        assert out[name]["valid"] != pytest.approx(1.0 - objective(scorer, valid))


@pytest.mark.integration  # whole evaluations over 3 splits
def test_evaluate_over_split_seeds_reports_spread_and_paired_cis(quick, synthetic_prepared):
    ds = synthetic_prepared
    splits = [(0, resplit(ds, 0)), (1, resplit(ds, 1)), (2, resplit(ds, 2))]
    results = evaluate(
        quick,
        ds,
        scenarios=["user_cold"],
        seeds=[0],
        splits=splits,
        baselines=("bias",),
        resamples=1000,
    )
    rows = results["user_cold"]
    method = quick.meta.algorithm
    assert set(method_rows(rows)) == {method, "bias"}
    for row in method_rows(rows).values():
        assert len(row["per_split"]["mae"]) == 3
        assert row["mae"] == pytest.approx(sum(row["per_split"]["mae"]) / 3)
        mean = row["mae"]
        std = (sum((v - mean) ** 2 for v in row["per_split"]["mae"]) / 2) ** 0.5  # ddof=1
        assert row["std"]["mae"] == pytest.approx(std)
    paired = rows["_paired"][method]["bias"]
    for d in paired.values():
        lo, hi = d["ci95"]
        assert lo <= d["diff"] <= hi
    proto = rows["_protocol"]
    assert proto["split_seeds"] == [0, 1, 2] and proto["tuned_on"] == "valid"
    assert proto["relevance_threshold"] == relevance_threshold(ds.manifest)
    assert set(proto["adapt"]) >= {"steps", "inner_lr", "support_prior"}
    assert not {"split", "seed", "valid_mae"} & set(proto["adapt"])  # knobs, not bookkeeping
    assert len(proto["adapt_per_fit"]) == 3
    assert proto["test_users"] == [
        s.manifest["scenarios"]["user_cold"]["test"]["tasks"] for _, s in splits
    ]


def test_scoring_in_chunks_equals_scoring_at_once(synthetic_prepared):
    ds = synthetic_prepared
    train = from_table(ds.tasks("user_cold", "train"))
    test = from_table(ds.tasks("user_cold", "test"))
    n_items = ds.manifest["counts"]["items"]
    bias = Bias().fit(train, n_items=n_items)
    whole = score_tasks(bias, test, n_items, relevance_threshold=4.0, chunk=10_000)
    parts = score_tasks(bias, test, n_items, relevance_threshold=4.0, chunk=7)
    assert set(whole) >= {"mae", "ndcg@3", "recall@10"}
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], equal_nan=True)
        assert whole[k].shape == (test.num_tasks,)


def _register(cfg, ds, tmp_path_factory):
    """``cfg`` trained in process on ``ds`` and registered in a SQLite MLflow store:
    (work dir, tracking uri, run id, model uri)."""
    from metarec.checkpoint import make_checkpoint, save_checkpoint
    from metarec.tracking import finish_run, resolve_tracking_uri, start_run
    from metarec.train_state import TrainState

    res = fit(cfg, ds)
    state = TrainState(epoch=2, best_epoch=res.best_epoch, history=res.history)
    ds_hash = ds.manifest["dataset_hash"]
    work = tmp_path_factory.mktemp("work")
    ckpt_dir = work / "ckpt"
    save_checkpoint(make_checkpoint(cfg, res.learner, None, state, dataset_hash=ds_hash), ckpt_dir)
    uri = resolve_tracking_uri(None, work)
    run_id = start_run(uri, run_name="r", config=cfg.to_dict(), manifest=ds.manifest)
    model = finish_run(
        uri, run_id, checkpoint_dir=ckpt_dir, history=res.history, summary={}, model_name="m"
    )
    return work, uri, run_id, model


@pytest.fixture(scope="module")
def registered(synthetic_cfg, synthetic_prepared, tmp_path_factory):
    """A user_cold model trained in process and registered in a SQLite MLflow store."""
    cfg = apply_overrides(
        synthetic_cfg,
        **{"meta.algorithm": "fomaml", "meta.inner_steps": 1, "train.epochs": 2},
    )
    return _register(cfg, synthetic_prepared, tmp_path_factory)


@pytest.mark.integration  # a whole CLI report on implicit data, logged to MLflow
def test_implicit_report_of_a_registered_model_is_logged_to_its_run(
    shop_cfg, shop_prepared, tmp_path_factory
):
    from mlflow.tracking import MlflowClient

    from metarec.cli import main

    cfg = apply_overrides(shop_cfg, **{"train.epochs": 1})
    work, uri, run_id, model = _register(cfg, shop_prepared, tmp_path_factory)
    out = tmp_path_factory.mktemp("report")
    args = ["report", "--data", str(shop_prepared.root), "--out", str(out), "--model", model]
    args += ["--work-dir", str(work), "--scenario", "user_cold", "--baselines", "popularity"]
    assert main([*args, "--shots", "1", "4"]) == 0
    results = json.loads((out / "results.json").read_text())["user_cold"]
    assert results["maml"]["source"] == ["model"]
    (curve,) = json.loads((out / "curves.json").read_text())["user_cold"]["learning_curves"]
    assert curve["label"] == "the given model" and len(curve["rows"]) == 1  # one epoch
    client = MlflowClient(uri)
    logged = {f.path for f in client.list_artifacts(run_id, "eval")}
    assert {"eval/report.md", "eval/results.json", "eval/shot_curve.png"} <= logged
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval/user_cold/maml/ndcg_at_10"] == pytest.approx(results["maml"]["ndcg@10"])
    diff = results["_paired_meta"]["popularity"]["recall@20"]["diff"]
    assert metrics["eval/user_cold/paired/maml-vs-popularity/recall_at_20/diff"] == pytest.approx(
        diff
    )


@pytest.mark.integration  # a whole CLI report, logged to MLflow
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


@pytest.mark.integration  # end to end through the CLI: four evaluations
def test_cli_split_seeds_and_split_file(synthetic_prepared, tmp_path):
    from metarec.cli import main

    ds = synthetic_prepared
    fast = ["--epochs", "1", "--baselines", "bias", "--set", "meta.inner_steps=1"]
    base = ["evaluate", "--data", str(ds.root), *fast]
    assert main([*base, "--out", str(tmp_path / "a"), "--split-seeds", "0", "5"]) == 0
    rows = json.loads((tmp_path / "a" / "results.json").read_text())["user_cold"]
    assert rows["_protocol"]["split_seeds"] == [0, 5]
    assert len(rows["maml"]["per_split"]["mae"]) == 2
    assert set(rows["_paired"]["maml"]["bias"]["mae"]) == {"diff", "ci95"}

    # the prepared split itself, as a split file of raw ids
    users = dict(zip(*(ds.users().column(c).to_pylist() for c in ("user", "raw_id")), strict=True))
    items = dict(zip(*(ds.items().column(c).to_pylist() for c in ("item", "raw_id")), strict=True))
    spec = {
        s: [users[u] for u in ds.tasks("user_cold", s).column("user").to_pylist()]
        for s in ("train", "valid", "test")
    }
    spec["query"] = {
        users[r["user"]]: [items[i] for i in r["query_items"]]
        for s in ("valid", "test")
        for r in ds.tasks("user_cold", s).to_pylist()
    }
    path = tmp_path / "paper.json"
    path.write_text(json.dumps(spec))
    assert main([*base, "--out", str(tmp_path / "b"), "--splits", str(path)]) == 0
    rows = json.loads((tmp_path / "b" / "results.json").read_text())["user_cold"]
    assert rows["_protocol"]["split_seeds"] == ["paper.json"]
    assert rows["_protocol"]["test_users"] == [len(spec["test"])]

    spec["test"].append("nobody")
    path.write_text(json.dumps(spec))
    refused = [
        ["--splits", str(path)],  # names the bad id
        ["--splits", str(path), "--split-seeds", "1"],
        ["--split-seeds", "1", "1"],
        ["--bootstrap", "10"],
    ]
    for extra in refused:
        assert main([*base, "--out", str(tmp_path / "c"), *extra]) == 2


def test_the_modal_adaptation_counts_knobs_not_bookkeeping():
    from metarec.evaluate import _modal_adapt

    fits = [
        {"split": 0, "seed": 0, "solver": "ridge", "prior_scale": 0.5, "valid_mae": 0.81},
        {"split": 1, "seed": 0, "solver": "ridge", "prior_scale": 1.0, "valid_mae": 0.80},
        {"split": 2, "seed": 0, "solver": "ridge", "prior_scale": 1.0, "valid_mae": 0.79},
    ]
    assert _modal_adapt(fits) == {"solver": "ridge", "prior_scale": 1.0}
