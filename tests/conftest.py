"""Test-wide probes turned into markers: a host that cannot do a thing skips with the reason."""

from __future__ import annotations

import pytest

from runtime import probe

pytest_plugins = ["pytester", "tests.registry_fixtures"]  # pytester: tests/plugin sessions

_PROBES = {
    "needs_root": lambda: probe.Probe(probe.is_root(), "needs real root (uid 0)"),
    "needs_userns": probe.user_namespaces,
    "needs_overlay": probe.overlayfs,
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for name, check in _PROBES.items():
        if item.get_closest_marker(name) is not None:
            answer = check()
            if not answer:
                pytest.skip(f"{name}: {answer.reason}")
