"""The ``container`` and ``container_factory`` fixtures, and the example suite of the docs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest

REPO = Path(__file__).resolve().parents[2]

DRIVES = """
    import os
    import pytest

    @pytest.mark.container(hostname="svc", env={"A": "1"})
    def test_exec_files_diff_spawn(container, tmp_path):
        assert os.getpid() != 1  # the test itself runs on the host
        r = container.exec(["sh", "-c", "hostname; echo $A; echo oops >&2; exit 4"])
        assert (r.exit_code, r.stdout, r.stderr) == (4, "svc\\n1\\n", "oops\\n")
        assert container.exec("cat", input="piped").stdout == "piped"
        container.write_file("/opt/hello.txt", "hi there")
        assert container.read_file("/opt/hello.txt") == b"hi there"
        container.exec("touch /etc/newfile && rm /etc/hostname.d 2>/dev/null; true", check=True)
        changes = [str(c) for c in container.diff()]
        assert "A /etc/newfile" in changes and "A /opt/hello.txt" in changes, changes
        assert not os.path.exists("/opt/hello.txt")
        h = container.spawn("echo started; sleep 0.2; echo done")
        assert h.wait(10).code == 0
        assert container.logs() == "started\\ndone\\n"
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "f").write_text("data")
        container.copy_in(tmp_path / "d", "/srv/d")
        assert container.exec("cat /srv/d/f").stdout == "data"
        container.copy_out("/srv/d", tmp_path / "back")
        assert (tmp_path / "back" / "f").read_text() == "data"
        with pytest.raises(AssertionError, match="exited with code 3"):
            container.exec("exit 3", check=True)

    def test_commit_then_run_the_new_image(container, pytestconfig):
        from pytest_isolate.fixtures import start_container
        container.exec("echo saved > /srv/state && rm /etc/motd", check=True)
        image_id = container.commit("committed:latest", changes=["ENV FROM_COMMIT=1"])
        assert image_id.startswith("sha256:")
        with start_container(pytestconfig, image="committed:latest") as again:
            r = again.exec("cat /srv/state; echo $FROM_COMMIT; test -e /etc/motd || echo gone")
            assert r.stdout == "saved\\n1\\ngone\\n", r.stderr

    def test_factory(container_factory):
        a = container_factory(hostname="a")
        b = container_factory(hostname="b")
        assert a.exec("hostname").stdout == "a\\n"
        assert b.exec("hostname").stdout == "b\\n"
        a.exec("echo only-a > /tmp/x")
        assert b.exec("cat /tmp/x").exit_code != 0
"""


@pytest.mark.rootless
def test_the_fixtures_drive_running_containers(runpytest: RunPytest, pytester) -> None:
    pytester.makepyfile(test_drive=DRIVES)
    pytester._monkeypatch.setenv("PYTEST_ISOLATE_STORE", str(pytester.path / "store"))
    result = runpytest("--isolate", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_docs_example_suite_passes(tmp_path: Path) -> None:
    """The README's main-job command runs this suite: keep it green."""
    env = {**os.environ, "PYTEST_ISOLATE_STORE": str(tmp_path / "store")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--isolate",
            "docs/examples",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 passed" in result.stdout
    assert "building" in result.stdout and "tools.Dockerfile" in result.stdout
