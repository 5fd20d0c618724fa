"""benchmarks/stopping_rules.py's rule comparison on curves whose answer is known."""

from __future__ import annotations

import importlib.util

import numpy as np

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location(
    "stopping_rules", REPO / "benchmarks" / "stopping_rules.py"
)
stopping_rules = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stopping_rules)


def test_rules_choose_on_one_half_and_score_the_other(tmp_path):
    users, epochs = 40, 12
    # epoch e's MAE: best at epoch 2, then worse every epoch; prior scale 1 (index 2) best
    by_epoch = np.array([0.80, 0.78, 0.75] + [0.75 + 0.01 * k for k in range(1, epochs - 1)])
    by_scale = np.array([0.02, 0.01, 0.0, 0.01, 0.02])
    curve = by_epoch[:, None, None] + by_scale[None, :, None] + np.zeros((1, 1, users))
    flat = by_epoch[:1, None, None] + by_scale[None, :, None] + np.zeros((epochs, 1, users))
    arrays = {"7_trained": curve, "7_averaged": flat, "7_mf_foldin": np.full(users, 0.77)}
    arrays["7_bias"] = np.full(users, 0.9)
    np.savez(tmp_path / "c.npz", **arrays)
    out = stopping_rules.compare(str(tmp_path / "c.npz"), repeats=2)
    got = out["minus_mf_foldin"]
    assert got["trained, patience 3"] == round(0.75 - 0.77, 4)  # stops at the best epoch
    assert got["untrained (prior scale only)"] == round(0.80 - 0.77, 4)
    assert got["averaged, patience 3"] == round(0.80 - 0.77, 4)  # a flat curve: epoch 1
    assert out["validation_users"] == users
    assert stopping_rules._choose(curve, None) == (2, 2)
