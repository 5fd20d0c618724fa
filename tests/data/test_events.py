"""Implicit feedback sources: event logs and interaction counts, through `metarec prepare`."""

import json

import pytest

from metarec.config import load_config
from metarec.data.events import load_events, load_interactions
from metarec.data.prepare import prepare
from metarec.errors import DataError

WEIGHTS = {"view": 1.0, "cart": 3.0, "purchase": 5.0}


def _events(tmp_path, rows, header="user,item,event,timestamp"):
    path = tmp_path / "events.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_a_pairs_events_sum_into_one_interaction_at_its_first_time(tmp_path):
    path = _events(
        tmp_path,
        [
            "u1,shoe,view,100",
            "u1,shoe,cart,160",
            "u2,shoe,view,50",
            "u1,shoe,purchase,200",
            "u1,hat,view,2024-01-01T00:00:00Z",
        ],
    )
    raw = load_events(path, WEIGHTS)
    assert raw.feedback == "implicit"
    got = {(r.user, r.item): (r.rating, r.timestamp) for r in raw.ratings.itertuples()}
    assert got == {
        ("u1", "shoe"): (9.0, 100),
        ("u2", "shoe"): (1.0, 50),
        ("u1", "hat"): (1.0, 1704067200),
    }


def test_a_value_column_multiplies_the_event_weight(tmp_path):
    path = _events(
        tmp_path,
        ["u1,song,view,2.5,10", "u1,song,view,1,20"],
        header="user,item,event,value,timestamp",
    )
    assert load_events(path, WEIGHTS).ratings["rating"].tolist() == [3.5]


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        (["u1,a,view,1", "u1,b,click,2"], None, r"line 3: event 'click' has no weight"),
        (["u1,a,view,0,1"], "user,item,event,value,timestamp", r"line 2: value 0 is not positive"),
        (["u1,a,view,yesterday"], None, r"line 2: timestamp 'yesterday' is neither"),
        (["u1,a,view"], "user,item,event", r"timestamp"),
    ],
)
def test_bad_events_name_file_and_line(tmp_path, rows, header, message):
    path = _events(tmp_path, rows, **({"header": header} if header else {}))
    with pytest.raises(DataError, match=message):
        load_events(path, WEIGHTS)


def test_interaction_counts_are_strengths_and_a_zero_count_is_an_error(tmp_path):
    path = tmp_path / "plays.tsv"
    path.write_text("user\titem\tcount\nu1\tsong\t12\nu1\tsong\t3\nu2\tsong\t1\n")
    raw = load_interactions(path)
    assert sorted(raw.ratings["rating"].tolist()) == [1.0, 15.0]
    path.write_text("user\titem\tcount\nu1\tsong\t12\nu2\tsong\t0\n")
    with pytest.raises(DataError, match=r"plays.tsv line 3: count 0 is not positive"):
        load_interactions(path)


def _shop_log(tmp_path, users=40, items=60):
    rows, t = [], 0
    for u in range(users):
        for k in range(20):
            t += 1
            item = (u * 7 + k * 3) % items
            rows.append(f"u{u},i{item},view,{t}")
            if k % 4 == 0:
                rows.append(f"u{u},i{item},purchase,{t + 1}")
    return _events(tmp_path, rows)


def test_an_implicit_dataset_is_evaluated_with_its_baselines_and_the_meta_learner(tmp_path, capsys):
    from metarec.cli import main

    path = _shop_log(tmp_path)
    cfg = load_config(None, **{"data.source": "events", "data.input": str(path)})
    ds = prepare(cfg, tmp_path / "prepared", progress=False)
    assert ds.feedback == "implicit" and ds.manifest["feedback"] == "implicit"
    assert {"user_cold", "temporal"} <= set(ds.scenarios)
    assert ds.manifest["ratings"]["max"] == 6.0  # view + purchase
    data = ["--data", str(tmp_path / "prepared")]
    assert main(["evaluate", *data, "--out", str(tmp_path / "e"), "--seeds", "0", "1"]) == 2
    assert "--seeds: got [0, 1] for an implicit" in capsys.readouterr().err
    out = tmp_path / "e"
    flags = ["--baselines", "popularity,ease", "--epochs", "2"]
    assert main(["evaluate", *data, "--out", str(out), *flags]) == 0
    rows = json.loads((out / "results.json").read_text())["user_cold"]
    paired = rows["_paired"]
    assert paired["reference"] in {"popularity", "ease"}  # the best *baseline* on validation
    other = {"popularity", "ease", "maml"} - {paired["reference"]}
    assert set(paired) == {"reference", *other}
    assert set(paired["maml"]) == {"hr@10", "ndcg@10", "recall@20", "mrr"}
    assert set(rows["_paired_meta"]) == {"method", "popularity", "ease"}  # maml minus each
    assert 0 <= rows["ease"]["ndcg@10"] <= 1 and 0 < rows["ease"]["coverage@10"] <= 1
    (history,) = rows["maml"]["history"]  # one split, two epochs
    assert len(history) == 2 and 0 <= rows["maml"]["ndcg@10"] <= 1
    cut = tmp_path / "cut"
    flags = ["--baselines", "popularity", "--epochs", "1", "--split-seeds", "3", "4"]
    assert (
        main(["evaluate", *data, "--out", str(cut), *flags, "--set", "evaluate.max_support=5"]) == 0
    )
    rows = json.loads((cut / "results.json").read_text())["user_cold"]
    assert rows["_protocol"]["splits"] == [3, 4]
    assert rows["_protocol"]["support"] == "at most 5 interactions"
    assert len(rows["maml"]["per_split"]) == len(rows["popularity"]["per_split"]) == 2


def test_an_implicit_report_has_the_shot_curve_with_cis_and_the_plots(tmp_path, capsys):
    from metarec.cli import main

    cfg = load_config(None, **{"data.source": "events", "data.input": str(_shop_log(tmp_path))})
    prepare(cfg, tmp_path / "prepared", progress=False)
    out = tmp_path / "r"
    flags = ["--baselines", "popularity,item_knn", "--epochs", "1", "--shots", "0", "1", "4"]
    assert main(["report", "--data", str(tmp_path / "prepared"), "--out", str(out), *flags]) == 0
    curves = json.loads((out / "curves.json").read_text())["user_cold"]
    assert curves["shots"] == [0, 1, 4]
    assert set(curves["shot_curve"]) == {"maml", "popularity", "item_knn"}
    for per_metric in curves["shot_curve"].values():
        ndcg = [mean for mean, _ in per_metric["ndcg@10"]]
        assert len(ndcg) == 3 and all(0 <= v <= 1 for v in ndcg)
    popularity = [mean for mean, _ in curves["shot_curve"]["popularity"]["recall@20"]]
    assert popularity[0] == pytest.approx(popularity[1], abs=0.05)  # blind to the support
    paired = curves["shot_paired"]["item_knn"]  # the meta-learner minus item-KNN, per shot
    assert len(paired) == 3 and set(paired[0]) == {"ndcg@10", "recall@20"}
    lo, hi = paired[2]["ndcg@10"]["ci95"]
    assert lo <= paired[2]["ndcg@10"]["diff"] <= hi
    users = curves["per_user"]
    assert len(users["ndcg@10"]["maml"]) == len(users["support_size"]) == len(users["bucket"])
    report = (out / "report.md").read_text()
    assert "| maml" in report and "Shot curve, paired" in report and "K = 4" in report
    for png in ("shot_curve.png", "per_user.png", "learning_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_event_weights_come_from_config(tmp_path):
    path = _shop_log(tmp_path)
    flags = {"data.source": "events", "data.input": str(path)}
    cfg = load_config(None, overrides=["data.event_weights={view: 2, purchase: 10}"], **flags)
    ds = prepare(cfg, tmp_path / "prepared", progress=False)
    assert ds.manifest["ratings"]["max"] == 12.0
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["protocol"]["duplicates"].startswith("a (user, item) pair's events sum")


def test_explicit_manifests_without_the_field_read_as_explicit(tmp_path):
    from metarec.data.prepared import PreparedDataset

    assert PreparedDataset(tmp_path, {"scenarios": {}}).feedback == "explicit"


def test_a_trained_implicit_model_is_scored_where_it_fits(tmp_path):
    """``evaluate --model``: the model is scored on its own split, and re-fitted on a split
    whose test users it trained on."""
    from metarec.batch import from_table
    from metarec.checkpoint import save_checkpoint, standalone_checkpoint
    from metarec.cli import main
    from metarec.config import apply_overrides
    from metarec.loop import fit

    path = _shop_log(tmp_path)
    cfg = load_config(None, **{"data.source": "events", "data.input": str(path)})
    ds = prepare(cfg, tmp_path / "prepared", progress=False)
    cfg = apply_overrides(cfg, **{"train.epochs": 1})
    train = from_table(ds.tasks("user_cold", "train"))
    ckpt = standalone_checkpoint(cfg, fit(cfg, ds).learner, ds, train)
    model = save_checkpoint(ckpt, tmp_path / "model")
    data = ["--data", str(tmp_path / "prepared"), "--baselines", "popularity", "--epochs", "1"]
    out = tmp_path / "e"
    assert main(["evaluate", *data, "--model", str(model), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["user_cold"]
    assert rows["maml"]["source"] == ["model"]
    again = tmp_path / "e2"
    args = ["--model", str(model), "--split-seeds", "7", "--out", str(again)]
    assert main(["evaluate", *data, *args]) == 0
    assert json.loads((again / "results.json").read_text())["user_cold"]["maml"]["source"] == [
        "fit"
    ]
