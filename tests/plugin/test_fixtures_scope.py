"""Fixtures wider than a function are set up once, in the pytest process, as plain pytest does.

The inner session's fixtures and its ``pytest_runtest_logreport`` hook append to one event
log. They run in the pytest process, so the log is the host's file and the outer test reads
the whole sequence: how often each fixture was set up, and where its teardown fell.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest


EVENT_LOG_CONFTEST = """
    import os
    import pathlib
    import pytest

    LOG = pathlib.Path(__file__).with_name("events.log")

    def log(event):
        with LOG.open("a") as f:
            f.write(event + "\\n")

    @pytest.fixture(scope="session")
    def event_log():
        return log

    @pytest.fixture(scope="session")
    def session_fx(event_log):
        event_log("session setup")
        yield os.getpid()
        event_log("session teardown")

    @pytest.fixture(scope="class")
    def class_fx(request, event_log):
        event_log(f"class setup {request.cls.__name__}")
        yield
        event_log(f"class teardown {request.cls.__name__}")

    @pytest.fixture
    def function_fx():
        # Function scope belongs to the test: it is set up and torn down in the container.
        assert os.getpid() == 1
        yield
        assert os.getpid() == 1

    def pytest_runtest_logreport(report):
        if report.when == "call":
            log(f"call {report.nodeid}")
"""

SCOPES_ONE = """
    import os
    import pytest

    @pytest.fixture(scope="module")
    def module_fx(event_log):
        event_log("module one setup")
        yield
        event_log("module one teardown")

    class TestA:
        def test_a1(self, session_fx, module_fx, class_fx, function_fx):
            assert os.getpid() == 1
            assert session_fx not in (1, os.getpid())  # the value made in the pytest process

        def test_a2(self, session_fx, module_fx, class_fx, function_fx):
            assert os.getpid() == 1

    class TestB:
        def test_b1(self, session_fx, module_fx, class_fx):
            assert os.getpid() == 1

        def test_b2(self, session_fx, module_fx, class_fx):
            assert os.getpid() == 1

    @pytest.mark.container(False)
    def test_plain(session_fx, module_fx):
        assert os.getpid() == session_fx
"""

SCOPES_TWO = """
    import os
    import pytest

    @pytest.fixture(scope="module")
    def module_fx(event_log):
        event_log("module two setup")
        yield
        event_log("module two teardown")

    def test_c1(session_fx, module_fx):
        assert os.getpid() == 1

    def test_c2(session_fx, module_fx):
        assert os.getpid() == 1
"""


@pytest.mark.rootless
def test_each_wider_fixture_is_set_up_once_and_torn_down_after_its_last_test(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makeconftest(EVENT_LOG_CONFTEST)
    pytester.makepyfile(test_one=SCOPES_ONE, test_two=SCOPES_TWO)
    result = runpytest("--isolate")
    result.assert_outcomes(passed=7)
    events = (pytester.path / "events.log").read_text().splitlines()
    assert events == [
        "session setup",
        "module one setup",
        "class setup TestA",
        "call test_one.py::TestA::test_a1",
        "call test_one.py::TestA::test_a2",
        "class teardown TestA",
        "class setup TestB",
        "call test_one.py::TestB::test_b1",
        "call test_one.py::TestB::test_b2",
        "class teardown TestB",
        "call test_one.py::test_plain",
        "module one teardown",
        "module two setup",
        "call test_two.py::test_c1",
        "call test_two.py::test_c2",
        "module two teardown",
        "session teardown",
    ]


BROKEN_SETUP = """
    import pytest

    @pytest.fixture(scope="module")
    def broken(event_log):
        event_log("broken setup")
        raise RuntimeError("module fixture broke")

    def test_first(broken):
        pass

    def test_second(broken):
        pass

    def test_unaffected():
        pass
"""


def test_a_failing_wider_fixture_errors_each_test_but_runs_once(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makeconftest(EVENT_LOG_CONFTEST)
    pytester.makepyfile(test_broken=BROKEN_SETUP)
    result = runpytest("--isolate")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_first _*",
            "E * RuntimeError: module fixture broke",
            "*_ ERROR at setup of test_second _*",
            "E * RuntimeError: module fixture broke",
        ]
    )
    events = (pytester.path / "events.log").read_text().splitlines()
    assert events == ["broken setup", "call test_broken.py::test_unaffected"]


BROKEN_TEARDOWN = """
    import pytest

    @pytest.fixture(scope="module")
    def broken():
        yield
        raise RuntimeError("module teardown broke")

    def test_first(broken):
        pass

    def test_last(broken):
        pass
"""


def test_a_failing_wider_teardown_is_one_error_of_the_last_test(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_broken=BROKEN_TEARDOWN)
    result = runpytest("--isolate", "--junitxml=out.xml", "-rA")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*_ ERROR at teardown of test_last _*", "E * RuntimeError: module teardown broke"]
    )
    # As in plain pytest: one test case per test, the error attached to the last one (the
    # teardown of the wider scope is part of that test's teardown, not a report of its own).
    suite = ET.parse(pytester.path / "out.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("errors")) == ("2", "1")
    cases = [(c.get("name"), [e.tag for e in c if e.tag != "properties"]) for c in suite]
    assert cases == [("test_first", []), ("test_last", ["error"])]
