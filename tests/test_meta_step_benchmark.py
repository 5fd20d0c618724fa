"""``benchmarks/meta_step.py --smoke`` runs as a user runs it, and its vectorized
meta-gradients still equal the per-task loop's (the check it makes before timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration  # a fresh interpreter, ~15 s on 2 cores


@pytest.mark.parametrize("loss", ["mse", "bpr"])
def test_meta_step_smoke_runs_and_agrees_with_the_loop(loss):
    out = subprocess.run(
        [sys.executable, "benchmarks/meta_step.py", "--smoke", "--loss", loss],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["loss"] == loss
    assert {r["algorithm"] for r in report["results"]} >= {"maml", "fomaml"}
    for r in report["results"]:
        assert r["max_rel_grad_diff"] < 1e-6, r
        assert r["tasks_per_s_vectorized"] > 0 and r["tasks_per_s_loop"] > 0
