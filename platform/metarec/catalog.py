"""What a served model needs to know about its items and users, besides its weights.

A checkpoint's network speaks encoded indices; people speak item ids, titles and "25, F,
engineer". The catalog is that translation — raw ids, titles, feature vocabularies, the
rating range, and per-item training statistics (for onboarding) — saved *inside* every
checkpoint, so a registered model is self-contained: serving needs the model URI only, not
the prepared dataset it was trained on.

Plain lists and numbers only: checkpoints are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metarec.batch import Tasks
from metarec.data.features import age_buckets, zip_prefixes
from metarec.data.prepared import PreparedDataset
from metarec.errors import DataError

__all__ = ["ONBOARDING_RULES", "Catalog", "FieldError", "catalog_dict", "require_catalog"]


class FieldError(ValueError):
    """A request value that cannot be encoded; ``loc`` names the field (HTTP 422)."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc, self.msg = loc, msg


def catalog_dict(ds: PreparedDataset, train: Tasks) -> dict[str, Any]:
    """The checkpoint's ``catalog`` entry for a model trained on ``train`` tasks of ``ds``."""
    items = ds.items()
    m = ds.manifest
    n = items.num_rows
    _, it, r = train.flat()
    r = r.double()
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, it, torch.ones_like(r))
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, it, r)
    squares = torch.zeros(n, dtype=torch.float64).index_add_(0, it, r * r)
    mean = total / count.clamp_min(1)
    var = (squares / count.clamp_min(1) - mean**2).clamp_min(0)
    return {
        "raw_id": items.column("raw_id").to_pylist(),
        "title": items.column("title").to_pylist(),
        "vocab": m["vocab"],
        "has_user_features": bool(m["features"]["has_user_features"]),
        "rating_range": [float(m["ratings"]["min"]), float(m["ratings"]["max"])],
        "feedback": ds.feedback,
        "event_weights": m.get("event_weights", {}),
        "item_count": count.tolist(),
        "item_mean": mean.tolist(),
        "item_std": var.sqrt().tolist(),
        "dataset": {
            "source": m["source"]["name"],
            "dataset_hash": m["dataset_hash"],
            "counts": m["counts"],
            "protocol": m["protocol"],
        },
    }


def require_catalog(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's catalog, or a ``DataError`` saying why a model cannot be served."""
    c = ckpt.get("catalog")
    if not c:
        raise DataError(
            "checkpoint has no catalog (written by a metarec before serving existed); "
            "retrain the model to serve it"
        )
    return c


# How ``Catalog.onboarding`` picks, by the model's feedback kind (``/v1/onboarding`` says it).
ONBOARDING_RULES = {
    "explicit": "log(1 + training ratings) x rating std (Rashid et al., IUI 2002)",
    "implicit": "popular and diverse: each next item maximises log(1 + training "
    "interactions) minus how often its categories, brands or genres were already shown",
}


@dataclass(frozen=True)
class Catalog:
    """Raw ids <-> encoded indices, titles, and item statistics of one trained model."""

    raw_ids: list[str]
    titles: list[str]
    genres: list[list[str]]
    years: list[int | None]
    vocab: dict[str, list[str]]
    has_user_features: bool
    rating_range: tuple[float, float]
    item_count: Tensor  # (I,) training ratings per item
    item_mean: Tensor
    item_std: Tensor
    dataset: dict[str, Any]
    feedback: str = "explicit"  # implicit: requests send events, ``rating_range`` is strengths
    event_weights: dict[str, float] = field(default_factory=dict)  # event name -> weight

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], item_genres: Tensor, item_year: Tensor):
        """Build from a checkpoint's ``catalog`` plus the model's own feature buffers
        (genre names and years are decoded from them, so they are never stored twice)."""
        c = require_catalog(ckpt)
        vocab = c["vocab"]
        genre_names = vocab["genre"]
        genres = [[genre_names[g] for g in row.nonzero().flatten().tolist()] for row in item_genres]
        year_names = vocab["year_bucket"]
        years = [int(year_names[b]) if b > 0 else None for b in item_year.tolist()]
        return cls(
            raw_ids=[str(x) for x in c["raw_id"]],
            titles=list(c["title"]),
            genres=genres,
            years=years,
            vocab=vocab,
            has_user_features=c["has_user_features"],
            rating_range=(c["rating_range"][0], c["rating_range"][1]),
            item_count=torch.tensor(c["item_count"]),
            item_mean=torch.tensor(c["item_mean"]),
            item_std=torch.tensor(c["item_std"]),
            dataset=c["dataset"],
            feedback=c.get("feedback", "explicit"),
            event_weights=dict(c.get("event_weights", {})),
        )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {r: i for i, r in enumerate(self.raw_ids)})
        object.__setattr__(self, "_folded", [str(t).casefold() for t in self.titles])

    @property
    def index(self) -> dict[str, int]:
        """Raw item id -> encoded index."""
        return self._index  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.raw_ids)

    def item_index(
        self, raw_ids: list[str], field: tuple[str | int, ...], suffix: tuple[str, ...] = ()
    ) -> list[int]:
        """Encoded indices of raw item ids; the first unknown one raises ``FieldError``
        located at ``(*field, position, *suffix)``."""
        index = self.index
        out = []
        for k, raw in enumerate(raw_ids):
            i = index.get(str(raw))
            if i is None:
                raise FieldError(
                    (*field, k, *suffix), f"unknown item id {raw!r} (not in the catalog)"
                )
            out.append(i)
        return out

    def search(self, q: str) -> list[int]:
        """Indices of items whose title contains every word of ``q``, ignoring case."""
        words = q.casefold().split()
        return [i for i, t in enumerate(self._folded) if all(w in t for w in words)]

    def item(self, i: int) -> dict[str, Any]:
        return {
            "item": self.raw_ids[i],
            "title": self.titles[i],
            "genres": self.genres[i],
            "year": self.years[i],
        }

    def encode_user(
        self, features: dict[str, Any] | None, loc: tuple[str | int, ...] = ("user",)
    ) -> list[int]:
        """A new user's side features -> the 4 codes the model embeds (0 = unknown/absent).

        Categorical values outside the training vocabulary are errors, not silent unknowns:
        a typo ("enginer") would otherwise quietly cost the user their features.
        """
        f = {k: v for k, v in (features or {}).items() if v is not None}
        age = float(f["age"]) if "age" in f else math.nan
        codes = [int(age_buckets(np.array([age]))[0])]
        for name, norm in (("gender", str.upper), ("occupation", str.lower)):
            value = str(f.get(name, "")).strip()
            names = self.vocab.get(name, [])
            if not value:
                codes.append(0)
            elif norm(value) in names[1:]:
                codes.append(names.index(norm(value)))
            else:
                raise FieldError(
                    (*loc, name), f"unknown value {value!r}; expected one of {names[1:]}"
                )
        codes.append(int(zip_prefixes([str(f.get("zip", ""))])[0]))
        return codes

    def onboarding(self, n: int, *, min_count: int = 5) -> list[int]:
        """Items to ask a brand-new user about (``ONBOARDING_RULES``).

        Ratings: log-popularity x rating spread.
        A rating is informative when the user is likely to know the item (popular) and when
        users disagree about it (high standard deviation): a universally loved film says
        little about anyone's taste. This is Rashid et al.'s "log(popularity) x entropy"
        rule with the standard deviation as the spread (IUI 2002, "Getting to know you:
        learning new user preferences in recommender systems"). Items with fewer than
        ``min_count`` training ratings have no trustworthy spread and are skipped.

        Implicit feedback has no spread (every interaction is a positive), and a page of the
        ten best sellers would all be one category: items are picked greedily, each the
        most popular after a penalty of one per earlier pick sharing each of its tags
        (genres, or a shop's category, brand and price band), so the first screen spans
        the catalogue. Items nobody interacted with in training are never shown.
        """
        if self.feedback == "implicit":
            return self._popular_and_diverse(n)
        score = torch.log1p(self.item_count) * self.item_std
        score = score.masked_fill(self.item_count < min_count, -math.inf)
        top = torch.topk(score, min(n, len(self)))
        return top.indices[torch.isfinite(top.values)].tolist()

    def _popular_and_diverse(self, n: int) -> list[int]:
        names = sorted({g for row in self.genres for g in row})
        column = {g: k for k, g in enumerate(names)}
        tags = torch.zeros(len(self), max(1, len(names)))
        rows = [(i, column[g]) for i, row in enumerate(self.genres) for g in row]
        if rows:
            tags[tuple(torch.tensor(rows).T)] = 1.0
        score = torch.log1p(self.item_count).float()
        score = score.masked_fill(self.item_count <= 0, -math.inf)
        shown = torch.zeros(tags.shape[1])
        picked: list[int] = []
        for _ in range(min(n, len(self))):
            i = int(torch.argmax(score - tags @ shown))
            if not math.isfinite(float(score[i])):
                break
            picked.append(i)
            score[i] = -math.inf
            shown += tags[i]
        return picked
