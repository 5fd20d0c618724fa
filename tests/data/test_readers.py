"""Bad input gets an error naming file and line, and good input with quirks still loads."""

import pandas as pd
import pytest

from metarec.data.sources import load_ratings_file
from metarec.errors import DataError

HEADER = "user,item,rating,timestamp\n"


def _write(tmp_path, text, name="ratings.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ("1,10,4,100\n1,11,x,101\n", r"ratings\.csv line 3: rating 'x' is not a number"),
        ("1,10,4,100\n1,11,,101\n", r"line 3: rating '' is not a number"),
        ("1,10,4,100\n1,11,nan,101\n", r"line 3: rating nan is not a finite number"),
        ("1,10,4,100\n1,11,inf,101\n", r"line 3: rating inf is not a finite number"),
        ("1,10,4,100\n1,11,4\n", r"line 3: got 3 fields; expected 4 separated by ','"),
        ("1,10,4,100\n1,11,4,100,7\n", r"line 3: got 5 fields; expected 4"),
    ],
)
def test_malformed_line_is_named(tmp_path, body, pattern):
    with pytest.raises(DataError, match=pattern):
        load_ratings_file(_write(tmp_path, HEADER + body))


def test_bad_line_after_blank_lines_reports_the_physical_line(tmp_path):
    path = _write(tmp_path, HEADER + "1,10,4,100\n\n1,11,nan,101\n")
    with pytest.raises(DataError, match="line 4: rating nan"):
        load_ratings_file(path)


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"ratings\.csv: file is empty"):
        load_ratings_file(_write(tmp_path, ""))


def test_header_only(tmp_path):
    with pytest.raises(DataError, match="has a header but no data lines"):
        load_ratings_file(_write(tmp_path, HEADER))


def test_missing_column_lists_what_was_found(tmp_path):
    with pytest.raises(DataError, match=r"line 1: header has columns \['user', 'item', 'score'\]"):
        load_ratings_file(_write(tmp_path, "user,item,score\n1,2,3\n"))


def test_wrong_delimiter_in_data_lines(tmp_path):
    # header sniffed as tab-separated, data comma-separated: the first data line is named
    with pytest.raises(DataError, match=r"line 2: got 1 fields; expected 3 separated by '\\t'"):
        load_ratings_file(_write(tmp_path, "user\titem\trating\n1,2,3\n"))


def test_bad_timestamp_is_named(tmp_path):
    with pytest.raises(DataError, match="line 3: timestamp 'yesterday' is neither"):
        load_ratings_file(_write(tmp_path, HEADER + "1,10,4,100\n1,11,4,yesterday\n"))


def test_semicolon_file_with_string_ids_iso_times_and_blank_tail(tmp_path):
    path = _write(
        tmp_path,
        "user;item;rating;timestamp\nalice;m1;4.5;2020-01-01T00:00:00Z\n"
        "bob;m2;3;2020-01-02T00:00:00Z\n\n\n",
    )
    raw = load_ratings_file(path)
    assert raw.ratings["user"].tolist() == ["alice", "bob"]
    assert raw.ratings["timestamp"].tolist() == [1577836800, 1577923200]


def test_parquet_input_and_wrong_type(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user": [1, 2], "item": [5, 6], "rating": [4.0, 2.0]}).to_parquet(path)
    assert load_ratings_file(path).ratings["rating"].tolist() == [4.0, 2.0]
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"user": [1], "item": [5], "rating": ["good"]}).to_parquet(bad)
    with pytest.raises(DataError, match="wrong type"):
        load_ratings_file(bad)


def test_parquet_nan_reports_the_row(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user": [1, 2], "item": [5, 6], "rating": [4.0, float("nan")]}).to_parquet(path)
    with pytest.raises(DataError, match=r"r\.parquet row 2: rating nan"):
        load_ratings_file(path)


def test_invalid_utf8_is_named(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_bytes(HEADER.encode() + b"1,10,4,100\n1,\xff\xfe,4,100\n")
    with pytest.raises(DataError, match="line 3: not valid utf8"):
        load_ratings_file(path)


def test_feature_table_with_repeated_id(tmp_path):
    from metarec.data.features import encode

    ratings = _write(tmp_path, HEADER + "1,10,4,100\n")
    items = _write(tmp_path, "item,genres,year\n10,Drama,1990\n10,Comedy,1991\n", "items.csv")
    with pytest.raises(DataError, match="item table row 2: item '10' appears twice"):
        encode(load_ratings_file(ratings, items=str(items)))
