"""Sessions of the plugin driven end to end with pytester, in subprocess mode only.

The plugin forks the pytest process for every isolated test, so the inner session must be a
process of its own: an in-process ``pytester.runpytest`` would fork the outer test run.

Every test here starts real containers. A host that cannot run them skips the whole directory
with the reason the engine itself would give (the same :meth:`runtime.Engine.check_host` the
plugin calls), so a skip here and a failure of a user's run never disagree.

``pytester`` is loaded by ``pytest_plugins`` in the top-level ``tests/conftest.py``: pytest
refuses that variable in a conftest below the root.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import pytest

from runtime import Engine
from runtime.errors import UnsupportedHostError

SUBPROCESS_TIMEOUT = 120.0
"""Seconds one inner pytest run may take before pytester kills it (a hang is a failure)."""

RunPytest = Callable[..., pytest.RunResult]


@functools.cache
def host_refusal() -> str | None:
    """Why this host cannot run the plugin's containers, or None when it can."""
    try:
        Engine().check_host(userns=os.geteuid() != 0)
    except UnsupportedHostError as e:
        return str(e)
    return None


@pytest.fixture(autouse=True)
def _needs_containers() -> None:
    reason = host_refusal()
    if reason is not None:
        pytest.skip(f"containers cannot run here: {reason}")


@pytest.fixture
def runpytest(pytester: pytest.Pytester) -> RunPytest:
    """``pytester.runpytest_subprocess`` with a timeout, so a stuck container fails the test."""

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(*args, timeout=SUBPROCESS_TIMEOUT)

    return run
