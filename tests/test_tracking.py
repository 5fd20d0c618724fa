"""MLflow runs end honestly: FAILED on an error, KILLED on Ctrl-C or SIGTERM, with the reason
recorded; a resumed run is RUNNING again. A real SQLite-backed MLflow store, no server."""

from __future__ import annotations

import os
import signal
import time

import pytest

mlflow = pytest.importorskip("mlflow")

from metarec.tracking import ERROR_TAG, Terminated, ends_honestly, reopen_run, start_run  # noqa: E402


@pytest.fixture
def run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
