"""``benchmarks/train_throughput.py --smoke``: two Ray Train workers against one process.

Real subprocesses: ``metarec prepare``, the one-process side in a fresh Python (twice:
default threads and one), ``metarec train --workers 2`` on its own local Ray, and
``benchmarks/meta_step.py``. The tiny size's figures are not checked against the target;
what is checked is that both sides trained on the same tasks and the ratios are theirs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.ci import require_module

require_module("ray")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_throughput_smoke_compares_both_sides_on_the_same_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("train_throughput", None)
    import train_throughput

    out = train_throughput.main(["--smoke", "--work", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    manifest = json.loads((tmp_path / "data-20000" / "manifest.json").read_text())
    tasks = manifest["scenarios"]["user_cold"]["train"]["tasks"]
    one, single, two = out["one_process"], out["one_process_1_thread"], out["two_workers"]
    assert one["tasks"] == single["tasks"] == two["tasks"] == tasks
    assert single["threads"] == 1 and two["threads"] == 1
    for side in (one, single, two):
        assert side["tasks_per_s"] == pytest.approx(tasks / side["pass_s"], rel=0.02)
    assert 0 <= two["sync_s"] < two["pass_s"] < two["epoch_s"] < two["wall_s"]
    assert out["ratio"] == pytest.approx(two["tasks_per_s"] / one["tasks_per_s"], abs=1e-3)
    assert out["meta_step_tasks_per_s"] > 0
