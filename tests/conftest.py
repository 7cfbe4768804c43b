"""Shared fixtures. `tiny_testbed`: a reduced testbed built once per test session in a temporary
cache (same code path as the full build, a few seconds instead of minutes)."""

from __future__ import annotations

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
