"""The MLflow pyfunc flavour of a metarec model (what ``mlflow.pyfunc.load_model`` gives).

It adapts with the serving engine itself, so a pyfunc prediction is a served prediction.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

from metarec.checkpoint import learner_from_checkpoint, load_checkpoint

__all__ = ["MetarecPyfunc"]


class MetarecPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc view of a metarec model: adapt on each row's support, score its items.

    Input: a DataFrame with list columns ``support_items``, ``support_ratings`` and
    ``items``, and an optional ``user`` column of feature dicts (``{"age": 23, "gender":
    "F"}``). Item ids are the *raw* ids of the training files, as the HTTP API takes them
    (``"50"`` or ``50``), never internal positions; an unknown id or feature value is a
    ``ValueError`` naming the row and field. Output: one list of predicted ratings per row,
    computed by the serving engine (the same adaptation ``metarec serve`` runs).
    """

    def load_context(self, context: Any) -> None:
        from metarec.catalog import Catalog
        from metarec.serving.engine import Engine

        ckpt = load_checkpoint(context.artifacts["checkpoint"])
        learner = learner_from_checkpoint(ckpt)
        m = learner.model
        self.catalog = Catalog.from_checkpoint(ckpt, m.item_genres, m.item_year)
        self.engine = Engine(learner)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> list:
        from metarec.catalog import FieldError
        from metarec.serving.engine import Job

        missing = {"support_items", "support_ratings", "items"} - set(model_input.columns)
        if missing:
            raise ValueError(f"model input: missing column(s) {sorted(missing)}")
        jobs = []
        users = model_input["user"] if "user" in model_input else [None] * len(model_input)
        rows = zip(
            model_input["support_items"],
            model_input["support_ratings"],
            model_input["items"],
            users,
            strict=True,
        )
        for r, (support, ratings, items, user) in enumerate(rows):
            try:
                if len(support) != len(ratings):
                    raise FieldError(
                        ("support_ratings",),
                        f"{len(ratings)} ratings for {len(support)} support_items",
                    )
                jobs.append(
                    Job(
                        features=tuple(self.catalog.encode_user(user)),
                        items=tuple(self.catalog.item_index(list(support), ("support_items",))),
                        ratings=tuple(float(x) for x in ratings),
                        score=tuple(self.catalog.item_index(list(items), ("items",))),
                    )
                )
            except FieldError as e:
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.loc)
                raise ValueError(f"row {r}: {where.lstrip('.')}: {e.msg}") from None
        return [res.scores.tolist() for res in self.engine.run(jobs)]
