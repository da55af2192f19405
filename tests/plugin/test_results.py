"""A test run in a container reports exactly what it would report in the pytest process.

Each generated file holds several kinds of result, each checked by its own assertion on the
one inner run, so the suite stays fast while a failure still names the result that broke.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest


OUTCOMES = """
    import os
    import pytest

    @pytest.fixture
    def broken():
        raise RuntimeError("fixture broke")

    @pytest.fixture
    def broken_teardown():
        yield
        raise RuntimeError("teardown broke")

    def test_pass():
        assert os.getpid() == 1

    def test_dict_diff():
        assert {"a": 1, "b": 2} == {"a": 2, "b": 2}

    def test_setup_error(broken):
        pass

    def test_teardown_error(broken_teardown):
        pass

    def test_skip():
        pytest.skip("not today")

    @pytest.mark.xfail(reason="known bug")
    def test_xfail():
        assert False

    @pytest.mark.xfail(reason="fixed already")
    def test_xpass():
        pass
"""


@pytest.mark.rootless
def test_each_outcome_as_plain_pytest_reports_it(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_outcomes=OUTCOMES)
    result = runpytest("--isolate", "-rA")
    result.assert_outcomes(passed=2, failed=1, errors=2, skipped=1, xfailed=1, xpassed=1)
    # The structured diff is built by the assertion rewriter inside the container.
    result.stdout.fnmatch_lines(
        [
            "*_ test_dict_diff _*",
            "E * assert {'a': 1, 'b': 2} == {'a': 2, 'b': 2}",
            "E * Differing items:",
            "E * {'a': 1} != {'a': 2}",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*_ ERROR at setup of test_setup_error _*", "E * RuntimeError: fixture broke"]
    )
    result.stdout.fnmatch_lines(
        ["*_ ERROR at teardown of test_teardown_error _*", "E * RuntimeError: teardown broke"]
    )
    result.stdout.fnmatch_lines(
        [
            "PASSED test_outcomes.py::test_pass",
            "PASSED test_outcomes.py::test_teardown_error",
            "SKIPPED [[]1[]] test_outcomes.py:*: not today",
            "XFAIL test_outcomes.py::test_xfail - known bug",
            "XPASS test_outcomes.py::test_xpass - fixed already",
        ],
        consecutive=False,
    )


OUTPUT = """
    import logging
    import os
    import sys
    import warnings

    def test_prints():
        assert os.getpid() == 1
        print("to stdout from the container")
        print("to stderr from the container", file=sys.stderr)
        logging.getLogger("probe").warning("logged from the container")

    def test_prints_then_fails():
        print("stdout before failing")
        assert False

    def test_warns():
        warnings.warn(UserWarning("careful inside the container"))
        # The plugin silences Python's warning about forking a threaded process around its
        # own fork: not in the test.
        warnings.warn(DeprecationWarning("this kind of fork is deprecated"))
"""


@pytest.mark.rootless
def test_output_logging_and_warnings_reach_the_report(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_output=OUTPUT)
    result = runpytest("--isolate", "-rA")
    result.assert_outcomes(passed=2, failed=1, warnings=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_prints_then_fails _*",
            "*- Captured stdout call -*",
            "stdout before failing",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*= PASSES =*",
            "*_ test_prints _*",
            "*- Captured stdout call -*",
            "to stdout from the container",
            "*- Captured stderr call -*",
            "to stderr from the container",
            "*- Captured log call -*",
            "WARNING  probe:test_output.py:* logged from the container",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*= warnings summary =*",
            "test_output.py::test_warns",
            "*test_output.py:*: UserWarning: careful inside the container",
            "*test_output.py:*: DeprecationWarning: this kind of fork is deprecated",
        ]
    )


STOPS = """
    import os

    def test_first():
        assert os.getpid() == 1

    def test_second_fails():
        assert os.getpid() == 0, "second"

    def test_third():
        assert os.getpid() == 1

    def test_fourth_fails():
        assert os.getpid() == 0, "fourth"
"""


def test_exitfirst_stops_after_the_first_failure(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_stops=STOPS)
    result = runpytest("--isolate", "-x")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    result.stdout.no_fnmatch_line("*test_third*")


@pytest.mark.rootless
def test_last_failed_reruns_only_the_failures(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_stops=STOPS)
    runpytest("--isolate").assert_outcomes(passed=2, failed=2)
    again = runpytest("--isolate", "--lf", "-v")
    again.assert_outcomes(failed=2)
    again.stdout.fnmatch_lines(
        [
            "run-last-failure: rerun previous 2 failures",
            "test_stops.py::test_second_fails FAILED*",
            "test_stops.py::test_fourth_fails FAILED*",
        ]
    )
    again.stdout.no_fnmatch_line("test_stops.py::test_first *")
    again.stdout.no_fnmatch_line("test_stops.py::test_third *")


REPORTS = """
    import os
    import time

    def test_records(record_property):
        record_property("answer", 42)
        assert os.getpid() == 1

    def test_slow():
        time.sleep(0.3)

    def test_fails():
        assert 1 + 1 == 3, "arithmetic is broken"
"""


@pytest.mark.rootless
def test_junitxml_has_cases_failures_and_properties(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_reports=REPORTS)
    # record_property needs a junit family that has properties per test case.
    result = runpytest("--isolate", "--junitxml=out.xml", "-o", "junit_family=xunit1")
    result.assert_outcomes(passed=2, failed=1)
    suite = ET.parse(pytester.path / "out.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "0")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert sorted(cases) == ["test_fails", "test_records", "test_slow"]
    failure = cases["test_fails"].find("failure")
    assert failure is not None
    assert "arithmetic is broken" in (failure.get("message") or "")
    props = {
        name: [(p.get("name"), p.get("value")) for p in case.iter("property")]
        for name, case in cases.items()
    }
    assert props["test_records"] == [("answer", "42"), ("container_image", "host")]
    assert props["test_fails"] == [("container_image", "host")]
    assert float(cases["test_slow"].get("time") or 0) >= 0.3


DURATIONS = """
    import time
    import pytest

    @pytest.fixture(scope="session")
    def slow_service():
        time.sleep(0.4)

    def test_slow_call():
        time.sleep(0.3)

    def test_slow_setup(slow_service):
        pass
"""

_DURATION = re.compile(r"(\d+\.\d+)s (setup|call|teardown) +\S+::(\w+)")


@pytest.mark.rootless
def test_durations_count_the_container_and_wider_fixtures(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_durations=DURATIONS)
    result = runpytest("--isolate", "--durations=0", "-vv")
    found = [m.groups() for m in map(_DURATION.fullmatch, result.outlines) if m]
    assert len(found) == 6, found  # each phase of each test once
    took = {(when, name): float(secs) for secs, when, name in found}
    assert 0.3 <= took[("call", "test_slow_call")] < 5
    # As in plain pytest, a session fixture's setup is charged to the setup of the first test
    # that needs it, though it ran in the pytest process and not in the container.
    assert took[("setup", "test_slow_setup")] >= 0.4
