"""tests/ci.py: under CI=true a missing requirement fails; Hypothesis derandomizes on CI only."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ci import hypothesis_profile, on_ci, require_module, skip_or_fail

MISSING = "metarec_no_such_module"


@pytest.fixture(params=[None, "false", "1"], ids=["unset", "false", "1"])
def local(request, monkeypatch):
    """Environments that are not CI: only the exact value ``true`` counts."""
    if request.param is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", request.param)


@pytest.fixture
def ci(monkeypatch):
    monkeypatch.setenv("CI", "true")


def test_missing_requirement_skips_locally_with_its_reason(local):
    with pytest.raises(pytest.skip.Exception, match="ml-100k not found at /x") as e:
        skip_or_fail("ml-100k not found at /x")
    assert e.value.allow_module_level  # usable at import, like pytest.importorskip


def test_missing_requirement_fails_under_ci(ci):
    with pytest.raises(pytest.fail.Exception, match=r"ml-100k not found at /x \(CI=true"):
        skip_or_fail("ml-100k not found at /x")


def test_require_module_imports_what_is_there(ci):
    assert require_module("json").dumps([1]) == "[1]"


def test_require_module_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} is not importable"):
        require_module(MISSING)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"{MISSING} is not importable"):
        require_module(MISSING)


def test_profile_choice_follows_ci(local, monkeypatch):
    assert hypothesis_profile() == "local"
    monkeypatch.setenv("CI", "true")
    assert hypothesis_profile() == "ci"


def test_the_loaded_profile_is_the_one_for_this_run():
    assert settings.get_current_profile_name() == hypothesis_profile()
    assert settings.default.derandomize is on_ci()
    # an explicit @settings without a parent (test_serve's schemathesis fuzz) inherits it
    assert settings(max_examples=50, database=None).derandomize is on_ci()


def _drawn(profile: str) -> list[int]:
    """The examples a fresh @given test draws under ``profile``."""
    seen = []

    @settings(settings.get_profile(profile), max_examples=20, database=None)
    @given(st.integers(0, 2**64))
    def draw(x):
        seen.append(x)

    draw()
    return seen


def test_ci_profile_replays_the_same_examples_and_local_draws_new_ones():
    assert _drawn("ci") == _drawn("ci")
    assert _drawn("local") != _drawn("local")


def test_ci_profile_keeps_the_example_counts():
    assert settings.get_profile("ci").max_examples == settings.get_profile("default").max_examples
