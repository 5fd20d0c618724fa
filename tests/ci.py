"""What ``CI=true`` changes in the test suite: a missing requirement fails instead of skipping.

Locally a test that needs ML-100k or an optional tool skips with its reason. On CI
(``.ci/run`` exports ``CI=true``) the same gap means a broken runner, and a skip would
turn the run green with the test never run, so it fails instead.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def on_ci() -> bool:
    """True under CI: ``CI`` is exactly ``true`` (what ``.ci/run`` and most CI services set)."""
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test (or the module, when called at import) for ``reason``; fail under CI."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: a missing requirement fails, never skips)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str) -> ModuleType:
    """Import ``name``, like ``pytest.importorskip`` but through :func:`skip_or_fail`."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:  # a broken install (other ImportErrors) still errors
        skip_or_fail(f"{name} is not importable: {e}")


def hypothesis_profile() -> str:
    """The Hypothesis profile ``tests/conftest.py`` loads: derandomized under CI only."""
    return "ci" if on_ci() else "local"
