"""The MLflow Python model takes raw item ids, as the HTTP API and the training files do.

It once read integer ids as internal positions: 50 scored "Legends of the Fall", not "Star
Wars". These tests pin the mapping on ML-100k through a real ``mlflow.pyfunc.load_model``.
"""

from __future__ import annotations

import pandas as pd
import pytest

from metarec.batch import from_table
from metarec.checkpoint import save_checkpoint, standalone_checkpoint
from metarec.config import apply_overrides, load_config
from metarec.loop import fit
from metarec.serving.engine import Engine, Job

pytestmark = pytest.mark.integration  # an MLflow store and a logged model


@pytest.fixture(scope="module")
def pyfunc(ml100k_prepared, tmp_path_factory):
    import mlflow

    from metarec.tracking import finish_run, resolve_tracking_uri, start_run, using_uri

    ds = ml100k_prepared
    cfg = apply_overrides(load_config(None, **{"data.source": "ml-100k"}), **{"train.epochs": 1})
    res = fit(cfg, ds)
    train = from_table(ds.tasks("user_cold", "train"))
    work = tmp_path_factory.mktemp("pyfunc")
    save_checkpoint(standalone_checkpoint(cfg, res.learner, ds, train), work / "ckpt")
    uri = resolve_tracking_uri(None, work)
    run_id = start_run(uri, run_name="r", config=cfg.to_dict(), manifest=ds.manifest)
    model_uri = finish_run(
        uri, run_id, checkpoint_dir=work / "ckpt", history=res.history, summary={},
        model_name="m",
    )  # fmt: skip
    with using_uri(uri):  # (mlflow.set_tracking_uri alone would leak into later tests' env)
        model = mlflow.pyfunc.load_model(model_uri)
    return model, model.unwrap_python_model()


def test_raw_ids_score_the_items_they_name(pyfunc):
    model, inner = pyfunc
    catalog = inner.catalog
    star_wars = catalog.index["50"]
    assert catalog.item(star_wars)["title"] == "Star Wars (1977)"
    assert star_wars != 50  # positions differ from ids, so the old bug would show
    support = (["1", "181", "258"], [5.0, 4.0, 2.0])
    frame = pd.DataFrame(
        {
            "support_items": [support[0], [1, 181, 258]],  # strings or ints: the same ids
            "support_ratings": [support[1], support[1]],
            "items": [["50", "172"], [50, 172]],
            "user": [{"age": 30, "gender": "F"}, {"age": 30, "gender": "f"}],
        }
    )
    got = model.predict(frame)
    # same ids either way; float32 rounding may differ with the row's place in the batch
    assert got[0] == pytest.approx(got[1], rel=1e-6)
    ref = Engine(inner.engine.learner).run(
        [
            Job(
                features=tuple(catalog.encode_user({"age": 30, "gender": "F"})),
                items=tuple(catalog.index[i] for i in support[0]),
                ratings=tuple(support[1]),
            )
        ]
    )[0]
    assert got[0] == pytest.approx(ref.scores[[star_wars, catalog.index["172"]]].tolist(), rel=1e-6)
    assert got[0][0] != ref.scores[50].item()  # not the item at position 50


def test_unknown_ids_and_values_name_the_row_and_field(pyfunc):
    model, _ = pyfunc

    def frame(**row):
        base = {"support_items": [["1"]], "support_ratings": [[4.0]], "items": [["50"]]}
        return pd.DataFrame({**base, **{k: [v] for k, v in row.items()}})

    with pytest.raises(Exception, match=r"row 0: items\[1\]: unknown item id '99999'"):
        model.predict(frame(items=["50", "99999"]))
    with pytest.raises(Exception, match=r"row 0: support_items\[0\]: unknown item id"):
        model.predict(frame(support_items=["nope"]))
    with pytest.raises(Exception, match=r"row 0: user.occupation: unknown value 'astronaut'"):
        model.predict(frame(user={"occupation": "astronaut"}))
    with pytest.raises(Exception, match=r"row 0: support_ratings: 2 ratings for 1"):
        model.predict(frame(support_ratings=[4.0, 3.0]))
