"""With pytest-xdist each worker runs its tests in containers; reports reach the controller."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest


SPREAD = """
    import os
    import socket
    import pytest

    @pytest.mark.parametrize("n", range(6))
    def test_alone(n):
        assert os.getpid() == 1
        assert socket.gethostname() == "isolate"

    def test_crashes():
        os._exit(9)

    def test_fails_with_diff():
        assert [1, 2, 3] == [1, 2, 4]
"""


@pytest.mark.rootless
def test_workers_run_tests_in_containers(pytester: pytest.Pytester, runpytest: RunPytest) -> None:
    pytester.makepyfile(test_spread=SPREAD)
    result = runpytest("-n", "2", "--isolate", "-v")
    result.assert_outcomes(passed=6, failed=2)
    result.stdout.fnmatch_lines(["created: 2/2 workers", "2 workers [[]8 items[]]"])
    # Reports came from both workers, so both ran containers.
    result.stdout.fnmatch_lines(["*[[]gw0[]]*PASSED*test_alone*"], consecutive=False)
    result.stdout.fnmatch_lines(["*[[]gw1[]]*PASSED*test_alone*"], consecutive=False)
    # A container that died is the test's failure; the worker lives on.
    result.stdout.fnmatch_lines(["*crashed during call: exited with code 9*"])
    result.stdout.no_fnmatch_line("*worker*crashed*")
    result.stdout.no_fnmatch_line("*replacing crashed worker*")
    result.stdout.fnmatch_lines(["E * At index 2 diff: 3 != 4"])
