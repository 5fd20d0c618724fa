"""Each loader yields the canonical columns; features encode with 0 = unknown."""

import numpy as np
import pytest

from metarec.data.features import encode
from metarec.data.sources import load_ml1m, load_ml100k, load_mllatest, load_ratings_file
from metarec.errors import DataError


def test_ml100k_counts_and_features(ml100k_dir):
    raw = load_ml100k(ml100k_dir)
    assert len(raw.ratings) == 100_000
    assert raw.ratings["user"].nunique() == 943
    assert len(raw.items) == 1682
    toy = raw.items.set_index("item").loc[1]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["year"] == 1995
    assert sorted(toy["genres"]) == ["Animation", "Children's", "Comedy"]
    enc = encode(raw)
    assert enc.items.num_rows == 1682 and enc.users.num_rows == 943
    assert enc.cleaning == {"duplicates": 0}
    assert "unknown" not in enc.vocab["genre"]  # MovieLens' "unknown" genre means none
    assert enc.vocab["genre"][0] == "<pad>" and len(enc.vocab["genre"]) == 19
    users = enc.users.to_pandas()
    assert (users["age_bucket"] > 0).all() and (users["gender"] > 0).all()
    # u.user row 1: 24, M, technician, 85711 -> age 18-24, zip prefix '8'
    first = users.iloc[0]
    assert enc.vocab["age_bucket"][first["age_bucket"]] == "18-24"
    assert enc.vocab["occupation"][first["occupation"]] == "technician"
    assert enc.vocab["zip_prefix"][first["zip_prefix"]] == "8"


def test_ml1m_format(tmp_path):
    (tmp_path / "ratings.dat").write_text(
        "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n"
    )
    movies = "10::Amélie: Part 2 (2001)::Comedy|Romance\n20::Heat (1995)::Action|Crime|Thriller\n"
    (tmp_path / "movies.dat").write_bytes(movies.encode("latin-1"))
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    raw = load_ml1m(tmp_path)
    assert raw.ratings[["user", "item", "rating"]].values.tolist() == [
        [1, 10, 5],
        [1, 20, 3],
        [2, 10, 4],
    ]
    items = raw.items.set_index("item")
    assert items.loc[10, "title"] == "Amélie: Part 2 (2001)"  # single ':' kept, latin-1 read
    assert items.loc[10, "year"] == 2001
    assert items.loc[20, "genres"] == ["Action", "Crime", "Thriller"]
    users = raw.users.set_index("user")
    assert users.loc[1, "occupation"] == "K-12 student" and users.loc[2, "age"] == 56
    enc = encode(raw)
    assert enc.vocab["age_bucket"][enc.users.column("age_bucket").to_pylist()[1]] == "56+"


def test_ml1m_malformed_line(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::20::3\n")
    with pytest.raises(
        DataError,
        match=r"ratings\.dat line 2: got 3 fields; expected 4 "
        r"separated by '::'",
    ):
        load_ml1m(tmp_path)


def test_mllatest_format_quoted_titles_no_user_features(tmp_path):
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,2,3.5,964981247\n"
    )
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Untitled,(no genres listed)\n"
    )
    raw = load_mllatest(tmp_path)
    assert raw.users is None
    items = raw.items.set_index("item")
    assert items.loc[1, "title"] == "American President, The (1995)"
    assert items.loc[1, "year"] == 1995 and np.isnan(items.loc[2, "year"])
    assert items.loc[2, "genres"] == []
    enc = encode(raw)
    assert not enc.has_user_features
    assert (enc.users.column("age_bucket").to_numpy() == 0).all()  # all unknown, still valid
    assert enc.items.column("year_bucket").to_pylist()[1] == 0


def test_duplicates_keep_the_latest_rating(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating,timestamp\n1,a,1,300\n1,a,5,100\n2,a,2,5\n2,a,4,5\n")
    enc = encode(load_ratings_file(path))
    assert enc.cleaning["duplicates"] == 2
    got = dict(zip(enc.ratings["user"], enc.ratings["rating"], strict=True))
    assert got == {0: 1.0, 1: 4.0}  # user 1: latest timestamp; user 2: same time, later line


def test_generic_feature_tables_and_unrated_catalog_items(tmp_path):
    (tmp_path / "r.csv").write_text("user,item,rating\nu1,i1,4\nu2,i2,3\n")
    (tmp_path / "items.csv").write_text(
        "item,title,genres,year\ni1,One,Drama|War,1980\ni2,Two,,\ni3,Three (2001),Comedy,\n"
    )
    (tmp_path / "users.csv").write_text("user,age,gender\nu1,33,f\nu9,50,m\n")
    enc = encode(
        load_ratings_file(
            tmp_path / "r.csv", items=str(tmp_path / "items.csv"), users=str(tmp_path / "users.csv")
        )
    )
    items = enc.items.to_pandas()
    assert items["raw_id"].tolist() == ["i1", "i2", "i3"]  # unrated i3 is still in the catalog
    assert items["year"].tolist() == [1980, 0, 2001]  # missing year -> from title, else 0
    assert [[enc.vocab["genre"][g] for g in gs] for gs in items["genres"]] == [
        ["Drama", "War"],
        [],
        ["Comedy"],
    ]
    users = enc.users.to_pandas()
    assert enc.vocab["gender"][users["gender"][0]] == "F"
    assert [enc.vocab["age_bucket"][a] for a in users["age_bucket"]] == ["25-34", "<unk>"]


def test_the_ml25m_layout_is_read_with_heavy_users_kept(tmp_path):
    """ML-20M/25M's files (quoted titles with commas, ``|`` genres, ``(no genres listed)``,
    half stars), written from synthetic long-tailed data and prepared as ``ml-latest``
    with the user cap lifted as ``configs/ml25m.yaml`` lifts it: every rating and every
    user arrives, the heaviest with all of theirs."""
    from metarec.config import load_config
    from metarec.data.prepare import prepare
    from metarec.data.synthetic import generate

    syn = load_config(
        None,
        **{
            "data.synthetic.n_users": 300,
            "data.synthetic.n_items": 400,
            "data.synthetic.min_ratings_per_user": 15,
            "data.synthetic.max_ratings_per_user": 300,
            "data.synthetic.activity_pareto": 1.0,
            "data.synthetic.scale": "0.5-5",
        },
    ).data.synthetic
    raw = generate(syn, seed=0)
    r = raw.ratings
    r.rename(columns={"user": "userId", "item": "movieId"})[
        ["userId", "movieId", "rating", "timestamp"]
    ].to_csv(tmp_path / "ratings.csv", index=False, float_format="%.1f")
    items = raw.items.assign(
        title=[
            f'"Film {i}, The ({int(y)})"'
            for i, y in zip(raw.items["item"], raw.items["year"], strict=True)
        ],
        genres=["|".join(g) or "(no genres listed)" for g in raw.items["genres"]],
    )
    lines = ["movieId,title,genres"] + [
        f"{i},{t},{g}"
        for i, t, g in zip(items["item"], items["title"], items["genres"], strict=True)
    ]
    (tmp_path / "movies.csv").write_text("\n".join(lines) + "\n")
    heaviest = int(r.groupby("user").size().max())
    assert heaviest > 100  # the protocol's default cap would have dropped this user

    cfg = load_config(
        None,
        **{"data.source": "ml-latest", "data.input": str(tmp_path), "data.max_ratings": 10**6},
        overrides=["data.scenarios=user_cold"],
    )
    ds = prepare(cfg, tmp_path / "out", progress=False)
    counts = ds.manifest["counts"]
    assert counts["ratings_kept"] == len(r) and counts["users_kept"] == r["user"].nunique()
    tasks = [ds.tasks("user_cold", s).to_pylist() for s in ("train", "valid", "test")]
    lengths = [len(t["support_items"]) + len(t["query_items"]) for ts in tasks for t in ts]
    assert max(lengths) == heaviest and sum(lengths) == len(r)
    loaded = load_mllatest(tmp_path)
    assert loaded.items["title"].iloc[0] == f"Film 1, The ({int(raw.items['year'].iloc[0])})"
    assert loaded.items["year"].tolist() == raw.items["year"].tolist()
    assert set(loaded.ratings["rating"]) <= {x / 2 for x in range(1, 11)}
