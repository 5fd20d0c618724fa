"""House rule 1: the functional core never imports Ray or MLflow (checked in a fresh process)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # a fresh interpreter per check

CORE = [
    "metarec.config",
    "metarec.errors",
    "metarec.data",
    "metarec.data.prepare",
    "metarec.data.sources",
    "metarec.data.synthetic",
    "metarec.data.tasks",
    "metarec.data.features",
    "metarec.data.prepared",
    "metarec.data.download",
    "metarec.data.splits",
    "metarec.model",
    "metarec.meta",
    "metarec.batch",
    "metarec.metrics",
    "metarec.stats",
    "metarec.baselines",
    "metarec.loop",
    "metarec.evaluate",
    "metarec.report",
    "metarec.plots",
    "metarec.transfer",
    "metarec.checkpoint",
    "metarec.catalog",
    "metarec.data.feedback",
    # serving's core: only its `app` module is the Ray shell
    "metarec.serving.engine",
    "metarec.serving.sessions",
    "metarec.serving.schemas",
    "metarec.serving.service",
    "metarec.cli",  # `metarec --help` must not pay for importing Ray
]


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_not_import_ray_or_mlflow(module):
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_platform_dir_does_not_shadow_stdlib_platform():
    from tests.conftest import REPO

    res = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stdout.strip() == "Linux", res.stderr
