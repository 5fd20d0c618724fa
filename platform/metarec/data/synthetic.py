"""Synthetic ratings with planted per-user preferences: the embedded default dataset.

Why these ingredients: a global model can learn item effects (bias, genre-driven latent
factors) and feature effects (age x release year), but each user's personal latent taste,
rating bias and drift over time are only recoverable from that user's own ratings. So
adapting to a support set measurably beats a global model, and the ``temporal`` scenario
has real drift to chase. Everything is vectorized and chunked, so 10M+ ratings generate in
seconds with bounded memory.

Variants (``VARIANTS``, named ``data.synthetic.*`` overrides) stress one thing each; none of
them removes the per-user bias and taste, so adaptation keeps something to recover:

- ``no_user_features`` (``user_features: false``): no user table, like ``ml-latest``. Users
  still have a hidden age that drives the age x year effect, so that effect moves from
  "learnable from features" to "only recoverable from the user's ratings".
- ``half_star`` / ``ten_point`` (``scale``): the same latent score, rounded to 0.5 steps on
  0.5-5, or mapped linearly onto 1-10 (1 -> 1, 5 -> 10) so the spread relative to the scale
  is today's. Rounding is the only change; user bias and taste survive it.
- ``long_tail`` (``n_items: 10000``, ``popularity_zipf: 1.0``): items drawn with probability
  proportional to rank^-a, ranked by the same random latent popularity that feeds item
  bias. Most items get a handful of ratings, so item effects are hard to learn and a user's
  support carries more of the signal.
- ``drift`` (``drift: 3.0``): taste moves far along each timeline, yet a user's early and
  late per-genre taste still correlate (~0.56 vs ~0.72 without drift), and the user bias
  does not drift at all; ``temporal`` gets real drift to chase.
- ``few_ratings`` (13-30 ratings per user): MeLU's regime; every user still passes the
  default ``data.min_ratings: 13`` filter with ``data.query_size: 10``, leaving 3-20 support
  ratings to adapt from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from metarec.config import MetarecConfig, SyntheticConfig, apply_overrides
from metarec.data.sources import RawData
from metarec.errors import ConfigError

__all__ = [
    "GENRES",
    "SCALES",
    "VARIANTS",
    "activity",
    "apply_variant",
    "generate",
    "item_choice",
    "sample_pairs",
]

GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
OCCUPATIONS = (
    "artist",
    "educator",
    "engineer",
    "healthcare",
    "homemaker",
    "lawyer",
    "programmer",
    "retired",
    "sales",
    "scientist",
    "student",
    "writer",
    "other",
)
# Named presets for benchmarks and users: dotted config keys -> values (``--set`` syntax).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no_user_features": {"data.synthetic.user_features": False},
    "half_star": {"data.synthetic.scale": "0.5-5"},
    "ten_point": {"data.synthetic.scale": "1-10"},
    "long_tail": {"data.synthetic.n_items": 10_000, "data.synthetic.popularity_zipf": 1.0},
    "drift": {"data.synthetic.drift": 3.0},
    "few_ratings": {
        "data.synthetic.min_ratings_per_user": 13,
        "data.synthetic.max_ratings_per_user": 30,
    },
}
# Rating scale -> (lowest, highest, step). The latent score lives on 1-5 and is stretched
# linearly so 1 stays 1 and 5 becomes the top: identity for half stars (0.5 is what rounds
# from below 0.75, as a "worse than 1 star" verdict), x 9/4 around 1 for 1-10.
SCALES: dict[str, tuple[float, float, float]] = {
    "1-5": (1.0, 5.0, 1.0),
    "0.5-5": (0.5, 5.0, 0.5),
    "1-10": (1.0, 10.0, 1.0),
}
_CHUNK = 1 << 20  # rows per vectorized chunk: bounds peak memory at 10M+ ratings
_T0, _T1 = 946_684_800, 1_609_459_200  # 2000-01-01 .. 2021-01-01, unix seconds


def generate(cfg: SyntheticConfig, *, seed: int) -> RawData:
    """Generate users, items and ratings; ids are 1-based integers like MovieLens'."""
    rng = np.random.default_rng([seed, 100])
    d, n_u, n_i = cfg.latent_dim, cfg.n_users, cfg.n_items
    g = len(GENRES)
    # Items: 1-3 genres each; latent factors mostly explained by genres (so features matter).
    n_genres = rng.integers(1, 4, size=n_i)
    genre_rank = np.argsort(rng.random((n_i, g)), axis=1).argsort(axis=1)
    multi_hot = (genre_rank < n_genres[:, None]).astype(np.float32)  # (I, G)
    genre_factors = rng.normal(size=(g, d)).astype(np.float32)
    v = multi_hot @ genre_factors / np.sqrt(n_genres)[:, None] + 0.5 * rng.normal(size=(n_i, d))
    v = (v / np.sqrt(d)).astype(np.float32)  # (I, D)
    year = np.clip(2024 - np.floor(rng.exponential(14.0, size=n_i)), 1925, 2024)
    popularity = rng.normal(size=n_i)
    item_bias = (0.25 * popularity + 0.3 * rng.normal(size=n_i)).astype(np.float32)
    # Users: personal taste (u0 -> u1 drift), bias, and demographic features with an effect.
    age = rng.choice(
        [16, 21, 30, 40, 47, 53, 60], size=n_u, p=[0.05, 0.2, 0.3, 0.2, 0.1, 0.08, 0.07]
    )
    u0 = rng.normal(size=(n_u, d)).astype(np.float32)  # (U, D)
    u1 = (u0 + cfg.drift * rng.normal(size=(n_u, d))).astype(np.float32)
    user_bias = (0.45 * rng.normal(size=n_u)).astype(np.float32)
    age_z = ((age - 35.0) / 12.0).astype(np.float32)
    # Which items each user rates: popularity-skewed, no repeats.
    want = activity(rng, cfg, n_u)
    # heavy users repeat the Zipf head often: draw more to still reach their counts
    oversample = 3.0 if cfg.activity_pareto > 0 else 1.5
    user, item = sample_pairs(rng, want, item_choice(cfg, popularity), oversample=oversample)
    start = rng.uniform(_T0, _T1 - 3e7, size=n_u)
    span = rng.exponential(3e7, size=n_u) + 86_400
    tau = rng.random(len(user)).astype(np.float32)  # position in the user's timeline
    ts = (start[user] + tau * span[user]).astype(np.int64)
    score = np.empty(len(user), dtype=np.float32)
    year_z = ((year - 1995.0) / 15.0).astype(np.float32)
    for lo in range(0, len(user), _CHUNK):
        s = slice(lo, lo + _CHUNK)
        uu, ii, t = user[s], item[s], tau[s, None]
        taste = (1 - t) * u0[uu] + t * u1[uu]  # (N, D): taste drifts along the timeline
        score[s] = (
            3.55
            + user_bias[uu]
            + item_bias[ii]
            + 1.1 * np.einsum("nd,nd->n", taste, v[ii])
            - 0.25 * age_z[uu] * year_z[ii]  # older users prefer older films
            + cfg.noise * rng.normal(size=len(uu)).astype(np.float32)
        )
    rating = _to_scale(score, cfg.scale)
    ratings = pd.DataFrame(
        {
            "user": user + 1,
            "item": item + 1,
            "rating": rating,
            "timestamp": ts,
            "line": np.arange(1, len(user) + 1),
        }
    )
    genre_names = np.array(GENRES, dtype=object)
    items = pd.DataFrame(
        {
            "item": np.arange(1, n_i + 1),
            "title": [f"Synthetic item {i + 1} ({int(y)})" for i, y in enumerate(year)],
            "genres": [list(genre_names[row > 0]) for row in multi_hot],
            "year": year.astype(float),
        }
    )
    users = _user_table(rng, age) if cfg.user_features else None
    return RawData(ratings, items, users, [], "synthetic")


def apply_variant(cfg: MetarecConfig, name: str) -> MetarecConfig:
    """``cfg`` with the named ``VARIANTS`` preset applied, so a benchmark or test asks for
    "long_tail" rather than repeating its keys (explicit overrides can follow)."""
    if name not in VARIANTS:
        raise ConfigError(f"synthetic variant: got {name!r}; expected one of {sorted(VARIANTS)}")
    return apply_overrides(cfg, **VARIANTS[name])


def _user_table(rng: np.random.Generator, age: np.ndarray) -> pd.DataFrame:
    """The observable demographics; the other columns carry no planted effect (noise
    features a model must learn to ignore)."""
    n_u = len(age)
    return pd.DataFrame(
        {
            "user": np.arange(1, n_u + 1),
            "age": age.astype(float),
            "gender": rng.choice(["F", "M"], size=n_u),
            "occupation": rng.choice(OCCUPATIONS, size=n_u),
            "zip": [f"{z:05d}" for z in rng.integers(0, 100_000, size=n_u)],
        }
    )


def _to_scale(score: np.ndarray, scale: str) -> np.ndarray:
    """Round latent 1-5 scores onto the rating grid of ``scale`` (see ``SCALES``)."""
    lo, hi, step = SCALES[scale]
    if hi != 5.0:  # skipped on 1-5 and 0.5-5, so their arithmetic stays bit-identical
        score = 1 + (score - 1) * np.float32((hi - 1) / 4)
    return np.clip(np.rint(score / step) * step, lo, hi).astype(np.float64)


def activity(rng: np.random.Generator, cfg: SyntheticConfig, n_users: int) -> np.ndarray:
    """How many items each user rates (or views): uniform in [min, max] by default; with
    ``activity_pareto`` a > 0, ``min x Pareto(a)`` capped at max, the long tail of real
    logs where a few users have thousands of interactions and most a few dozen."""
    lo, hi = cfg.min_ratings_per_user, cfg.max_ratings_per_user
    if cfg.activity_pareto > 0:
        heavy = np.floor(lo * (1.0 + rng.pareto(cfg.activity_pareto, size=n_users)))
        return np.minimum(heavy, hi).astype(np.int64)
    return rng.integers(lo, hi + 1, size=n_users)


def item_choice(cfg: SyntheticConfig, popularity: np.ndarray) -> np.ndarray:
    """Probability that a draw picks each item.

    Default: ``exp(0.8 * popularity)``, a log-normal spread with no real tail. With
    ``popularity_zipf`` a > 0: Zipf, p ~ rank^-a, ranking items by the same latent
    popularity (i.i.d., so a random permutation) that raises their bias: popular items are
    still liked more, and the tail is long.
    """
    if cfg.popularity_zipf > 0:
        rank = np.empty(len(popularity))
        rank[np.argsort(-popularity, kind="stable")] = np.arange(1, len(popularity) + 1)
        p = rank**-cfg.popularity_zipf
    else:
        p = np.exp(0.8 * popularity)
    return p / p.sum()


def sample_pairs(
    rng: np.random.Generator, want: np.ndarray, p: np.ndarray, *, oversample: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``want[u]`` distinct items for each user u (item i with probability ``p[i]``),
    vectorized over users; pairs come grouped by user, in random order within a user.

    Oversample with replacement, drop repeats, keep the first ``want`` per user (random
    order). A user whose draws repeat a lot (a small catalogue, a steep Zipf head) can end
    up with a few fewer ratings than asked.
    """
    n_u, n_i = len(want), len(p)
    draws = (want * oversample).astype(np.int64) + 5
    user = np.repeat(np.arange(n_u, dtype=np.int64), draws)
    item = rng.choice(n_i, size=len(user), p=p)
    key = np.sort(user * n_i + item)  # sort + mask: np.unique's hashing is ~100x slower here
    key = key[np.r_[True, key[1:] != key[:-1]]]  # drop repeats, still grouped by user
    user, item = key // n_i, key % n_i
    order = np.argsort(user + rng.random(len(user)), kind="stable")  # shuffle within each user
    user, item = user[order], item[order]
    start = np.searchsorted(user, np.arange(n_u))
    rank = np.arange(len(user)) - start[user]
    keep = rank < want[user]
    return user[keep].astype(np.int64), item[keep].astype(np.int64)
