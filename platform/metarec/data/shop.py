"""A synthetic shop: sessions of views, carts and purchases over a long-tailed catalogue.

``--source synthetic`` with ``data.synthetic.feedback: implicit`` (``configs/shop.yaml``).
What it plants, and why:

- **Popularity** is Zipf over the catalogue (``popularity_zipf``, 1.0 when unset): a
  popularity ranking is a strong baseline, as in every real shop.
- **Items** have a category, a brand (mostly within one category) and a price band, their
  features (item tags ``category:``, ``brand:``, ``price:``), and a latent vector made of
  their category's and brand's; **new items arrive** over the timeline (their year is the
  arrival year, so ``item_cold`` has new items to hold out), and nobody sees an item before
  it arrives.
- **Each user's taste** (a latent vector and a preferred price band) picks, among the items
  popularity puts in front of them, the ones they view, and drives the funnel: a view
  becomes a cart, and a cart a purchase, with a probability rising with affinity. Taste
  **drifts** along the user's timeline (``drift``). So a user's own history predicts their
  future better than popularity does (the tests check it), and that is what per-user
  adaptation has to recover.

Users have no feature table, as in most shops. The events go through the same aggregation
as ``--source events`` (weights ``data.event_weights``), so the generator exercises it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from metarec.config import SyntheticConfig
from metarec.data.events import interactions
from metarec.data.sources import RawData
from metarec.data.synthetic import activity
from metarec.errors import ConfigError

__all__ = ["EVENTS", "generate_shop"]

EVENTS = ("view", "cart", "purchase")
N_CATEGORIES, BRANDS_PER_CATEGORY, PRICE_BANDS = 20, 10, 5
CANDIDATES = 4  # items shown to a user per item they view
FRONT_PAGE = 0.3  # share of showings that come from the front page (popular overall)
_T0, _T1 = 1_546_300_800, 1_704_067_200  # 2019-01-01 .. 2024-01-01, unix seconds
_DAY = 86_400


def generate_shop(
    cfg: SyntheticConfig, weights: Mapping[str, float], *, seed: int
) -> tuple[RawData, pd.DataFrame]:
    """The aggregated interactions (``RawData``, implicit) and the raw event log."""
    missing = [e for e in EVENTS if e not in weights]
    if missing:
        raise ConfigError(
            f"data.event_weights: got {dict(weights)}; expected weights for {list(EVENTS)} "
            "(the synthetic shop logs those events)"
        )
    rng = np.random.default_rng([seed, 200])
    n_u, n_i, d = cfg.n_users, cfg.n_items, cfg.latent_dim
    items, v, price, arrival, category, cat_v = _catalogue(rng, n_i, d)
    zipf = cfg.popularity_zipf or 1.0
    p = (rng.permutation(n_i) + 1).astype(np.float64) ** -zipf
    u0 = rng.normal(size=(n_u, d))
    # drift turns taste (same length), so a user's preferences change but do not sharpen
    u1 = (u0 + cfg.drift * rng.normal(size=(n_u, d))) / np.sqrt(1 + cfg.drift**2)
    likes_price = rng.integers(0, PRICE_BANDS, size=n_u)
    # What each user is shown: CANDIDATES x as many items as they will view, at random
    # times on their timeline; some from the front page (popular overall), most from
    # categories their taste of the moment browses (popular within the category).
    want = activity(rng, cfg, n_u)
    user = np.repeat(np.arange(n_u), CANDIDATES * want)
    tau = rng.random(len(user))  # when on the user's timeline it was shown
    taste = (1 - tau)[:, None] * u0[user] + tau[:, None] * u1[user]
    item = _shown(rng, taste, p, cat_v, category)
    start = rng.uniform(_T0, _T1 - 400 * _DAY, size=n_u)
    span = rng.uniform(60, 400, size=n_u) * _DAY
    ts = start[user] + tau * span[user]
    fresh = _first_showing(user, item, n_i) & (arrival[item] <= ts)  # none before arrival
    user, item, tau, ts, taste = user[fresh], item[fresh], tau[fresh], ts[fresh], taste[fresh]
    # Taste picks the views among what was shown.
    affinity = (
        np.einsum("nd,nd->n", taste, v[item])
        - 0.4 * np.abs(price[item] - likes_price[user])
        + cfg.noise * rng.normal(size=len(user))
    )
    gumbel = -np.log(-np.log(rng.random(len(user))))
    order = np.lexsort((-(2.0 * affinity + gumbel), user))
    user, item, affinity, ts = user[order], item[order], affinity[order], ts[order]
    first = np.searchsorted(user, np.arange(n_u))
    keep = np.arange(len(user)) - first[user] < want[user]
    user, item, affinity, ts = user[keep], item[keep], affinity[keep], ts[keep]
    events = _funnel(rng, user, item, affinity, ts)
    events["line"] = np.arange(len(events), dtype=np.int64)
    events["rating"] = events["event"].map(dict(weights)).to_numpy(dtype=np.float64)
    raw = RawData(interactions(events), items, None, [], "synthetic", feedback="implicit")
    return raw, events


def _catalogue(
    rng: np.random.Generator, n_i: int, d: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Items (table, latent vectors, price bands, arrival times, categories) and the
    categories' latent vectors."""
    category = rng.choice(N_CATEGORIES, size=n_i, p=_zipf(N_CATEGORIES, 0.8))
    brand = category * BRANDS_PER_CATEGORY + rng.integers(0, BRANDS_PER_CATEGORY, size=n_i)
    stray = rng.random(n_i) < 0.05  # a few brands sell outside their category
    brand[stray] = rng.integers(0, N_CATEGORIES * BRANDS_PER_CATEGORY, size=int(stray.sum()))
    price = np.clip(np.rint(rng.normal(2 + 0.1 * (category % 5), 1.1, size=n_i)), 0, 4)
    cat_v = rng.normal(size=(N_CATEGORIES, d))
    brand_v = rng.normal(size=(N_CATEGORIES * BRANDS_PER_CATEGORY, d))
    v = (cat_v[category] + 0.6 * brand_v[brand] + 0.3 * rng.normal(size=(n_i, d))) / np.sqrt(d)
    # 70% of the catalogue is there from the start; the rest arrives over the timeline.
    arrival = np.where(rng.random(n_i) < 0.7, _T0 - _DAY, rng.uniform(_T0, _T1, size=n_i))
    year = pd.to_datetime(arrival, unit="s").year.to_numpy().astype(float)
    items = pd.DataFrame(
        {
            "item": np.arange(1, n_i + 1),
            "title": [f"Product {i + 1}" for i in range(n_i)],
            "genres": [
                [f"category:{c}", f"brand:{b}", f"price:{int(p)}"]
                for c, b, p in zip(category, brand, price, strict=True)
            ],
            "year": year,
        }
    )
    return items, v, price, arrival, category, cat_v / np.sqrt(d)


def _shown(
    rng: np.random.Generator,
    taste: np.ndarray,
    p: np.ndarray,
    cat_v: np.ndarray,
    category: np.ndarray,
) -> np.ndarray:
    """One item per row of ``taste``: from the front page (probability ``FRONT_PAGE``,
    item ~ ``p``), else from a category drawn by softmax(taste . category vector), item ~
    ``p`` within it. Vectorized: per-category CDFs laid end to end, one searchsorted."""
    n = len(taste)
    logits = 3.0 * taste @ cat_v.T
    gumbel = -np.log(-np.log(rng.random(logits.shape)))
    chosen = np.argmax(logits + gumbel, axis=1)
    by_cat = np.argsort(category, kind="stable")
    cdf = np.zeros(len(p))
    sorted_cat, sorted_p = category[by_cat], p[by_cat]
    for c in np.unique(sorted_cat):  # one pass per category, not per user
        span = sorted_cat == c
        cdf[span] = c + np.cumsum(sorted_p[span]) / sorted_p[span].sum()
    browse = by_cat[np.minimum(np.searchsorted(cdf, chosen + rng.random(n)), len(p) - 1)]
    front = rng.choice(len(p), size=n, p=p / p.sum())
    return np.where(rng.random(n) < FRONT_PAGE, front, browse)


def _first_showing(user: np.ndarray, item: np.ndarray, n_i: int) -> np.ndarray:
    """True where a (user, item) pair is shown for the first time."""
    key = user.astype(np.int64) * n_i + item
    _, first = np.unique(key, return_index=True)
    mask = np.zeros(len(key), dtype=bool)
    mask[first] = True
    return mask


def _funnel(
    rng: np.random.Generator,
    user: np.ndarray,
    item: np.ndarray,
    affinity: np.ndarray,
    ts: np.ndarray,
) -> pd.DataFrame:
    """Every view; a cart with probability rising with affinity; a purchase after a cart."""
    cart = rng.random(len(user)) < 1 / (1 + np.exp(-(1.5 * affinity - 3.5)))
    buy = cart & (rng.random(len(user)) < 1 / (1 + np.exp(-(1.5 * affinity - 2.5))))
    parts = [
        (EVENTS[0], np.ones(len(user), dtype=bool), 0),
        (EVENTS[1], cart, 120),
        (EVENTS[2], buy, 600),
    ]
    frame = pd.concat(
        [
            pd.DataFrame(
                {
                    "user": user[mask] + 1,
                    "item": item[mask] + 1,
                    "event": name,
                    "timestamp": ts[mask].astype(np.int64) + delay,
                }
            )
            for name, mask, delay in parts
        ],
        ignore_index=True,
    )
    return frame.sort_values(["timestamp", "user"], kind="stable").reset_index(drop=True)


def _zipf(n: int, a: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -a
    return p / p.sum()
