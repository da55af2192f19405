"""Which tests run in a container, with which options: markers, command line, ini, errors.

Whether a test ran in a container is read from inside it: PID 1 in a fresh PID namespace, and
never PID 1 in the pytest process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest


CLOSEST = """
    import os
    import socket
    import pytest

    pytestmark = pytest.mark.container(hostname="from-module")

    def test_module_marker():
        assert socket.gethostname() == "from-module"

    @pytest.mark.container(hostname="from-class")
    class TestClass:
        def test_class_marker(self):
            assert socket.gethostname() == "from-class"

        @pytest.mark.container(hostname="from-function")
        def test_function_marker(self):
            assert socket.gethostname() == "from-function"

        @pytest.mark.container(env={"GREETING": "hello"})
        def test_options_merge_per_key(self):
            # The closest marker sets env; the hostname still comes from the class.
            assert os.environ["GREETING"] == "hello"
            assert socket.gethostname() == "from-class"
"""

MIXED = """
    import os
    import pytest

    def test_unmarked_runs_here():
        assert os.getpid() != 1

    @pytest.mark.container
    def test_marked_runs_in_a_container():
        assert os.getpid() == 1

    @pytest.mark.container(workdir="/tmp", read_only=True)
    def test_marker_options_apply():
        assert os.getcwd() == "/tmp"
        with pytest.raises(OSError, match="Read-only file system"):
            open("/etc/pytest-isolate-read-only-probe", "w")

    @pytest.mark.isolate(timeout=30)
    def test_legacy_marker_runs_in_a_container():
        assert os.getpid() == 1
"""


def test_markers_choose_tests_and_the_closest_option_wins(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_closest=CLOSEST, test_mixed=MIXED)
    result = runpytest("-v")
    result.assert_outcomes(passed=8)


OPT_OUT = """
    import os
    import pytest

    def test_unmarked():
        assert os.getpid() == 1

    @pytest.mark.container(False)
    def test_opted_out():
        assert os.getpid() != 1

    @pytest.mark.container(False)
    class TestOptedOut:
        def test_method(self):
            assert os.getpid() != 1

        @pytest.mark.container
        def test_back_in(self):
            assert os.getpid() == 1
"""


def test_isolate_runs_every_test_but_those_opted_out(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_opt_out=OPT_OUT)
    runpytest("--isolate").assert_outcomes(passed=4)


def test_ini_isolate_true_runs_every_test_in_a_container(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makeini("[pytest]\nisolate = true\n")
    pytester.makepyfile(test_opt_out=OPT_OUT)
    runpytest().assert_outcomes(passed=4)


NOTHING_ISOLATED = """
    import os
    import pytest

    def test_unmarked():
        assert os.getpid() != 1

    @pytest.mark.container(hostname="marked")
    def test_marked():
        assert os.getpid() != 1

    @pytest.mark.isolate(timeout=30)
    def test_legacy():
        assert os.getpid() != 1
"""


def test_no_isolate_wins_over_isolate_and_markers(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makeini("[pytest]\nisolate = true\n")
    pytester.makepyfile(test_nothing=NOTHING_ISOLATED)
    runpytest("--isolate", "--no-isolate").assert_outcomes(passed=3)


def test_disabling_the_plugin_runs_everything_here(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(test_nothing=NOTHING_ISOLATED)
    result = runpytest("-p", "no:isolate", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=3)
    # Its options are gone with it.
    gone = runpytest("-p", "no:isolate", "--isolate")
    assert gone.ret == pytest.ExitCode.USAGE_ERROR
    gone.stderr.fnmatch_lines(["*unrecognized arguments: --isolate*"])


def test_an_unknown_marker_option_is_a_usage_error(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        def test_fine():
            pass

        @pytest.mark.container(hostname="ok", bogus=1)
        def test_typo():
            pass
        """
    )
    result = runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: test_bad.py::test_typo: unknown option(s) bogus in @pytest.mark.container*"]
    )
    result.assert_outcomes()


def test_a_bad_option_value_is_a_usage_error(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.container(timeout=-1)
        def test_negative():
            pass
        """
    )
    result = runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: test_bad.py::test_negative: *timeout*-1*"])


def test_an_image_that_cannot_run_is_a_setup_error_naming_it(
    pytester: pytest.Pytester, runpytest: RunPytest
) -> None:
    pytester.makepyfile(
        test_image="""
        import os
        import pytest

        def test_in_default_image():
            pass

        @pytest.mark.container("host")
        def test_marker_picks_host():
            assert os.getpid() == 1

        @pytest.mark.container(False)
        def test_plain_still_runs():
            assert os.getpid() != 1
        """
    )
    result = runpytest("--isolate", "--isolate-image=example.invalid/absent:1", "-rA")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*_ ERROR at setup of test_in_default_image _*",
            "pytest-isolate: image 'example.invalid/absent:1' is not in the store*pytest-isolate build*",
        ]
    )
