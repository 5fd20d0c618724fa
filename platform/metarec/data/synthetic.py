"""Synthetic ratings with planted per-user preferences: the embedded default dataset.

Why these ingredients: a global model can learn item effects (bias, genre-driven latent
factors) and feature effects (age x release year), but each user's personal latent taste,
rating bias and drift over time are only recoverable from that user's own ratings. So
adapting to a support set measurably beats a global model, and the ``temporal`` scenario
has real drift to chase. Everything is vectorized and chunked, so 10M+ ratings generate in
seconds with bounded memory.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from metarec.config import SyntheticConfig
from metarec.data.sources import RawData

__all__ = ["GENRES", "generate"]

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
    user, item = _sample_pairs(rng, n_u, n_i, cfg, popularity)
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
    rating = np.clip(np.rint(score), 1, 5).astype(np.float64)
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
    users = pd.DataFrame(
        {
            "user": np.arange(1, n_u + 1),
            "age": age.astype(float),
            "gender": rng.choice(["F", "M"], size=n_u),
            "occupation": rng.choice(OCCUPATIONS, size=n_u),
            "zip": [f"{z:05d}" for z in rng.integers(0, 100_000, size=n_u)],
        }
    )
    return RawData(ratings, items, users, [], "synthetic")


def _sample_pairs(
    rng: np.random.Generator, n_u: int, n_i: int, cfg: SyntheticConfig, popularity: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Draw each user's rated items without replacement, vectorized over users.

    Oversample with replacement, drop repeats, keep the first ``n_u`` per user (random order).
    """
    want = rng.integers(cfg.min_ratings_per_user, cfg.max_ratings_per_user + 1, size=n_u)
    p = np.exp(0.8 * popularity)
    p /= p.sum()
    draws = (want * 1.5).astype(np.int64) + 5
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
