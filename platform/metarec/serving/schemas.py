"""Request and response bodies of the HTTP API (they are its OpenAPI schema at /docs).

Bounds here are hard caps that keep a request's size sane whatever the configuration; the
configurable limits (``Limits``) are checked by the service and answered with the same
422 shape, naming the field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "HARD_MAX_ITEMS",
    "Deployment",
    "FeedbackRequest",
    "ItemId",
    "Limits",
    "PredictRequest",
    "Rating",
    "RecommendRequest",
    "ServeSettings",
    "UserFeatures",
]

HARD_MAX_ITEMS = 100_000  # no list in a request is longer, whatever the configuration

ItemId = Annotated[
    str | int,
    Field(description="Item id as in the training data (e.g. a MovieLens movie id)."),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored


class Limits(BaseModel):
    """Configurable request limits (``serve/config.yaml`` or ``metarec serve`` flags)."""

    max_ratings: int = Field(200, ge=1, le=HARD_MAX_ITEMS)
    max_k: int = Field(100, ge=1, le=HARD_MAX_ITEMS)
    max_items: int = Field(1000, ge=1, le=HARD_MAX_ITEMS)  # /v1/predict items, candidates


class ServeSettings(BaseModel):
    """What a replica loads and how it behaves (``args`` in ``serve/config.yaml``; the
    defaults here are the only copy, ``metarec serve --help`` shows them)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="models:/NAME@ALIAS, runs:/..., or a checkpoint path"
    )
    tracking_uri: str | None = None
    work_dir: str = "work"
    feedback_dir: str | None = None  # default <work_dir>/feedback
    steps: int | None = Field(None, ge=0, le=100)  # inner steps (default: the model's)
    device: str = "auto"
    threads: int | None = Field(None, ge=1)  # torch threads per replica
    max_sessions: int = Field(1000, ge=1)  # each caches fast weights: ~150 KB (ml100k net)
    limits: Limits = Field(default_factory=Limits)


class Deployment(BaseModel):
    """How ``metarec serve`` deploys the app (``serve/config.yaml`` sets the same in Serve's
    own keys): address, replicas, and micro-batching (the deployment's ``user_config``)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    max_batch_size: int = Field(32, ge=1)  # 1 = no micro-batching
    batch_wait_ms: float = Field(2.0, ge=0)
    access_log: bool = False


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
