"""House rules: the functional core never imports Ray or MLflow; within the core the network
knows nothing of files and the meta-learner nothing of the baselines it is compared with;
nothing imports the CLI (checked in a fresh process, so transitive imports count)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # a fresh interpreter per check

CORE = [
    "metarec.config",
    "metarec.sections",
    "metarec.errors",
    "metarec.data",
    "metarec.data.prepare",
    "metarec.data.sources",
    "metarec.data.events",
    "metarec.data.shop",
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
    "metarec.implicit_metrics",
    "metarec.negatives",
    "metarec.implicit_baselines",
    "metarec.implicit_evaluate",
    "metarec.implicit_report",
    "metarec.stats",
    "metarec.baselines",
    "metarec.loop",
    "metarec.evaluate",
    "metarec.report",
    "metarec.plots",
    "metarec.transfer",
    "metarec.checkpoint",
    "metarec.initialise",
    "metarec.mf",
    "metarec.train_state",
    "metarec.heap",
    "metarec.evaluation_job",
    "metarec.commands",
    "metarec.options",
    "metarec.catalog",
    "metarec.data.feedback",
    # serving's core: only its `app` module is the Ray shell
    "metarec.serving.engine",
    "metarec.serving.retrieval",
    "metarec.serving.sessions",
    "metarec.serving.schemas",
    "metarec.serving.service",
    "metarec.cli",  # `metarec --help` must not pay for importing Ray
]


# What the meta-learning core is: it may use ``metarec.mf`` (ALS, where item factors start)
# but never ``metarec.baselines``, so no baseline can leak into what it is compared with.
META_CORE = [
    "metarec.model",
    "metarec.meta",
    "metarec.batch",
    "metarec.metrics",
    "metarec.mf",
    "metarec.initialise",
    "metarec.loop",
    "metarec.checkpoint",
    "metarec.train_state",
]


def _imports_none_of(module: str, forbidden: tuple[str, ...]) -> None:
    code = (
        f"import sys, {module}; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {forbidden!r} or m in {forbidden!r}"
        f" or any(m.startswith(f + '.') for f in {forbidden!r})]; "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_not_import_ray_or_mlflow(module):
    _imports_none_of(module, ("ray", "mlflow"))


def test_the_network_knows_nothing_of_files():
    _imports_none_of("metarec.model", ("metarec.data", "pyarrow"))


@pytest.mark.parametrize("module", META_CORE)
def test_the_meta_learning_core_does_not_import_the_baselines(module):
    _imports_none_of(
        module,
        ("metarec.baselines", "metarec.evaluate", "metarec.implicit_baselines", "implicit"),
    )


def test_nothing_imports_the_cli():
    """Library code and benchmarks never import the CLI; entrypoints (the ``metarec``
    script, ``jobs/*.py`` for ``ray job submit``) are the CLI."""
    from tests.conftest import REPO

    offenders = []
    for path in [*REPO.glob("platform/**/*.py"), *REPO.glob("benchmarks/*.py")]:
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "metarec.cli" for n in names):
                offenders.append(f"{Path(path).relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


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
