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
    "Event",
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


class Event(_Body):
    """One interaction, for a model trained on implicit feedback: an event its data
    weighed (``view``, ``cart``, ``purchase``: ``/v1/model`` lists them), a value (a play
    count), or both (the event's weight times the value)."""

    item: ItemId
    event: str | None = Field(None, max_length=64)
    value: float | None = Field(None, gt=0, allow_inf_nan=False)


class _Adapt(_Body):
    user: UserFeatures | None = None
    ratings: list[Rating] = Field(
        default_factory=list,
        max_length=HARD_MAX_ITEMS,
        description="The user's known ratings (the support set) for a model trained on "
        "ratings. Empty = cold start.",
    )
    events: list[Event] = Field(
        default_factory=list,
        max_length=HARD_MAX_ITEMS,
        description="The user's interactions (the support set) for a model trained on "
        "implicit feedback; a repeated item's strengths add up. Empty = cold start.",
    )


class RecommendRequest(_Adapt):
    k: int = Field(10, ge=1, le=HARD_MAX_ITEMS)
    exclude_seen: bool = Field(True, description="Leave out items the user has rated.")
    candidates: list[ItemId] | None = Field(
        None, max_length=HARD_MAX_ITEMS, description="Rank only these items."
    )
    explain: bool = Field(
        False,
        description="Give each item `because`: up to 3 of the given ratings (or events) "
        "that most raised its score, each with its contribution, the score minus the "
        "score after adapting without it.",
    )


class PredictRequest(_Adapt):
    items: list[ItemId] = Field(min_length=1, max_length=HARD_MAX_ITEMS)


class FeedbackRequest(_Body):
    """New ratings, or events for an implicit model: at least one of the two."""

    user: UserFeatures | None = None
    ratings: list[Rating] = Field(default_factory=list, max_length=HARD_MAX_ITEMS)
    events: list[Event] = Field(default_factory=list, max_length=HARD_MAX_ITEMS)
    k: int = Field(10, ge=1, le=HARD_MAX_ITEMS, description="Recommendations to return.")
