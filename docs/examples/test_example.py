"""A tour of pytest-isolate: run it with ``pytest --isolate docs/examples``.

With ``--isolate`` every test here runs in its own fresh container of the host image: the host's
files, Python and packages at the same paths, copy-on-write, with its own pid, network, hostname
and IPC namespaces.
"""

import os
import socket
import subprocess
from pathlib import Path

import pytest

CALLS = []


@pytest.fixture(scope="module")
def expensive_resource():
    """Wider-scoped fixtures are set up once, in the pytest process, not once per container."""
    CALLS.append("setup")
    return {"answer": 42}


def test_runs_as_pid_1_with_its_own_hostname(expensive_resource):
    assert os.getpid() == 1
    assert socket.gethostname() == "isolate"
    assert expensive_resource["answer"] == 42


def test_sees_no_host_processes():
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    assert len(pids) < 5, pids


def test_writes_stay_in_the_container(tmp_path):
    Path("/etc/written-by-a-test").write_text("private\n")  # the host's /etc is untouched
    (tmp_path / "data.txt").write_text("tmp_path works too")
    assert Path("/etc/written-by-a-test").exists()


def test_only_loopback():
    assert os.listdir("/sys/class/net") == ["lo"]


@pytest.mark.container(hostname="build-box", env={"STAGE": "ci"}, timeout=30)
def test_marker_options():
    assert socket.gethostname() == "build-box"
    assert os.environ["STAGE"] == "ci"


@pytest.mark.container(image="images/tools.Dockerfile")
def test_in_an_image_built_from_a_dockerfile():
    """The image is built once per session (and cached across sessions) before this test."""
    out = subprocess.run(["greet"], capture_output=True, text=True, check=True).stdout
    assert out == "hello from the tools image\n"


@pytest.mark.container(False)
def test_opted_out_runs_on_the_host(expensive_resource):
    assert os.getpid() != 1
    assert CALLS == ["setup"]  # one setup for every containerized test of the module


@pytest.mark.container(hostname="service")
def test_drive_a_container_from_the_host(container):
    """The ``container`` fixture: a running container the test drives (the marker configures it)."""
    result = container.exec(["sh", "-c", "hostname && id -u"])
    assert result.stdout.split() == ["service", "0"]
    container.write_file("/srv/config.ini", "[app]\nmode = test\n")
    assert "mode = test" in container.exec(["cat", "/srv/config.ini"]).stdout
    assert "A /srv/config.ini" in [str(change) for change in container.diff()]
    assert not Path("/srv/config.ini").exists()  # nothing reached the host
    assert subprocess.run(["true"]).returncode == 0
