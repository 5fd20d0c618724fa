"""Training checkpoints: plain dicts of tensors and numbers, written atomically.

A checkpoint holds what a run needs to go on (``loop.TrainState``, learner and optimizer
state) and what a reader needs to rebuild the model without the dataset (``spec``: table
sizes; the feature tables themselves are buffers in ``learner``). It records the hash of
the prepared dataset it was trained on, so a run is never resumed, and a model never
served, against a different dataset by accident. Read with ``weights_only=True``: loading
a checkpoint never runs code from it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from metarec.batch import Tasks
from metarec.catalog import catalog_dict
from metarec.config import MetarecConfig
from metarec.data.prepared import PreparedDataset
from metarec.errors import DataError
from metarec.initialise import blank_features, build_recommender
from metarec.meta import MetaLearner
from metarec.train_state import TrainState

__all__ = [
    "CHECKPOINT_VERSION",
    "learner_from_checkpoint",
    "load_checkpoint",
    "make_checkpoint",
    "restart_point",
    "save_checkpoint",
    "standalone_checkpoint",
]

CHECKPOINT_VERSION = 2  # 2: the ridge solver learns a prior precision
FILENAME = "checkpoint.pt"


def make_checkpoint(
    cfg: MetarecConfig,
    learner: MetaLearner,
    optimizer: torch.optim.Optimizer | None,
    state: TrainState,
    *,
    dataset_hash: str,
    catalog: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``catalog``: ``catalog.catalog_dict`` of the training data (what serving needs)."""
    model = learner.model
    return {
        "schema_version": CHECKPOINT_VERSION,
        "config": cfg.to_dict(),
        "dataset_hash": dataset_hash,
        "spec": {
            "n_items": int(model.item_genres.shape[0]),
            "n_users": int(model.user_table.shape[0]) if model.use_user else 0,
            "vocab_sizes": dict(model.vocab_sizes),
            "feedback": learner.feedback,
            "neighbours": int(model.neighbour_index.shape[1]) if model.has_neighbours else 0,
        },
        "learner": learner.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "state": state.to_dict(),
        "catalog": catalog,
    }


def standalone_checkpoint(
    cfg: MetarecConfig, learner: MetaLearner, ds: PreparedDataset, train: Tasks
) -> dict[str, Any]:
    """A checkpoint of ``learner`` with no optimizer or run state, but with the catalog of
    ``ds`` (``train``: the tasks it learned from): what a run starts from, and enough for
    ``metarec serve`` to load it."""
    return make_checkpoint(
        cfg,
        learner,
        None,
        TrainState(),
        dataset_hash=ds.manifest["dataset_hash"],
        catalog=catalog_dict(ds, train),
    )


def restart_point(ckpt: dict[str, Any], cfg: MetarecConfig) -> dict[str, Any]:
    """What a resumed run's workers start from: ``ckpt``'s network, graph and catalog under
    the resumed ``cfg``, without its optimizer or run state (each worker restores those
    from the checkpoint itself).

    Rebuilding the initial checkpoint instead would refit the driver's ALS item factors and
    neighbour graph only for the workers to overwrite them: minutes at the 25M scale."""
    return {**ckpt, "config": cfg.to_dict(), "optimizer": None, "state": TrainState().to_dict()}


def save_checkpoint(ckpt: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write ``DIR/checkpoint.pt`` atomically (temp file + rename): never a torn file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / FILENAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return directory / FILENAME


def load_checkpoint(path: str | os.PathLike, *, dataset_hash: str | None = None) -> dict[str, Any]:
    """Read a checkpoint file (or a directory holding one) and check what it belongs to.

    Raises:
        DataError: not a metarec checkpoint, another schema version, or (with
            ``dataset_hash``) trained on a different prepared dataset.
    """
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise DataError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors: the file is not ours or is damaged
        raise DataError(f"{path}: not a readable metarec checkpoint ({e})") from e
    version = ckpt.get("schema_version") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_VERSION:
        raise DataError(
            f"{path}: checkpoint schema version {version!r}; this metarec reads "
            f"{CHECKPOINT_VERSION}. Retrain, or use the metarec version that wrote it."
        )
    if dataset_hash is not None and ckpt["dataset_hash"] != dataset_hash:
        raise DataError(
            f"{path}: trained on prepared dataset {ckpt['dataset_hash']}, but --data has "
            f"{dataset_hash}. Resume against the same prepared directory (or start a new run)."
        )
    return ckpt


def learner_from_checkpoint(ckpt: dict[str, Any], *, best: bool = True) -> MetaLearner:
    """The learner of a checkpoint (its best validation epoch unless ``best=False``).

    The feature tables are buffers in the saved state, so only their shapes are needed to
    build the network before loading: no dataset required (serving, evaluation elsewhere).
    """
    cfg = MetarecConfig.from_dict(ckpt["config"], where="checkpoint config")
    spec = ckpt["spec"]
    model = build_recommender(cfg, blank_features(spec))
    learner = MetaLearner(model, cfg.meta, feedback=spec.get("feedback", "explicit"))
    state = ckpt["state"]["best_params"] if best and ckpt["state"]["best_params"] else None
    state = dict(state or ckpt["learner"])
    if hasattr(learner, "rating_std"):  # written before meta.huber: only training reads it
        state.setdefault("rating_std", learner.rating_std)
    learner.load_state_dict(state)
    return learner.eval()
