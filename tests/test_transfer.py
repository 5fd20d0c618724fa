"""Cross-domain transfer: features map by name, item ids stay unseen, the CLI scores it."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from metarec.batch import from_table
from metarec.checkpoint import make_checkpoint, save_checkpoint
from metarec.config import apply_overrides
from metarec.data.prepared import open_prepared, write_prepared
from metarec.initialise import build_learner
from metarec.loop import predict_items
from metarec.results import method_rows
from metarec.train_state import TrainState
from metarec.transfer import map_features, transfer_learner, vocab_index


def test_vocab_index_maps_codes_by_name_and_unknown_to_zero():
    source = ["<pad>", "Action", "Comedy", "Drama"]
    target = ["<pad>", "Drama", "Western", "Action"]
    assert vocab_index(source, target).tolist() == [0, 3, 0, 1]
    mapping = map_features(
        {"genre": source, "year_bucket": ["<unk>"]}, {"genre": target, "year_bucket": ["<unk>"]}
    )
    assert mapping.missing["genre"] == ["Western"]
    assert mapping.coverage()["genre"] == "2/3"


def _permuted_copy(ds, out, rng):
    """The same ratings with genre and occupation vocabularies in another order: what
    another dataset's encoding of the same names looks like."""
    vocab = {k: list(v) for k, v in ds.manifest["vocab"].items()}
    tables = {"items": ds.items(), "users": ds.users(), "ratings": ds.ratings()}
    for feature, table, column in (
        ("genre", "items", "genres"),
        ("occupation", "users", "occupation"),
    ):
        names = vocab[feature]
        perm = np.r_[0, 1 + rng.permutation(len(names) - 1)]  # new code -> old code
        new_of_old = np.argsort(perm)
        vocab[feature] = [names[i] for i in perm]
        t = tables[table]
        col = t.column(column).combine_chunks()
        if isinstance(col, pa.ListArray):
            flat = new_of_old[col.flatten().to_numpy()].astype(np.int16)
            col = pa.ListArray.from_arrays(col.offsets, pa.array(flat))
        else:
            col = pa.array(new_of_old[col.to_numpy()].astype(np.int16))
        tables[table] = t.set_column(t.schema.get_field_index(column), column, col)
    tasks = {s: {p: ds.tasks(s, p) for p in ds.manifest["scenarios"][s]} for s in ds.scenarios}
    manifest = {k: v for k, v in ds.manifest.items() if k not in ("files", "dataset_hash")}
    manifest["vocab"] = vocab
    return open_prepared(write_prepared(out, **tables, tasks=tasks, manifest=manifest))


@pytest.fixture(scope="module")
def domains(synthetic_cfg, synthetic_prepared, tmp_path_factory):
    a = synthetic_prepared
    b = _permuted_copy(a, tmp_path_factory.mktemp("b") / "data", np.random.default_rng(0))
    train = from_table(a.tasks("user_cold", "train"))
    return a, b, build_learner(synthetic_cfg, a, train)


def test_transfer_maps_permuted_vocabularies_by_name(domains):
    a, b, learner = domains
    assert b.manifest["dataset_hash"] != a.manifest["dataset_hash"]
    a_genres, b_genres = (d.items().column("genres").to_pylist() for d in (a, b))
    assert sum(x != y for x, y in zip(a_genres, b_genres, strict=True)) > len(a_genres) // 2
    same, _ = transfer_learner(learner, a.manifest["vocab"], a)
    moved, mapping = transfer_learner(learner, a.manifest["vocab"], b)
    assert all(not m for m in mapping.missing.values())
    # B's features, read through the name mapping, are A's features exactly
    torch.testing.assert_close(moved.model.item_genres, same.model.item_genres)
    torch.testing.assert_close(moved.model.user_table, same.model.user_table)
    tasks = from_table(a.tasks("user_cold", "test"))
    torch.testing.assert_close(
        predict_items(moved, tasks, tasks.query_items),
        predict_items(same, tasks, tasks.query_items),
    )


def test_transferred_items_are_unseen_and_fall_back_to_features(domains):
    a, b, learner = domains
    moved, _ = transfer_learner(learner, a.manifest["vocab"], b)
    assert int(moved.model.item_id_index.abs().sum()) == 0  # every item: the unseen row
    assert not moved.model.item_bias.detach().any()
    assert torch.equal(moved.model.mlp["0_weight"], learner.model.mlp["0_weight"])
    tasks = from_table(a.tasks("user_cold", "test"))
    own = predict_items(learner, tasks, tasks.query_items)
    assert not torch.allclose(own, predict_items(moved, tasks, tasks.query_items))


def test_evaluate_cross_domain_scores_the_transferred_model(domains, synthetic_cfg, tmp_path):
    from metarec.cli import main

    a, b, _ = domains
    cfg = apply_overrides(synthetic_cfg, **{"meta.algorithm": "fomaml", "meta.inner_steps": 1})
    learner = build_learner(cfg, a, from_table(a.tasks("user_cold", "train")))
    ckpt = make_checkpoint(
        cfg, learner, None, TrainState(), dataset_hash=a.manifest["dataset_hash"]
    )
    path = save_checkpoint(ckpt, tmp_path / "a")
    args = ["evaluate", "--data", str(b.root), "--model", str(path), "--out", str(tmp_path / "o")]
    assert main(args) == 2  # another dataset without --cross-domain: refused
    fast = ["--epochs", "1", "--baselines", "user_mean", "--scenario", "user_cold"]
    assert main([*args, *fast, "--cross-domain"]) == 2  # no feature names anywhere: refused
    assert main([*args, *fast, "--cross-domain", "--source-data", str(a.root)]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(method_rows(results["user_cold"])) == {
        "fomaml",
        "transfer",
        "transfer_noadapt",
        "user_mean",
    }
    info = json.loads((tmp_path / "o" / "transfer.json").read_text())
    assert (
        info["coverage"]["genre"] == "18/18" and info["source_dataset_hash"] == ckpt["dataset_hash"]
    )
