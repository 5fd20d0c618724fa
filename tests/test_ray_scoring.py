"""``evaluate --workers N``: test users scored by Ray Data actors give what one process
gives, every method, every per-task metric, in split order."""

from __future__ import annotations

import os

import pytest
import torch

from metarec.batch import from_table
from metarec.config import apply_overrides
from metarec.evaluate import fit_methods, score_methods
from metarec.scorers import relevance_threshold
from tests.ci import require_module

ray = require_module("ray")
pytestmark = pytest.mark.integration  # a local Ray


@pytest.fixture(scope="module")
def local_ray():
    from metarec.ray_cluster import local_ray_settings

    local_ray_settings(os.environ)  # as `metarec evaluate --workers` starts its own Ray
    ray.init(address="local", num_cpus=2, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_data_scoring_equals_scoring_in_process(local_ray, synthetic_cfg, synthetic_prepared):
    from metarec.ray_scoring import ray_score_methods

    ds = synthetic_prepared
    cfg = apply_overrides(synthetic_cfg, **{"train.epochs": 2})
    fitted = fit_methods(cfg, ds, "user_cold", ("item_mean", "mf_foldin"))
    table = ds.tasks("user_cold", "test")
    kw = {
        "n_items": ds.manifest["counts"]["items"],
        "relevance_threshold": relevance_threshold(ds.manifest),
    }
    tasks = from_table(table)
    here = score_methods(fitted.scorers, tasks, table, **kw)
    spread = ray_score_methods(2, chunk=8)(fitted.scorers, tasks, table, **kw)  # many chunks
    assert table.num_rows > 8 * 4
    assert list(spread) == list(here) and len(here) == 3  # the meta-learner and two baselines
    for method, metrics in here.items():
        assert set(spread[method]) == set(metrics), method
        for name, values in metrics.items():
            got = spread[method][name]
            assert got.dtype == values.dtype and got.shape == values.shape, (method, name)
            torch.testing.assert_close(got, values, rtol=1e-5, atol=1e-6, equal_nan=True)
