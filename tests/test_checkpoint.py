"""Checkpoints: a run's full state round-trips; foreign or damaged files are refused."""

import pytest
import torch

from metarec.batch import from_table
from metarec.checkpoint import (
    learner_from_checkpoint,
    load_checkpoint,
    make_checkpoint,
    restart_point,
    save_checkpoint,
)
from metarec.config import apply_overrides
from metarec.errors import DataError
from metarec.initialise import build_learner
from metarec.loop import build_optimizer, predict_query
from metarec.train_state import TrainState


@pytest.fixture(scope="module")
def trained(synthetic_cfg, synthetic_prepared):
    train = from_table(synthetic_prepared.tasks("user_cold", "train"))
    learner = build_learner(synthetic_cfg, synthetic_prepared, train)
    optimizer = build_optimizer(learner, synthetic_cfg)
    state = TrainState(epoch=3, best_epoch=1, best_valid_mae=0.7, history=[{"epoch": 0}])
    return learner, optimizer, state


def test_checkpoint_round_trips_the_model_without_the_dataset(
    tmp_path, synthetic_cfg, synthetic_prepared, trained
):
    learner, optimizer, state = trained
    h = synthetic_prepared.manifest["dataset_hash"]
    ckpt = make_checkpoint(synthetic_cfg, learner, optimizer, state, dataset_hash=h)
    path = save_checkpoint(ckpt, tmp_path)
    loaded = load_checkpoint(tmp_path, dataset_hash=h)
    assert TrainState.from_dict(loaded["state"]).epoch == 3
    rebuilt = learner_from_checkpoint(loaded, best=False)
    valid = from_table(synthetic_prepared.tasks("user_cold", "valid"))
    torch.testing.assert_close(predict_query(rebuilt, valid), predict_query(learner, valid))
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temp file left behind
    assert path.name == "checkpoint.pt"


def test_a_checkpoint_from_before_the_rating_spread_still_loads(synthetic_cfg, trained):
    """Checkpoints written before ``meta.huber`` lack ``rating_std``, which only training
    reads: they still load, with the rest of their weights."""
    learner, optimizer, state = trained
    ckpt = make_checkpoint(synthetic_cfg, learner, optimizer, state, dataset_hash="h")
    del ckpt["learner"]["rating_std"]
    rebuilt = learner_from_checkpoint(ckpt, best=False)
    assert float(rebuilt.rating_std) == 1.0 != float(learner.rating_std)
    torch.testing.assert_close(rebuilt.log_precision, learner.log_precision)


def test_a_resumed_run_starts_from_the_checkpoints_network_under_its_new_config(
    synthetic_cfg, trained
):
    learner, optimizer, state = trained
    ckpt = make_checkpoint(synthetic_cfg, learner, optimizer, state, dataset_hash="h")
    cfg = apply_overrides(synthetic_cfg, **{"train.epochs": 9, "train.workers": 2})
    start = restart_point(ckpt, cfg)
    assert start["config"] == cfg.to_dict() != ckpt["config"]
    assert start["optimizer"] is None and TrainState.from_dict(start["state"]) == TrainState()
    rebuilt = learner_from_checkpoint(start, best=False).state_dict()
    assert rebuilt.keys() == learner.state_dict().keys()
    assert all(torch.equal(rebuilt[k], v) for k, v in learner.state_dict().items())


def test_checkpoint_of_another_dataset_is_refused(tmp_path, synthetic_cfg, trained):
    learner, _, state = trained
    ckpt = make_checkpoint(synthetic_cfg, learner, None, state, dataset_hash="a")
    save_checkpoint(ckpt, tmp_path)
    with pytest.raises(DataError, match="trained on prepared dataset a, but --data has b"):
        load_checkpoint(tmp_path, dataset_hash="b")


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable metarec checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"schema_version": 99}, tmp_path / "checkpoint.pt")
    with pytest.raises(DataError, match="schema version 99"):
        load_checkpoint(tmp_path)
    with pytest.raises(DataError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "missing")
