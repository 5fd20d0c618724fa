"""Build the two-domain ML-100k data of README "Cross-domain transfer" (not a benchmark).

ml-latest-small is not available offline, so the second domain is cut from ML-100k: users
split by id parity into A (odd) and B (even), B's item ids re-keyed (``m<id>``) so they
encode differently, written as generic ``--source ratings`` tables with text features::

    python benchmarks/crossdomain_split.py ../shared/datasets/ml-100k work/xdomain/raw
    metarec prepare --source ratings --input work/xdomain/raw/a/ratings.parquet \\
        --item-features work/xdomain/raw/a/items.parquet \\
        --user-features work/xdomain/raw/a/users.parquet --out work/xdomain/a
    (the same for b)

The tables are written under the given output directory only; nothing here is committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from metarec.data.sources import load_ml100k


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    raw = load_ml100k(src)
    for name, parity, prefix in (("a", 1, ""), ("b", 0, "m")):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        r = raw.ratings[raw.ratings.user % 2 == parity]
        ratings = {
            "user": r.user.astype(str),
            "item": prefix + r.item.astype(str),
            "rating": r.rating,
            "timestamp": r.timestamp,
        }
        pd.DataFrame(ratings).to_parquet(d / "ratings.parquet")
        it = raw.items
        items = {
            "item": prefix + it.item.astype(str),
            "title": it.title,
            "genres": it.genres.map("|".join),
            "year": it.year.map(lambda y: "" if pd.isna(y) else str(int(y))),
        }
        pd.DataFrame(items).to_parquet(d / "items.parquet")
        u = raw.users[raw.users.user % 2 == parity]
        users = {
            "user": u.user.astype(str),
            "age": u.age.astype(int).astype(str),
            "gender": u.gender,
            "occupation": u.occupation,
            "zip": u.zip,
        }
        pd.DataFrame(users).to_parquet(d / "users.parquet")
        print(name, len(r), "ratings", r.user.nunique(), "users")


if __name__ == "__main__":
    main()
