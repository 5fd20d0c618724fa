"""``benchmarks/scale.py --smoke``: the whole pipeline at two tiny sizes, as CI runs it.

Real subprocesses: `metarec prepare`, `metarec train` on its own local Ray (2 workers),
`metarec evaluate --model --workers 2` (test users scored by Ray Data actors), and
``benchmarks/serve_load.py`` against a real Serve app on 127.0.0.1. The figures are not
checked against targets (the sizes are tiny); what is checked is that every stage ran and
was measured, and that the measures are consistent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.ci import require_module

require_module("ray")
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _scale():
    spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_workers_own_fork_is_not_counted_as_another_worker():
    """A subprocess a worker starts carries the worker's title until it execs; counting it
    made a 2-worker run read as 3. Two titled siblings, one of which forks: 2 workers."""
    worker = (
        "import os, sys, time\n"
        "if sys.argv[1] == 'fork' and os.fork() == 0:\n"
        "    time.sleep(1.0); os._exit(0)\n"
        "time.sleep(1.5)\n"
    )
    launch = (  # its own command line must not carry the title
        "import subprocess, sys\n"
        f"w, title = {worker!r}, 'RayTrain' + 'Worker'\n"
        "ps = [subprocess.Popen([sys.executable, '-c', w, m, title]) for m in ('fork', 'no')]\n"
        "sys.exit(sum(p.wait() for p in ps))\n"
    )
    cmd = [sys.executable, "-c", launch]
    res = _scale().run_measured(cmd, timeout=30)
    assert res["code"] == 0, res["output"]
    assert len(res["worker_peak_rss_mb"]) == 2, res


def test_scale_smoke_measures_every_stage_at_both_sizes(tmp_path, capsys):
    result = _scale().main(["--smoke", "--work", str(tmp_path), "--png", str(tmp_path / "s.png")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    small, large = result["sizes"]
    assert small["interactions"] < large["interactions"]
    for row in (small, large):
        for stage in ("prepare", "train", "evaluate"):
            assert "error" not in row[stage], row[stage]["error"]
            assert row[stage]["s"] > 0 and row[stage]["peak_rss_mb"] > 50
        manifest = json.loads(
            (tmp_path / f"data-{row['target_interactions']}" / "manifest.json").read_text()
        )
        train = row["train"]
        assert train["tasks"] == manifest["scenarios"]["user_cold"]["train"]["tasks"]
        assert train["workers_seen"] == 2 and train["worker_peak_rss_mb"] > 50
        assert train["tasks_per_s"] > 0 and 0 < train["epoch_s"] < train["s"]
        assert (tmp_path / f"run-{row['target_interactions']}" / "eval" / "results.json").is_file()
        scored = row["evaluate"]  # test users scored by two Ray Data actors
        assert scored["workers"] == 2 and scored["workers_seen"] == 2, scored
        assert scored["worker_peak_rss_mb"] > 50
    # the same network (its item table frozen) sends the same bytes whatever the data size
    assert (
        small["train"]["allreduce_bytes_per_step"] == large["train"]["allreduce_bytes_per_step"] > 0
    )
    assert set(result["growth_exponent"]) >= {"prepare_s", "train_s", "worker_rss_mb"}
    assert result["growth_exponent"]["allreduce_bytes_per_step"] == 0.0
    (served,) = result["serve_c8"]
    assert 0 < served["p50_ms"] <= served["p99_ms"], served
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
