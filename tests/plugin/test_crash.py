"""A test whose container dies or hangs is a failure that says what happened; the run goes on.

The same test would take the whole pytest process down (a segfault, ``os._exit``) or stall it
(a sleep) without isolation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest


CRASHES = """
    import ctypes
    import os
    import time
    import pytest

    def test_before():
        assert os.getpid() == 1

    def test_segfault():
        ctypes.string_at(0)

    def test_exits():
        os._exit(3)

    @pytest.mark.container(timeout=0.5)
    def test_hangs():
        time.sleep(60)

    @pytest.fixture
    def dies_in_setup():
        os._exit(4)

    def test_setup_dies(dies_in_setup):
        pass

    @pytest.fixture
    def dies_in_teardown():
        yield
        os._exit(5)

    def test_teardown_dies(dies_in_teardown):
        pass

    def test_after():
        assert os.getpid() == 1
"""


@pytest.mark.rootless
def test_crashes_and_timeouts_are_failures_naming_the_cause(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_crash=CRASHES)
    result = runpytest("--isolate")
    # test_teardown_dies passes its call, then errors in teardown, as in plain pytest.
    result.assert_outcomes(passed=3, failed=3, errors=2)
    assert result.duration < 30, "the hanging test was not stopped at its timeout"
    result.stdout.fnmatch_lines(
        [
            "*_ test_segfault _*",
            "*container crashed during call: killed by SIGSEGV*",
            "*- Captured stderr call -*",
            "Fatal Python error: Segmentation fault",
            '*File "*test_crash.py", line * in test_segfault',
        ]
    )
    result.stdout.fnmatch_lines(["*_ test_exits _*", "*crashed during call: exited with code 3*"])
    result.stdout.fnmatch_lines(
        ["*_ test_hangs _*", "*Timeout*exceeded its timeout of 0.5 s*killed*"]
    )
    result.stdout.fnmatch_lines(
        ["*_ ERROR at setup of test_setup_dies _*", "*crashed during setup: exited with code 4*"]
    )
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at teardown of test_teardown_dies _*",
            "*crashed during teardown: exited with code 5*",
        ]
    )


@pytest.mark.rootless
def test_exitfirst_stops_after_a_crash(pytester: pytest.Pytester, runpytest: RunPytest) -> None:
    pytester.makepyfile(test_crash=CRASHES)
    result = runpytest("--isolate", "-x")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])


TIMEOUTS = """
    import time
    import pytest

    def test_hangs_past_the_default():
        time.sleep(60)

    @pytest.mark.container(timeout=30)
    def test_marker_allows_longer():
        time.sleep(0.8)
"""


def test_the_timeout_option_is_a_default_that_markers_override(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_timeouts=TIMEOUTS)
    result = runpytest("--isolate", "--isolate-timeout=0.5")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*_ test_hangs_past_the_default _*", "*timeout of 0.5 s*"])


def test_the_ini_timeout_applies_too(pytester: pytest.Pytester, runpytest: RunPytest) -> None:
    pytester.makeini("[pytest]\nisolate_timeout = 0.5\n")
    pytester.makepyfile(test_timeouts=TIMEOUTS)
    result = runpytest("--isolate", "-k", "hangs")
    result.assert_outcomes(failed=1, deselected=1)
    result.stdout.fnmatch_lines(["*timeout of 0.5 s*"])
