"""Shared fixtures: the ML-100k location, small prepared datasets (session-scoped, seeded).

Also the Hypothesis profile: derandomized under ``CI=true`` (a red CI run reproduces),
random locally (each run explores new examples). Neither lowers the example counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from metarec.config import load_config
from metarec.data.prepare import prepare
from tests.ci import hypothesis_profile, skip_or_fail

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("METAREC_ML100K", REPO.parent / "shared" / "datasets" / "ml-100k"))

# Parent "default" (Hypothesis' own defaults), not whatever profile Hypothesis auto-loaded on
# seeing some CI variable: the choice follows tests/ci.py's rule only.
_DEFAULTS = settings.get_profile("default")
settings.register_profile(
    "ci", _DEFAULTS, derandomize=True, database=None, deadline=None, print_blob=True
)
settings.register_profile("local", _DEFAULTS)
settings.load_profile(hypothesis_profile())

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test-fast` runs one process per core
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K / "u.data").is_file():
        skip_or_fail(f"ml-100k not found at {ML100K}")
    return ML100K


@pytest.fixture(scope="session")
def ml100k_prepared(ml100k_dir, tmp_path_factory):
    cfg = load_config(None, **{"data.source": "ml-100k", "data.input": str(ml100k_dir)})
    return prepare(cfg, tmp_path_factory.mktemp("ml100k") / "data", progress=False)


@pytest.fixture(scope="session")
def synthetic_cfg():
    return load_config(
        REPO / "configs" / "demo.yaml",
        # a fixed ALS penalty: choosing one on validation users (the default) costs 9 ALS
        # fits per training run; tests/test_loop.py covers that choice on its own
        **{
            "data.synthetic.n_users": 600,
            "data.synthetic.n_items": 300,
            "meta.prior_precision": 10.0,
        },
    )


@pytest.fixture(scope="session")
def synthetic_prepared(synthetic_cfg, tmp_path_factory):
    return prepare(synthetic_cfg, tmp_path_factory.mktemp("syn") / "data", progress=False)


@pytest.fixture(scope="session")
def shop_cfg():
    """A small synthetic shop (implicit feedback: views, carts, purchases). BCE: it learns
    in the 4 epochs a test can afford, where the default BPR needs about 10."""
    return load_config(
        None,
        overrides=["data.scenarios=user_cold"],
        **{
            "data.synthetic.feedback": "implicit",
            "data.synthetic.n_users": 700,
            "data.synthetic.n_items": 1500,
            "data.synthetic.min_ratings_per_user": 20,
            "data.synthetic.max_ratings_per_user": 60,
            "train.epochs": 4,
            "meta.implicit_loss": "bce",
        },
    )


@pytest.fixture(scope="session")
def shop_prepared(shop_cfg, tmp_path_factory):
    return prepare(shop_cfg, tmp_path_factory.mktemp("shop") / "data", progress=False)


@pytest.fixture(scope="session")
def uneven_prepared(synthetic_cfg, tmp_path_factory):
    """481 training tasks (601 users, 80% of them train; 481 = 13 x 37): an uneven count
    for 2, 3 or 4 workers, where Ray's equal split would drop tasks."""
    from metarec.config import apply_overrides

    cfg = apply_overrides(
        synthetic_cfg, **{"data.synthetic.n_users": 601, "data.scenarios": ["user_cold"]}
    )
    ds = prepare(cfg, tmp_path_factory.mktemp("uneven") / "data", progress=False)
    assert ds.manifest["scenarios"]["user_cold"]["train"]["tasks"] == 481
    return ds
