"""Where a run stands between epochs: what a checkpoint stores and a resumed run restores."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Everything a run needs to go on exactly where it stopped; checkpointed every epoch."""

    epoch: int = 0  # the next epoch to run
    best_epoch: int = -1
    best_valid_mae: float = math.inf
    best_params: dict[str, Tensor] | None = None  # learner.state_dict() of the best epoch
    history: list[dict[str, float]] = field(default_factory=list)
    rng: Tensor | None = None  # batching generator's state after the last finished epoch
    stopped: bool = False  # early stopping has triggered

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**data)
