"""What evaluation scores: anything with ``predict_items``; for networks, one adapted per
task on its support set with test-time knobs chosen on validation users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from metarec.batch import TaskBatch
from metarec.config import MetaConfig
from metarec.loop import predict_items
from metarec.meta import MetaLearner

__all__ = ["AdaptedScorer", "Scorer", "adaptation_grid", "relevance_threshold"]


class Scorer(Protocol):
    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor: ...


def relevance_threshold(manifest: dict[str, Any]) -> float:
    """The rating from which a query item counts as relevant: 0.8 x the scale's top.

    4 on 1-5 and on 0.5-5 (MeLU's and most papers' "4 stars or more"), 8 on 1-10: the top
    fifth of the scale, whatever its bottom. ``--relevance-threshold`` overrides it.
    """
    return 0.8 * float(manifest["ratings"]["max"])


@dataclass(frozen=True)
class AdaptedScorer:
    """A network adapted per task on its support set (``loop.predict_items``).

    Each knob left ``None`` is the learner's own (meta-learned lrs for Meta-SGD); the
    fine-tune baseline sets ``inner_lr``, adaptation tuning sets ``steps``, ``lr_scale``
    (a multiplier of whatever the step sizes are) and ``support_prior``, or for the ridge
    solver ``prior_scale`` (a multiplier of the learned prior precision).
    """

    learner: MetaLearner
    steps: int | None = None
    inner_lr: float | None = None
    lr_scale: float = 1.0
    support_prior: float | None = None
    prior_scale: float = 1.0

    def predict_items(self, tasks: TaskBatch, items: Tensor) -> Tensor:
        return predict_items(
            self.learner,
            tasks,
            items,
            steps=self.steps,
            inner_lr=self._lrs(),
            support_prior=self.support_prior,
            prior_scale=self.prior_scale,
        )

    def _lrs(self) -> float | dict[str, Tensor] | None:
        if self.lr_scale == 1.0:
            return self.inner_lr
        lrs = self.learner.lrs() if self.inner_lr is None else self.inner_lr
        if isinstance(lrs, dict):
            return {n: v.detach() * self.lr_scale for n, v in lrs.items()}
        return lrs * self.lr_scale

    def knobs(self) -> dict[str, Any]:
        """The adaptation actually run (what results.json and MLflow record)."""
        cfg = self.learner.cfg
        if cfg.inner_solver == "ridge" and self.steps != 0:
            return {"solver": "ridge", "prior_scale": self.prior_scale}
        return {
            "steps": cfg.inner_steps if self.steps is None else self.steps,
            "inner_lr": "learned"
            if cfg.algorithm == "metasgd" and self.inner_lr is None
            else (cfg.inner_lr if self.inner_lr is None else self.inner_lr) * self.lr_scale,
            "lr_scale": self.lr_scale,
            "support_prior": cfg.support_prior
            if self.support_prior is None
            else self.support_prior,
        }


def adaptation_grid(cfg: MetaConfig, feedback: str = "explicit") -> list[dict[str, Any]]:
    """Test-time knobs tried on validation users, the trained ones first (kept on ties).

    A small grid around what was trained: half/double the steps and step size, and the
    support prior kappa at half/double (or 0, 5, 20 when trained without one). Choosing
    them on validation users is the courtesy every baseline gets; it needs no retraining.
    The ridge solver has no steps: its learned prior precision is scaled by 1/4 .. 4, and
    on implicit data up to 64: there a few positives sit among ``meta.negatives`` sampled
    ones, and a new customer's least-squares fit can want a much stiffer prior than the
    training users' mix of history lengths taught (defaults-log §9).
    """
    if cfg.inner_solver == "ridge":
        stiffer = (16.0, 64.0) if feedback == "implicit" else ()
        return [{"prior_scale": c} for c in (1.0, 0.5, 2.0, 0.25, 4.0, *stiffer)]
    s, k = cfg.inner_steps, cfg.support_prior
    steps = [s] if s == 0 else list(dict.fromkeys([s, max(1, s // 2), 2 * s]))
    priors = list(dict.fromkeys([k, k / 2, 2 * k] if k > 0 else [0.0, 5.0, 20.0]))
    scales = [1.0, 0.5, 2.0]
    return [
        {"steps": st, "lr_scale": sc, "support_prior": kp}
        for st in steps
        for sc in scales
        for kp in priors
    ]
