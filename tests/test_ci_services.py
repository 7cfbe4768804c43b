"""`.ci/run` must fail, not skip, when a service the tests need is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.mark.parametrize("required", ["1", ""])
def test_a_skip_is_a_failure_only_where_services_are_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, required: str
) -> None:
    monkeypatch.setenv("TATR_REQUIRE_SERVICES", required)
    pytester.makeconftest(CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(
        test_mod="""
        import pytest
        def test_runs(): pass
        def test_needs_server(): pytest.skip("no PostgreSQL binaries")
        """,
        test_missing="""
        import pytest
        pytest.importorskip("no_such_module_anywhere")
        def test_x(): pass
        """,
    )
    tests = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_mod.py")
    module = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_missing.py")
    if required:
        tests.assert_outcomes(passed=1, failed=1)
        tests.stdout.fnmatch_lines(["*TATR_REQUIRE_SERVICES=1*no PostgreSQL binaries*"])
        module.assert_outcomes(errors=1)
        assert module.ret != 0
    else:
        tests.assert_outcomes(passed=1, skipped=1)
        module.assert_outcomes(skipped=1)
        assert tests.ret == 0


def test_ci_script_fails_rather_than_warns() -> None:
    script = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert "export TATR_REQUIRE_SERVICES=1" in script
    assert "warning: could not install" not in script
    assert "exit 1" in script
