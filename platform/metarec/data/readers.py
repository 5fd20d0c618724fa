"""Read delimited rating/feature files fast, and say exactly where they are broken.

The fast path is pyarrow's multi-threaded CSV reader. When it rejects a file we re-scan it
line by line in Python only to find the first bad line, so errors name file and line
(``ratings.csv line 1042: rating 'x' is not a number``) without slowing the good path.
Blank lines are skipped (MovieLens files end with some), so a row number is turned into a
line number by a scan, again only when there is an error to report.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from metarec.errors import DataError

__all__ = [
    "ColumnSpec",
    "check_finite",
    "read_delimited",
    "read_table_file",
    "row_location",
    "sniff_delimiter",
]

_SEP_SUBSTITUTE = "\x1f"  # ASCII unit separator: stands in for multi-char separators like '::'
_NAMES = {pa.int64(): "an integer", pa.float64(): "a number", pa.string(): "text"}


@dataclass(frozen=True)
class ColumnSpec:
    """A column to read: its name, arrow type, and whether it may be absent from a header."""

    name: str
    type: pa.DataType
    required: bool = True


def read_delimited(
    path: Path,
    columns: list[ColumnSpec],
    *,
    sep: str,
    header: bool,
    names: list[str] | None = None,
    encoding: str = "utf8",
    quoted: bool = False,
) -> pa.Table:
    """Read ``path`` into a table holding ``columns`` (in that order).

    Args:
        header: the first line names the columns (then ``names`` must be None).
        names: for headerless files, the name of every field on a line, in order.
        quoted: fields may be double-quoted (MovieLens latest's ``movies.csv``); otherwise
            quotes are ordinary characters (MovieLens 100K titles contain them).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(
            f"{path}: file is empty; expected {'a header and ' if header else ''}"
            "at least one data line"
        )
    if header:
        names = _header_names(path, sep=sep, encoding=encoding, columns=columns)
    assert names is not None
    present = [c for c in columns if c.name in names]
    source: Path | pa.NativeFile = path
    delimiter = sep
    if len(sep) > 1:  # pyarrow only takes one-char delimiters; '::' never occurs inside fields
        source = pa.BufferReader(path.read_bytes().replace(sep.encode(), _SEP_SUBSTITUTE.encode()))
        delimiter = _SEP_SUBSTITUTE
    try:
        table = pacsv.read_csv(
            source,
            read_options=pacsv.ReadOptions(
                column_names=names,
                skip_rows=1 if header else 0,
                encoding=encoding,
                block_size=1 << 24,
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter, quote_char='"' if quoted else False, ignore_empty_lines=True
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c.name: c.type for c in present},
                include_columns=[c.name for c in present],
                null_values=[],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise _locate(
            path, present, names, sep=sep, header=header, encoding=encoding, quoted=quoted, cause=e
        ) from e
    if table.num_rows == 0:
        raise DataError(f"{path}: has a header but no data lines; expected at least one")
    return table


def check_finite(table: pa.Table, column: str, *, path: Path, header: bool) -> None:
    """Reject NaN/inf/null in a numeric column, naming the first offending line."""
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(
            f"{path} {row_location(path, row, header=header)}: {column} "
            f"{float(values[row])} is not a finite number; fix or remove the line"
        )


def row_location(path: Path, row: int, *, header: bool) -> str:
    """'line N' of the ``row``-th (0-based) data row, skipping blank lines; 'row N' for Parquet."""
    if Path(path).suffix.lower() in {".parquet", ".pq"}:
        return f"row {row + 1}"
    seen = -1
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if (header and lineno == 1) or not raw.strip():
                continue
            seen += 1
            if seen == row:
                return f"line {lineno}"
    return f"row {row + 1}"


def read_table_file(path: Path, columns: list[ColumnSpec]) -> tuple[pa.Table, bool]:
    """Read a CSV/TSV (header required, delimiter sniffed) or Parquet file.

    Returns the table and whether row numbers are offset by a header line.
    """
    path = Path(path)
    if path.suffix.lower() in {".parquet", ".pq"}:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
        missing = [c.name for c in columns if c.required and c.name not in table.column_names]
        if missing:
            raise DataError(f"{path}: got columns {table.column_names}; expected {missing} too")
        if table.num_rows == 0:
            raise DataError(f"{path}: has no rows; expected at least one")
        keep = [c for c in columns if c.name in table.column_names]
        try:
            table = table.select([c.name for c in keep]).cast(
                pa.schema([pa.field(c.name, c.type) for c in keep])
            )
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(
                f"{path}: a column has the wrong type ({e}); expected "
                + ", ".join(f"{c.name}: {_NAMES.get(c.type, c.type)}" for c in keep)
            ) from e
        return table, False
    sep = sniff_delimiter(path)
    return read_delimited(path, columns, sep=sep, header=True), True


def sniff_delimiter(path: Path) -> str:
    """Pick the delimiter of a header line among comma, tab, semicolon and pipe."""
    first = _first_line(path, "utf8")
    counts = {sep: first.count(sep) for sep in (",", "\t", ";", "|")}
    sep, n = max(counts.items(), key=lambda kv: kv[1])
    return sep if n else ","


def _first_line(path: Path, encoding: str) -> str:
    with open(path, encoding=encoding, errors="replace", newline="") as f:
        return f.readline().rstrip("\r\n")


def _header_names(path: Path, *, sep: str, encoding: str, columns: list[ColumnSpec]) -> list[str]:
    line = _first_line(path, encoding)
    names = [n.strip().strip('"') for n in line.split(sep)]
    missing = [c.name for c in columns if c.required and c.name not in names]
    if missing:
        hint = ""
        other = sniff_delimiter(path)
        if other != sep:
            hint = f" The header looks {other!r}-separated; expected {sep!r}."
        raise DataError(
            f"{path} line 1: header has columns {names}; expected {missing} "
            f"(and optionally {[c.name for c in columns if not c.required]}).{hint}"
        )
    return names


def _locate(
    path: Path,
    columns: list[ColumnSpec],
    names: list[str],
    *,
    sep: str,
    header: bool,
    encoding: str,
    quoted: bool,
    cause: Exception,
) -> DataError:
    """Find the first bad line by a slow scan; called only after the fast reader failed."""
    index = {c.name: names.index(c.name) for c in columns}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if header and lineno == 1:
                continue
            try:
                text = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as e:
                return DataError(f"{path} line {lineno}: not valid {encoding} text ({e.reason})")
            if not text.strip():
                continue
            fields = (
                next(csv.reader(io.StringIO(text), delimiter=sep)) if quoted else text.split(sep)
            )
            if len(fields) != len(names):
                return DataError(
                    f"{path} line {lineno}: got {len(fields)} fields; expected {len(names)} "
                    f"separated by {sep!r}: {text[:120]!r}"
                )
            for c in columns:
                problem = _field_problem(fields[index[c.name]], c.type)
                if problem:
                    return DataError(f"{path} line {lineno}: {c.name} {problem}")
    return DataError(f"{path}: could not be parsed ({cause})")


def _field_problem(value: str, kind: pa.DataType) -> str | None:
    value = value.strip()
    if kind == pa.int64():
        try:
            int(value)
        except ValueError:
            return f"{value!r} is not an integer"
    elif kind in (pa.float64(), pa.float32()):
        try:
            if not math.isfinite(float(value)):
                return f"{value!r} is not a finite number"
        except ValueError:
            return f"{value!r} is not a number"
    return None
