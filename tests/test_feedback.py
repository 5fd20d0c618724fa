"""`metarec prepare --feedback`: what `metarec serve` logged becomes training data."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from metarec.config import apply_overrides
from metarec.data.prepare import prepare
from metarec.errors import DataError
from metarec.serving.sessions import FeedbackLog


def _log(directory, events, name="r1"):
    log = FeedbackLog(directory, name)
    log.append(events)
    log.close()
    return log.path


def test_feedback_folds_into_the_next_training_round(tmp_path, synthetic_cfg, synthetic_prepared):
    items = synthetic_prepared.items().column("raw_id").to_pylist()
    events = [
        {"user_id": "web-7", "item": items[k], "rating": 1 + k % 5, "timestamp": 1.7e9 + k}
        for k in range(20)
    ]
    events[0]["user"] = {"age": 33, "gender": "F", "occupation": "writer", "zip": "94110"}
    path = _log(tmp_path / "fb", events)
    with open(path, "ab") as f:  # a torn write from a crash: skipped, never half-read
        f.write(b'{"user_id": "web-7", "item"')
    cfg = apply_overrides(synthetic_cfg, **{"data.feedback": str(tmp_path / "fb")})
    ds = prepare(cfg, tmp_path / "data", progress=False)
    base = synthetic_prepared.manifest["counts"]
    counts = ds.manifest["counts"]
    assert counts["ratings_raw"] == base["ratings_raw"] + 20
    assert counts["users"] == base["users"] + 1
    assert path.name in ds.manifest["source"]["files"]  # provenance: hashed like any input
    users = ds.users()
    row = users.column("raw_id").to_pylist().index("web-7")
    occupation = ds.manifest["vocab"]["occupation"][users.column("occupation")[row].as_py()]
    assert occupation == "writer"
    tasks = [ds.tasks("user_cold", s) for s in ("train", "valid", "test")]
    found = [t for t in tasks if pc.any(pc.equal(t.column("user"), row)).as_py()]
    assert len(found) == 1  # 20 ratings: a task in exactly one split
    t = found[0].filter(pc.equal(found[0].column("user"), row))
    n = len(t.column("support_items")[0]) + len(t.column("query_items")[0])
    assert n == 20


def test_feedback_from_another_catalog_is_refused_naming_the_line(tmp_path, synthetic_cfg):
    _log(tmp_path, [{"user_id": "u", "item": "no-such-item", "rating": 3.0}])
    cfg = apply_overrides(synthetic_cfg, **{"data.feedback": str(tmp_path)})
    with pytest.raises(DataError, match=r"feedback-r1.jsonl line 1: item 'no-such-item'"):
        prepare(cfg, tmp_path / "data", progress=False)
    with pytest.raises(DataError, match="no feedback-"):
        prepare(
            apply_overrides(synthetic_cfg, **{"data.feedback": str(tmp_path / "empty")}),
            tmp_path / "data",
            progress=False,
        )
