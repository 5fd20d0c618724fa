"""The in-process training loop and the evaluate command, end to end on tiny synthetic data."""

import json
import math

import pytest
import torch

from metarec.config import apply_overrides
from metarec.evaluate import BASELINES, REPORTED, evaluate
from metarec.loop import fit
from metarec.mf import choose_mf
from metarec.results import method_rows


@pytest.fixture(scope="module")
def quick_cfg(synthetic_cfg):
    return apply_overrides(
        synthetic_cfg, **{"train.epochs": 3, "meta.inner_steps": 2, "meta.outer_lr": 0.005}
    )


def test_fit_is_deterministic_under_a_seed_and_keeps_the_best_epoch(quick_cfg, synthetic_prepared):
    a = fit(quick_cfg, synthetic_prepared)
    b = fit(quick_cfg, synthetic_prepared)
    assert [r["valid/mae"] for r in a.history] == [r["valid/mae"] for r in b.history]
    assert a.best_valid_mae == min(r["valid/mae"] for r in a.history)
    for row in a.history:  # where an epoch's time went (in process: no all-reduce to wait on)
        assert row["train/pass_s"] > 0 and row["train/valid_s"] > 0
        assert row["train/sync_s"] < row["train/pass_s"] / 10
        assert row["train/pass_tasks_per_s"] == row["train/tasks"] / row["train/pass_s"]
    c = fit(apply_overrides(quick_cfg, seed=1, **{"train.epochs": 1}), synthetic_prepared)
    assert a.history[0]["valid/mae"] != c.history[0]["valid/mae"]


@pytest.mark.parametrize(
    ("algorithm", "solver"),
    [("fomaml", "gd"), ("metasgd", "gd"), ("anil", "gd"), ("reptile", "gd"), ("reptile", "ridge")],
)
def test_every_algorithm_trains_without_nan(quick_cfg, synthetic_prepared, algorithm, solver):
    gd = {"meta.adapt": "mlp"} if solver == "gd" else {}
    cfg = apply_overrides(
        quick_cfg,
        **{"meta.algorithm": algorithm, "meta.inner_solver": solver, **gd, "train.epochs": 2},
    )
    res = fit(cfg, synthetic_prepared)
    assert all(math.isfinite(r["valid/mae"]) for r in res.history)


@pytest.mark.integration  # whole evaluations: 2 seeds, every baseline tuned
def test_evaluate_reports_every_method_and_metric(quick_cfg, synthetic_prepared):
    cfg = apply_overrides(quick_cfg, **{"train.epochs": 1})
    results = evaluate(cfg, synthetic_prepared, scenarios=["user_cold"], seeds=[0, 1])
    methods = method_rows(results["user_cold"])
    assert set(methods) == {quick_cfg.meta.algorithm, *BASELINES}
    for row in methods.values():
        assert set(REPORTED) <= set(row)
        assert len(row["per_split"]["mae"]) == 1  # one split; std over the 2 init seeds
        assert row["std"]["mae"] >= 0
        assert 0 < row["mae"] < 2 and 0 <= row["ndcg@3"] <= 1
    assert results["user_cold"]["_protocol"]["std_over"] == "init seeds"
    # planted per-user signal: adapting to the support set beats the global mean
    assert methods[quick_cfg.meta.algorithm]["mae"] < methods["global_mean"]["mae"]
    assert methods["user_mean"]["mae"] < methods["global_mean"]["mae"]


@pytest.mark.integration  # a whole CLI evaluation
def test_evaluate_cli_writes_results_json(synthetic_prepared, tmp_path):
    from metarec.cli import main

    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--data",
            str(synthetic_prepared.root),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--baselines",
            "global_mean,bias",
            "--set",
            "meta.inner_steps=1",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["user_cold"]) == {"maml", "global_mean", "bias", "_paired", "_protocol"}
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(synthetic_prepared.root),
                "--out",
                str(out),
                "--baselines",
                "knn",
            ]
        )
        == 2
    )


def test_pretrained_item_embeddings_are_scaled_mf_factors(quick_cfg, synthetic_prepared):
    from metarec.baselines import MFFoldIn
    from metarec.batch import from_table
    from metarec.initialise import build_learner

    gd = {"meta.inner_solver": "gd", "meta.adapt": "mlp"}  # no factor head: MLP inputs
    cfg = apply_overrides(quick_cfg, **{"model.pretrain_items": True, **gd})
    train = from_table(synthetic_prepared.tasks("user_cold", "train"))
    learner = build_learner(cfg, synthetic_prepared, train)
    table = learner.model.emb["item"].detach()[1:]
    n_items = table.shape[0]
    mf = MFFoldIn(dim=table.shape[1], reg=10.0, seed=cfg.seed).fit(train, n_items=n_items)
    ratio = table / mf.item_factors_.float()
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), rtol=1e-3)
    assert torch.allclose(learner.model.item_bias.detach(), mf.item_bias_.float(), atol=1e-5)


def test_factor_head_starts_at_the_mf_foldin_chosen_on_validation_users(
    synthetic_cfg, synthetic_prepared
):
    from metarec.baselines import MFFoldIn, classic_baselines
    from metarec.batch import from_table
    from metarec.initialise import build_learner
    from metarec.metrics import masked_mae

    train = from_table(synthetic_prepared.tasks("user_cold", "train"))
    valid = from_table(synthetic_prepared.tasks("user_cold", "valid"))
    n_items = synthetic_prepared.manifest["counts"]["items"]
    auto = apply_overrides(synthetic_cfg, **{"meta.prior_precision": None})
    assert auto.meta.prior_precision is None and auto.factor_head
    learner = build_learner(auto, synthetic_prepared, train, valid)
    grid = classic_baselines(seed=auto.seed)["mf_foldin"].grid
    fits = [MFFoldIn(**hp).fit(train, n_items=n_items) for hp in grid]
    best = min(fits, key=lambda f: masked_mae(f.predict(valid), valid))
    table = learner.model.emb["item"].detach()[1:]
    torch.testing.assert_close(table[:, : best.dim], best.item_factors_.float())
    assert not table[:, best.dim :].any()  # fewer factors than dimensions: zero-padded
    assert learner.cfg.prior_precision == best.reg
    # Huber's δ is in units of the training ratings' spread: a 1-10 scale gets a wider one
    assert float(learner.rating_std) == pytest.approx(float(train.flat()[2].std()), rel=1e-5)
    torch.testing.assert_close(learner.log_precision.exp().detach(), torch.full_like(
        learner.log_precision, best.reg))  # fmt: skip
    fixed = apply_overrides(synthetic_cfg, **{"meta.prior_precision": 4.0})
    assert build_learner(fixed, synthetic_prepared, train, valid).cfg.prior_precision == 4.0
    # a narrower grid (embeddings of 16) reads the whole grid's comparison when evaluation
    # made it already: the same factors as comparing the narrower grid here
    narrow = apply_overrides(auto, **{"model.embedding_dim": 16})
    whole = choose_mf(train, valid, n_items, seed=auto.seed)
    reused = build_learner(narrow, synthetic_prepared, train, valid, tuned_mf=whole)
    fresh = build_learner(narrow, synthetic_prepared, train, valid)
    assert reused.cfg.prior_precision == fresh.cfg.prior_precision
    assert torch.equal(reused.model.emb["item"], fresh.model.emb["item"])


def test_short_supports_change_training_but_not_the_data(quick_cfg, synthetic_prepared):
    short = apply_overrides(quick_cfg, **{"meta.short_supports": 0.5, "train.epochs": 1})
    full = apply_overrides(quick_cfg, **{"meta.short_supports": 0.0, "train.epochs": 1})
    a, b = fit(short, synthetic_prepared), fit(full, synthetic_prepared)
    assert all(math.isfinite(r["valid/mae"]) for r in a.history)
    assert [r["train/query_loss"] for r in a.history] != [r["train/query_loss"] for r in b.history]
    assert [r["train/tasks"] for r in a.history] == [r["train/tasks"] for r in b.history]


def test_a_flat_split_trains_as_the_padded_one_and_a_window_bounds_supports(
    quick_cfg, synthetic_prepared, monkeypatch
):
    """A Ray worker holds its split flat (``RaggedTasks``): an epoch from it is the padded
    split's epoch, bit for bit. ``meta.support_window`` cuts every support a meta-batch
    adapts on to a window (random: after the epoch's re-split), and still trains on every
    task."""
    from metarec import loop
    from metarec.batch import from_table, ragged_from_table
    from metarec.initialise import build_learner

    table = synthetic_prepared.tasks("user_cold", "train")
    padded = from_table(table)
    widths = []
    real = loop.meta_gradients

    def spy(learner, batch, **kw):
        widths.append(int(batch.support_mask.sum(1).max()))
        return real(learner, batch, **kw)

    monkeypatch.setattr(loop, "meta_gradients", spy)

    def epoch(cfg, tasks):
        learner = build_learner(cfg, synthetic_prepared, padded)
        optimizer = loop.build_optimizer(learner, cfg)
        shard = loop.Shard.whole(tasks)
        done = loop.train_epoch(learner, optimizer, shard, torch.Generator().manual_seed(0))
        return done.loss, done.seen, [p.detach().clone() for p in learner.parameters()]

    a, b = epoch(quick_cfg, padded), epoch(quick_cfg, ragged_from_table(table))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))
    longest = int(padded.support_mask.sum(1).max())
    assert max(widths) > 8
    widths.clear()
    whole = {"meta.short_supports": 0.0}  # no task shortened below its window
    window = epoch(apply_overrides(quick_cfg, **{"meta.support_window": 8, **whole}), padded)
    assert max(widths) == 8 < longest
    assert torch.equal(window[1], a[1]) and window[0] != a[0]  # every task, other supports


def test_evaluation_chunks_shrink_only_around_long_supports():
    from metarec.loop import row_chunks

    short = torch.full((600,), 90)
    assert [c.tolist() for c in row_chunks(short, 256, 256 * 512)] == [
        list(range(lo, min(lo + 256, 600))) for lo in range(0, 600, 256)
    ]
    heavy = torch.tensor([10] * 100 + [8000] + [10] * 200)
    chunks = row_chunks(heavy, 256, 256 * 512)
    assert torch.equal(torch.cat(chunks), torch.arange(301))  # every task once, in order
    assert all(len(c) * int(heavy[c].max()) <= 256 * 512 for c in chunks)
    assert len(row_chunks(torch.tensor([10**6]), 256, 10)) == 1  # one task always fits


@pytest.mark.parametrize("data", ["ratings", "implicit"])
def test_validation_sharded_across_workers_sums_to_the_whole(
    data, quick_cfg, synthetic_prepared, shop_cfg, shop_prepared
):
    """Each Ray worker validates every world-th user (``rank_rows``); the summed totals give
    the objective one process computes over every user."""
    from metarec.batch import from_table, ragged_from_table
    from metarec.initialise import build_learner
    from metarec.loop import rank_rows, valid_objective, valid_totals

    cfg, ds = (quick_cfg, synthetic_prepared) if data == "ratings" else (shop_cfg, shop_prepared)
    learner = build_learner(cfg, ds, from_table(ds.tasks("user_cold", "train")))
    valid = from_table(ds.tasks("user_cold", "valid"))
    whole = valid_objective(learner, valid, chunk=32)
    totals = sum(
        valid_totals(learner, valid.select(rank_rows(valid.users, rank, 3)), chunk=32)
        for rank in range(3)
    )
    assert totals[1] > 0
    assert float(totals[0] / totals[1]) == pytest.approx(whole, rel=1e-6)
    # what a Ray worker holds: its share flat, padded chunk by chunk; the same totals
    table = ds.tasks("user_cold", "valid")
    for rank in range(3):
        rows = rank_rows(valid.users, rank, 3)
        share = ragged_from_table(table.take(rows.numpy()))
        padded = valid_totals(learner, valid.select(rows), chunk=32)
        assert torch.equal(valid_totals(learner, share, chunk=32), padded)
    empty = from_table(ds.tasks("user_cold", "valid").slice(0, 0))  # a worker with none
    assert valid_totals(learner, empty).tolist() == [0.0, 0.0]


def test_a_frozen_item_table_is_not_all_reduced(quick_cfg, synthetic_prepared):
    """``meta.item_lr_scale: 0`` (the default) freezes the pretrained item table: the one
    all-reduce per meta-batch carries only what the step moves (and the loss). A training
    table syncs the rows a batch touched (after a uint8 mask of them), or all of it."""
    from metarec import loop
    from metarec.batch import from_table
    from metarec.initialise import build_learner

    train = from_table(synthetic_prepared.tasks("user_cold", "train"))
    sizes, tables = {}, {}
    for scale, sync in ((0.0, "sparse"), (0.1, "dense"), (0.1, "sparse")):
        cfg = apply_overrides(quick_cfg, **{"meta.item_lr_scale": scale})
        learner = build_learner(cfg, synthetic_prepared, train)
        optimizer = loop.build_optimizer(learner, cfg)
        table = learner.model.emb["item"].detach().clone()
        sent = []
        done = loop.train_epoch(
            learner,
            optimizer,
            loop.Shard.whole(train),
            torch.Generator().manual_seed(0),
            all_reduce=lambda t, sent=sent: sent.append((t.dtype, t.numel())),
            item_sync=sync,
        )
        sizes[scale, sync] = sent
        tables[scale, sync] = learner.model.emb["item"].detach().clone()
        moved = not torch.equal(learner.model.emb["item"], table)
        assert moved == (scale > 0)
        per_step = sum(n * (1 if d == torch.uint8 else 4) for d, n in sent) / done.steps
        assert done.sent_bytes == per_step  # as logged
    dense_step = loop.allreduce_bytes(optimizer)
    assert [n * 4 for _, n in sizes[0.1, "dense"]] == [dense_step] * len(sizes[0.1, "dense"])
    assert all(d == torch.float32 for d, _ in sizes[0.0, "sparse"])  # frozen: no mask
    item = learner.model.emb["item"].numel() + learner.model.item_bias.numel()
    assert sizes[0.1, "dense"][0][1] - sizes[0.0, "sparse"][0][1] == item
    masks = [n for d, n in sizes[0.1, "sparse"] if d == torch.uint8]
    assert masks == [len(learner.model.emb["item"]) + len(learner.model.item_bias)] * len(masks)
    values = [n for d, n in sizes[0.1, "sparse"] if d != torch.uint8]
    assert len(values) == len(masks) and max(values) < sizes[0.1, "dense"][0][1]
    assert torch.equal(tables[0.1, "sparse"], tables[0.1, "dense"])  # the same sums
