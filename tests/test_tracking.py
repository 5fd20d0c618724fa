"""MLflow runs end honestly: FAILED on an error, KILLED on Ctrl-C or SIGTERM, with the reason
recorded; a resumed run is RUNNING again. A real SQLite-backed MLflow store, no server."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from tests.ci import require_module

mlflow = require_module("mlflow")  # under CI=true a missing mlflow fails, never skips

from metarec.tracking import ERROR_TAG, Terminated, ends_honestly, reopen_run, start_run  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module: creating one runs MLflow's schema migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def run(store):
    """A fresh run (its own id) in the module's store."""
    uri = store
    manifest = {"dataset_hash": "h", "source": {"name": "synthetic"}, "counts": {}}
    run_id = start_run(uri, run_name="r", config={"meta": {"algorithm": "maml"}}, manifest=manifest)
    return uri, run_id


def _status(uri: str, run_id: str):
    r = mlflow.tracking.MlflowClient(tracking_uri=uri).get_run(run_id)
    return r.info.status, r.data.tags.get(ERROR_TAG)


def test_an_error_ends_the_run_failed_with_the_error(run):
    uri, run_id = run
    with pytest.raises(ValueError, match="boom"), ends_honestly(uri, run_id):
        raise ValueError("boom")
    assert _status(uri, run_id) == ("FAILED", "ValueError: boom")


def test_ctrl_c_ends_the_run_killed(run):
    uri, run_id = run
    with pytest.raises(KeyboardInterrupt), ends_honestly(uri, run_id):
        raise KeyboardInterrupt
    assert _status(uri, run_id) == ("KILLED", "interrupted: Ctrl-C")


def test_sigterm_raises_ends_the_run_killed_and_the_handler_is_restored(run):
    uri, run_id = run
    before = signal.getsignal(signal.SIGTERM)

    def terminated() -> None:
        with ends_honestly(uri, run_id):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread before this ends

    with pytest.raises(Terminated) as caught:
        terminated()
    assert caught.value.code == 128 + signal.SIGTERM
    assert _status(uri, run_id) == ("KILLED", "interrupted: SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before


def test_success_leaves_the_status_to_the_block_and_reopen_clears_the_error(run):
    uri, run_id = run
    with ends_honestly(uri, run_id):
        pass
    assert _status(uri, run_id) == ("RUNNING", None)
    with pytest.raises(RuntimeError), ends_honestly(uri, run_id):
        raise RuntimeError("worker died")
    reopen_run(uri, run_id)  # `metarec train --resume`
    assert _status(uri, run_id) == ("RUNNING", None)


def test_sigterm_that_a_blocking_call_turns_into_another_exit_still_reads_as_sigterm(run):
    uri, run_id = run

    def ray_get_like() -> None:  # ray.get turns a handler's exception into SystemExit(1)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            raise SystemExit(1) from None

    def terminated() -> None:
        with ends_honestly(uri, run_id):
            ray_get_like()

    with pytest.raises(Terminated) as caught:
        terminated()
    assert caught.value.code == 128 + signal.SIGTERM
    assert _status(uri, run_id) == ("KILLED", "interrupted: SIGTERM")


def _registered(uri: str, name: str, mae: float, scenario: str = "user_cold") -> str:
    """A finished run with a best valid MAE, registered as the next version of ``name``."""
    config = {"meta": {"algorithm": "maml"}, "train": {"scenario": scenario}}
    manifest = {"dataset_hash": "h", "source": {"name": "synthetic"}, "counts": {}}
    run_id = start_run(uri, run_name="r", config=config, manifest=manifest)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    client.log_metric(run_id, "best/valid_mae", mae)
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run_id}/model", run_id)
    client.set_tag(run_id, "metarec.registered", f"{name}/{mv.version}")
    client.set_registered_model_alias(name, "candidate", mv.version)
    return run_id


def test_train_ends_with_the_champion_comparison_and_never_moves_champion(tmp_path, capsys):
    from metarec.commands import print_against_champion
    from metarec.registry import against_champion, promote

    uri, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "metarec-synthetic-h"
    model = f"models:/{name}@candidate"
    first = _registered(uri, name, 0.60)
    print_against_champion(uri, model, first)
    assert f"none yet; serve this one with: metarec promote {name} 1" in capsys.readouterr().out

    promote(uri, name, 1)
    worse = _registered(uri, name, 0.65)
    c = against_champion(uri, model, worse)
    assert c["version"] == "2" and c["champion"] == {
        "version": "1",
        "valid_mae": 0.60,
        "comparable": True,
    }
    print_against_champion(uri, model, worse)
    line = capsys.readouterr().out
    assert "version 1, valid MAE 0.6000; this one 0.6500 (+0.0500, not better)" in line
    assert f"champion unchanged. To replace it: metarec promote {name} 2" in line

    better = _registered(uri, name, 0.55)
    print_against_champion(uri, model, better)
    assert "(-0.0500, better); champion unchanged" in capsys.readouterr().out
    other = _registered(uri, name, 0.10, scenario="item_cold")
    print_against_champion(uri, model, other)
    assert "validated on other users (another scenario): not compared" in capsys.readouterr().out
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "candidate").version) == "4"
