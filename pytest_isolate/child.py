"""What runs inside the container: the test's own phases, reported back one by one.

This is a fork of the pytest process, already inside the container. Wider-scoped fixtures
were set up by the parent before the fork, so their values are in memory here and are reused
as cached; only function-scoped fixtures are set up and torn down in the container. Each phase's
report is sent as soon as it exists, so a crash in ``call`` still leaves the ``setup`` report.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import sys
import warnings
from typing import Any

import pytest
from _pytest.runner import call_and_report

from pytest_isolate import wire


def _warning_dict(w: warnings.WarningMessage) -> dict[str, Any]:
    cat = w.category
    return {
        "message": str(w.message),
        "category": f"{cat.__module__}.{cat.__qualname__}",
        "filename": w.filename,
        "lineno": w.lineno,
    }


def run_item(item: pytest.Item, sock: socket.socket, basetemp: str | None) -> None:
    """Run setup, call and teardown of ``item`` and send each report; then ``done``."""
    config = item.config
    # A crash's Python traceback goes to fd 2, which capture points at this test's output.
    faulthandler.enable(file=2, all_threads=False)
    if basetemp:
        # The container's /tmp is fresh: the session's base temp dir must exist again here.
        os.makedirs(basetemp, exist_ok=True)

    def report(rep: pytest.TestReport) -> None:
        data = config.hook.pytest_report_to_serializable(config=config, report=rep)
        wire.send(sock, "report", report=data)

    with warnings.catch_warnings(record=True) as caught:
        rep = call_and_report(item, "setup", log=False)
        report(rep)
        if rep.passed and not config.getoption("setuponly", False):
            report(call_and_report(item, "call", log=False))
        # Only this item's own (function-scoped) state is torn down here: its parent node stays,
        # and the pytest process tears wider scopes down for the real next item.
        report(call_and_report(item, "teardown", log=False, nextitem=item.parent))
    for w in caught:
        wire.send(sock, "warning", **_warning_dict(w))
    wire.send(sock, "done")
    sys.stdout.flush()
    sys.stderr.flush()
