"""The model registry: promote a version, compare with the champion, find a model's
checkpoint and run. Only ``promote`` moves the ``champion`` alias that serving loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow

from metarec.checkpoint import FILENAME
from metarec.errors import ModelNotFoundError
from metarec.tracking import CHAMPION, client_for, using_uri

__all__ = ["against_champion", "describe_model", "promote", "resolve_checkpoint"]


def promote(uri: str, name: str, version: str | int, alias: str = CHAMPION) -> None:
    """Point ``alias`` (default ``champion``) of registered model ``name`` at ``version``."""
    client = client_for(uri)
    try:
        client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as e:
        raise ModelNotFoundError(f"{name} version {version}: not in the registry at {uri}") from e
    client.set_registered_model_alias(name, alias, str(version))


def against_champion(
    uri: str, model: str, run_id: str, key: str = "best/valid_mae"
) -> dict[str, Any]:
    """This run's best validation objective (``key``: MAE on ratings, ``loop.best_key``)
    beside the current champion's of the same registered model (one dataset), so that
    ``train`` and ``tune`` can say whether promoting is worth it. Nothing moves:
    ``champion`` changes only through ``promote``.

    Returns ``{"name", "version" (this run's), "valid_mae", "champion": None | {"version",
    "valid_mae", "comparable"}}``; ``comparable`` is False when the two runs validated on
    different users (another scenario), and then the MAEs say nothing about each other.
    """
    client = client_for(uri)
    name = model.removeprefix("models:/").split("@")[0]
    mine = client.get_run(run_id).data
    version = mine.tags.get("metarec.registered", "/").rpartition("/")[2]
    out: dict[str, Any] = {
        "name": name,
        "version": version,
        "valid_mae": mine.metrics.get(key),
        "champion": None,
    }
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return out  # no champion yet
    theirs = client.get_run(mv.run_id).data
    scenario = "train.scenario"
    out["champion"] = {
        "version": str(mv.version),
        "valid_mae": theirs.metrics.get(key),
        "comparable": theirs.params.get(scenario) == mine.params.get(scenario),
    }
    return out


def resolve_checkpoint(model: str, uri: str) -> Path:
    """The checkpoint file of ``models:/...``, ``runs:/...`` or a local file/directory."""
    if not model.startswith(("models:/", "runs:/")):
        path = Path(model)
        if not path.exists():
            raise ModelNotFoundError(f"--model {model}: no such file or directory")
        return path
    try:
        with using_uri(uri):
            local = mlflow.artifacts.download_artifacts(artifact_uri=model, tracking_uri=uri)
    except mlflow.exceptions.MlflowException as e:
        raise ModelNotFoundError(f"--model {model}: {e.message}") from e
    found = sorted(Path(local).rglob(FILENAME))
    if not found:
        raise ModelNotFoundError(f"--model {model}: no {FILENAME} in its artifacts")
    return found[0]


def describe_model(model: str, uri: str) -> dict[str, Any]:
    """Registry facts about ``model``: name, version, alias and the run that produced it.

    ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` are looked up in the registry;
    ``runs:/ID/...`` names its run; a local checkpoint has neither (all None). What
    ``GET /v1/model`` reports, and where ``metarec evaluate`` logs an evaluation.
    """
    info: dict[str, Any] = {"uri": model, "name": None, "version": None, "alias": None}
    if model.startswith("runs:/"):
        return {**info, "run_id": model.removeprefix("runs:/").split("/")[0]}
    if not model.startswith("models:/"):
        return {**info, "run_id": None}
    name, _, alias = model.removeprefix("models:/").partition("@")
    if not alias:
        name, _, version = name.rpartition("/")
    client = client_for(uri)
    try:
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except mlflow.exceptions.MlflowException as e:
        raise ModelNotFoundError(f"--model {model}: {e.message}") from e
    return {
        **info,
        "name": name,
        "version": str(mv.version),
        "alias": alias or None,
        "run_id": mv.run_id,
    }
