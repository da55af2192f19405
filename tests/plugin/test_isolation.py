"""Inside the container the test really is alone: its own PID 1, hostname, processes, network
and root filesystem; and a host that cannot run containers fails or skips as asked.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest


INSIDE = """
    import os
    import socket

    PROBE = {probe!r}

    def test_is_pid_one():
        assert os.getpid() == 1

    def test_has_its_own_hostname():
        assert socket.gethostname() == "isolate"

    def test_sees_no_host_process():
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        assert pids[0] == 1 and len(pids) <= 3, pids

    def test_has_only_loopback():
        assert os.listdir("/sys/class/net") == ["lo"]
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=5) as client:
                peer, _ = server.accept()
                with peer:
                    client.sendall(b"ping")
                    assert peer.recv(4) == b"ping"

    def test_writes_to_etc_stay_inside():
        with open(PROBE, "w") as f:
            f.write("written inside")
        with open(PROBE) as f:
            assert f.read() == "written inside"

    def test_tmp_path_works(tmp_path):
        (tmp_path / "data.txt").write_text("kept")
        assert (tmp_path / "data.txt").read_text() == "kept"
"""


@pytest.mark.rootless
def test_a_containerized_test_is_alone(pytester: pytest.Pytester, runpytest: RunPytest) -> None:
    probe = Path(f"/etc/pytest-isolate-probe-{uuid.uuid4().hex[:12]}")
    assert not probe.exists()
    host_pids = [p for p in os.listdir("/proc") if p.isdigit()]
    assert len(host_pids) > 3  # else "no host process visible" would prove nothing
    pytester.makepyfile(test_inside=INSIDE.format(probe=str(probe)))
    try:
        result = runpytest("--isolate", "-v")
        result.assert_outcomes(passed=6)
        assert not probe.exists(), f"{probe} written in the container reached the host"
    finally:
        probe.unlink(missing_ok=True)


# --- a host that cannot run containers ---------------------------------------------------------

UNSUPPORTED = """
    import os
    import pytest

    def test_needs_a_container():
        assert os.getpid() == 1

    @pytest.mark.container(False)
    def test_plain():
        assert os.getpid() != 1
"""


def _run_without_overlayfs(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run the inner pytest where the kernel seems to lack overlayfs.

    A private mount namespace gets a copy of ``/proc/filesystems`` without ``overlay``
    bound over the real one: the engine's probe reads that file, so the inner session meets
    exactly what a kernel without overlayfs shows, and the host is untouched.
    """
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare(1) and mount(1) from util-linux")
    real = Path("/proc/filesystems").read_text().splitlines()
    fake = pytester.path / "filesystems"
    fake.write_text("".join(line + "\n" for line in real if line.split()[-1] != "overlay"))
    script = 'mount --bind "$0" /proc/filesystems && exec "$@"'
    return pytester.run(
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        str(fake),
        sys.executable,
        "-m",
        "pytest",
        f"--basetemp={pytester.path / 'basetemp'}",
        *args,
        timeout=120,
    )


@pytest.mark.needs_root
def test_unsupported_host_fails_the_run_by_default(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_unsupported=UNSUPPORTED)
    result = _run_without_overlayfs(pytester, "--isolate")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: pytest-isolate cannot run containers here: overlayfs is not available*"]
    )


@pytest.mark.needs_root
def test_unsupported_host_can_skip_isolated_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_unsupported=UNSUPPORTED)
    result = _run_without_overlayfs(pytester, "--isolate", "--isolate-unsupported=skip", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED [[]1[]] test_unsupported.py*: pytest-isolate: overlayfs is not available*"]
    )


@pytest.mark.needs_root
def test_unsupported_host_skip_from_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nisolate = true\nisolate_unsupported = skip\n")
    pytester.makepyfile(test_unsupported=UNSUPPORTED)
    _run_without_overlayfs(pytester).assert_outcomes(passed=1, skipped=1)
