"""Request and response bodies of the HTTP API (they are its OpenAPI schema at /docs).

Bounds here are hard caps that keep a request's size sane whatever the configuration; the
configurable limits (the config's ``serve.limits``) are checked by the service and answered
with the same 422 shape, naming the field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from metarec.sections import HARD_MAX_ITEMS

__all__ = [
    "HARD_MAX_ITEMS",
    "FeedbackRequest",
    "ItemId",
    "PredictRequest",
    "Rating",
    "RecommendRequest",
    "UserFeatures",
]


ItemId = Annotated[
    str | int,
    Field(description="Item id as in the training data (e.g. a MovieLens movie id)."),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored


class UserFeatures(_Body):
    """Optional side features of the user; absent fields are 'unknown'."""

    age: float | None = Field(None, ge=0, le=130, allow_inf_nan=False)
    gender: str | None = Field(None, max_length=32)
    occupation: str | None = Field(None, max_length=64)
    zip: str | None = Field(None, max_length=16)


class Rating(_Body):
    item: ItemId
    rating: float = Field(allow_inf_nan=False, description="On the training data's scale.")


class _Adapt(_Body):
    user: UserFeatures | None = None
    ratings: list[Rating] = Field(
        default_factory=list,
        max_length=HARD_MAX_ITEMS,
        description="The user's known ratings (the support set). Empty = cold start.",
    )


class RecommendRequest(_Adapt):
    k: int = Field(10, ge=1, le=HARD_MAX_ITEMS)
    exclude_seen: bool = Field(True, description="Leave out items the user has rated.")
    candidates: list[ItemId] | None = Field(
        None, max_length=HARD_MAX_ITEMS, description="Rank only these items."
    )


class PredictRequest(_Adapt):
    items: list[ItemId] = Field(min_length=1, max_length=HARD_MAX_ITEMS)


class FeedbackRequest(_Body):
    user: UserFeatures | None = None
    ratings: list[Rating] = Field(min_length=1, max_length=HARD_MAX_ITEMS)
    k: int = Field(10, ge=1, le=HARD_MAX_ITEMS, description="Recommendations to return.")
