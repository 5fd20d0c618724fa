"""The prepared directory: byte-identical reruns, atomic replacement, schema refusal."""

import json

import pyarrow.parquet as pq
import pytest

from metarec.data.prepare import prepare
from metarec.data.prepared import MANIFEST, open_prepared, summarize
from metarec.errors import DataError


def _bytes(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_rerun_is_byte_identical(synthetic_cfg, synthetic_prepared, tmp_path):
    again = prepare(synthetic_cfg, tmp_path / "again", progress=False)
    assert _bytes(again.root) == _bytes(synthetic_prepared.root)


def test_rerun_into_same_dir_replaces_it(synthetic_cfg, tmp_path):
    out = tmp_path / "data"
    first = prepare(synthetic_cfg, out, progress=False).manifest["dataset_hash"]
    (out / "stale.txt").write_text("from an older run")
    second = prepare(synthetic_cfg, out, progress=False).manifest["dataset_hash"]
    assert first == second and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp dirs left


def test_failure_mid_write_keeps_the_old_dataset(synthetic_cfg, tmp_path, monkeypatch):
    out = tmp_path / "data"
    prepare(synthetic_cfg, out, progress=False)
    before = _bytes(out)
    calls = {"n": 0}
    real = pq.write_table

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", flaky)
    with pytest.raises(OSError, match="disk full"):
        prepare(synthetic_cfg, out, progress=False)
    assert _bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_bad_input_writes_nothing(tmp_path):
    from metarec.config import load_config

    bad = tmp_path / "r.csv"
    bad.write_text("user,item,rating\n1,2,3\n1,3,oops\n")
    cfg = load_config(None, **{"data.source": "ratings", "data.input": str(bad)})
    with pytest.raises(DataError, match="line 3: rating 'oops'"):
        prepare(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_to_replace_a_directory_that_is_not_a_dataset(synthetic_cfg, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="is not a metarec dataset"):
        prepare(synthetic_cfg, out, progress=False)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_schema_version_mismatch_is_refused(synthetic_prepared, tmp_path):
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(synthetic_prepared.root, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["schema_version"] = 0
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="schema_version 0; expected 1.*re-run `metarec prepare`"):
        open_prepared(copy)
    with pytest.raises(DataError, match="no manifest.json"):
        open_prepared(tmp_path)


def test_unknown_scenario_or_split_names_the_choices(synthetic_prepared):
    with pytest.raises(DataError, match="scenario: got 'cold'; expected one of"):
        synthetic_prepared.tasks("cold", "train")
    with pytest.raises(DataError, match="split: got 'dev'"):
        synthetic_prepared.tasks("warm", "dev")


def test_manifest_records_protocol_checksums_and_vocab(synthetic_prepared):
    m = synthetic_prepared.manifest
    assert m["schema_version"] == 1 and len(m["dataset_hash"]) == 16
    assert m["protocol"]["query_size"] == 10 and m["protocol"]["seed"] == 0
    assert m["source"]["generator"]["n_users"] == 600
    assert set(m["files"]) >= {"items.parquet", "users.parquet", "tasks/warm/test.parquet"}
    assert m["vocab_sizes"]["genre"] == len(m["vocab"]["genre"]) == 19
    text = summarize(m)
    assert "user_cold" in text and "synthetic" in text


def test_missing_timestamps_skip_temporal_by_default_but_fail_when_asked(tmp_path):
    from metarec.config import load_config

    rows = "\n".join(f"{u},{i},{(u + i) % 5 + 1}" for u in range(30) for i in range(20))
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\n" + rows + "\n")
    cfg = load_config(None, **{"data.source": "ratings", "data.input": str(path)})
    ds = prepare(cfg, tmp_path / "a", progress=False)
    assert "temporal" not in ds.scenarios and "no timestamps" in str(
        ds.manifest["skipped_scenarios"]
    )
    assert "warm" not in ds.scenarios  # no item years either
    explicit = load_config(
        None,
        **{
            "data.source": "ratings",
            "data.input": str(path),
            "data.scenarios": "user_cold,temporal",
        },
    )
    with pytest.raises(DataError, match="--scenarios temporal: cannot be built"):
        prepare(explicit, tmp_path / "b", progress=False)
