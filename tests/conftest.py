"""Shared fixtures. `tiny_testbed`: a reduced testbed built once per test session in a temporary
cache (same code path as the full build, a few seconds instead of minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_OPTIONS = {"preset": "tiny", "progress": False}


@pytest.fixture(scope="session")
def tiny_testbed_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache root holding the session's tiny testbed; pass it as `TATR_CACHE` to CLI runs."""
    return tmp_path_factory.mktemp("tatr-cache")


@pytest.fixture(scope="session")
def tiny_testbed(tiny_testbed_cache: Path):  # -> Testbed (imported lazily)
    """A built `Testbed` (preset `tiny`: 4 tasks, 1-layer width-32 ViT) in the session cache."""
    from tatr.suites import get_suite

    suite = get_suite("testbed", TINY_OPTIONS, tiny_testbed_cache)
    _ = suite.folder  # build now, so the first test using it is not the one that pays
    return suite


# `.ci/run` sets TATR_REQUIRE_SERVICES=1 after installing PostgreSQL and Chromium: there a skipped test
# (a missing server, browser or optional package) is a failure, so CI cannot go green without them.
REQUIRE_SERVICES = os.environ.get("TATR_REQUIRE_SERVICES") == "1"


def _skip_to_failure(report: pytest.TestReport | pytest.CollectReport) -> None:
    if REQUIRE_SERVICES and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped where TATR_REQUIRE_SERVICES=1 (CI): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _skip_to_failure(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _skip_to_failure(outcome.get_result())


pytest_plugins = ["pytester"]
