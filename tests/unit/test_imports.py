"""What importing a part of the project imports: the layering, and start-up cost, as promises.

Run in a fresh interpreter each, since this one has imported everything already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = (
    "pytest_isolate.session",
    "runtime.engine",
    "runtime.launch",
    "runtime.image.store",
    "runtime.image.images",
    "runtime.build.builder",
)


def imported_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_pytest_plugin_imports_no_engine_until_a_test_needs_one() -> None:
    # pytest loads the plugin into every session of the environment, isolating or not.
    loaded = imported_by("import pytest_isolate.plugin")
    assert not loaded & set(HEAVY)


@pytest.mark.parametrize("module", ["runtime", "runtime.engine", "runtime.build.builder"])
def test_the_engine_never_imports_pytest(module: str) -> None:
    assert "pytest" not in imported_by(f"import {module}")
