"""The next test's container is started while a test runs, and used only if nothing changed.

The pytest process starts the next test's container (its namespaces, mounts and the forked
child, waiting to be told to go) while the current test runs. That child was forked before
the current test's reports were logged, so the plugin uses it only if the next test's wider
scopes are, object for object, what the child saw; otherwise it starts a fresh one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest

STARTED_BEFORE_ITS_TURN = """
    import os, time
    from pathlib import Path

    def test_slow():
        time.sleep(1.0)

    def test_next():
        # The process start time (field 22 of /proc/self/stat) against the clock: the child
        # was forked when test_slow began, a second ago, not just now.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        waited = time.clock_gettime(time.CLOCK_BOOTTIME) - started
        assert os.getpid() == 1
        assert waited > 0.5, waited
"""


@pytest.mark.rootless
def test_the_next_container_starts_while_a_test_runs(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_early=STARTED_BEFORE_ITS_TURN)
    result = runpytest("--isolate", "-q")
    result.assert_outcomes(passed=2)


PARAMETRIZED_MODULE_FIXTURE = """
    import os, pathlib
    import pytest

    LOG = pathlib.Path(__file__).with_name("events.log")

    @pytest.fixture(scope="module", params=[1, 2])
    def numbered(request):
        with LOG.open("a") as f:
            f.write(f"setup {request.param}\\n")
        yield request.param, os.getpid()
        with LOG.open("a") as f:
            f.write(f"teardown {request.param}\\n")

    def test_x(numbered):
        value, pid = numbered
        assert pid != os.getpid()  # set up in the pytest process, not again in this container

    def test_y(numbered):
        value, pid = numbered
        assert pid != os.getpid()
"""


@pytest.mark.rootless
def test_a_container_started_before_a_fixture_changed_is_not_used(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    # Order: test_x[1], test_y[1], test_x[2], test_y[2]. test_x[2]'s container is started
    # while test_y[1] runs, with `numbered` still 1: its child would set `numbered` up again
    # itself, inside the container (its pid would then be the test's).
    pytester.makepyfile(test_params=PARAMETRIZED_MODULE_FIXTURE)
    result = runpytest("--isolate", "-v")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*test_x?1? PASSED*", "*test_y?1? PASSED*", "*test_x?2? PASSED*"])
    events = (pytester.path / "events.log").read_text().split("\n")
    assert events == ["setup 1", "teardown 1", "setup 2", "teardown 2", ""]


CHILDREN_AT_THE_END = """
    import os, pathlib
    import pytest

    @pytest.hookimpl(trylast=True)  # after the plugin's own, which closes the engine
    def pytest_unconfigure(config):
        try:
            found = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            found = "none"
        pathlib.Path(config.rootpath, "children.txt").write_text(str(found))
"""

STOPPED_FIRST = """
    def test_fails():
        assert False

    def test_never_run():
        pass
"""


@pytest.mark.rootless
def test_a_container_started_for_a_test_that_never_runs_is_removed(
    pytester: pytest.Pytester,
    runpytest: RunPytest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytester.makepyfile(STOPPED_FIRST)
    pytester.makeconftest(CHILDREN_AT_THE_END)
    state = tmp_path / "state"
    monkeypatch.setenv("PYTEST_ISOLATE_STATE", str(state))
    token = "not early_start_leak_check"  # selects all; marks this session's command line
    result = runpytest("--isolate", "-x", "-k", token)
    result.assert_outcomes(failed=1)
    assert "test_never_run" not in result.stdout.str()
    # Every process the session started was ended and reaped before it exited.
    assert (pytester.path / "children.txt").read_text() == "none"
    left = subprocess.run(["pgrep", "-f", token], capture_output=True, text=True)
    assert left.stdout == "", "a container's process outlived its session"
    assert not state.exists() or list(state.iterdir()) == [], list(state.iterdir())


WARNING_FILTERS_PER_TEST = """
    import warnings
    import pytest

    def test_plain():
        pass

    @pytest.mark.filterwarnings("error")
    def test_strict():
        warnings.warn("turned into an error by this test's own marker")

    def test_lenient():
        warnings.warn("only recorded here")
"""


@pytest.mark.rootless
def test_a_container_started_under_another_tests_warning_filters_is_not_used(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    # pytest applies a test's filterwarnings marks around its whole protocol; a child forked
    # during the test before it has that test's filters.
    pytester.makepyfile(test_filters=WARNING_FILTERS_PER_TEST)
    result = runpytest("--isolate", "-v")
    result.assert_outcomes(passed=2, failed=1, warnings=1)
    result.stdout.fnmatch_lines(["*test_strict FAILED*", "*UserWarning: turned into an error*"])


TIMEOUT_FROM_ITS_OWN_START = """
    import time
    import pytest

    pytestmark = pytest.mark.container(timeout=2.0)

    def test_first():
        time.sleep(1.2)

    def test_second():
        # Its container was started 1.2 s before its turn: that is not the test's time.
        time.sleep(1.2)
"""


@pytest.mark.rootless
def test_a_timeout_counts_from_the_tests_turn_not_from_its_containers_start(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_timeout=TIMEOUT_FROM_ITS_OWN_START)
    result = runpytest("--isolate")
    result.assert_outcomes(passed=2)
