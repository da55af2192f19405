"""Dockerfile images in the marker: built once per session (and per content), failures as
errors of every test that needs the image, the fixture on an image, xdist workers sharing it."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.plugin.conftest import RunPytest

BUSYBOX = shutil.which("busybox") or "/bin/busybox"

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV GREETING=hello-from-image
RUN echo built >> /etc/marker
"""

TESTS = """
    import os, subprocess
    import pytest

    IMAGE = pytest.mark.container(image="img")

    @IMAGE
    def test_runs_in_the_image():
        assert open("/etc/marker").read() == "built\\n"   # RUN ran once, at build time
        assert os.environ["GREETING"] == "hello-from-image"
        assert not os.path.exists("/etc/os-release")       # scratch, not the host
        out = subprocess.run(["sh", "-c", "echo $GREETING"], capture_output=True, text=True)
        assert out.stdout == "hello-from-image\\n"

    @IMAGE
    def test_again_same_image():
        assert os.getpid() == 1

    @pytest.mark.container(image="broken")
    def test_broken_1():
        pass

    @pytest.mark.container(image="broken")
    def test_broken_2():
        pass

    @pytest.mark.container(image="missing/Dockerfile")
    def test_missing():
        pass

    @IMAGE
    def test_fixture_on_the_image(container):
        assert container.exec("cat /etc/marker").stdout == "built\\n"
        container.exec("touch /made-here", check=True)
        # Only what the test did: not /proc, /dev, /etc/hosts... that the engine mounted.
        assert [str(c) for c in container.diff()] == ["A /made-here"]

    def test_plain_after_all():
        pass
"""


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path_factory: pytest.TempPathFactory) -> pytest.Pytester:
    if not shutil.os.path.exists(BUSYBOX):  # type: ignore[attr-defined]
        pytest.skip("needs a static busybox (Debian: apt-get install busybox-static)")
    img = pytester.mkdir("img")
    (img / "Dockerfile").write_text(DOCKERFILE)
    shutil.copy(BUSYBOX, img / "busybox")
    broken = pytester.mkdir("broken")
    (broken / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "false"]\n'
    )
    shutil.copy(BUSYBOX, broken / "busybox")
    pytester.makepyfile(test_images=TESTS)
    store = tmp_path_factory.mktemp("store")
    pytester._monkeypatch.setenv("PYTEST_ISOLATE_STORE", str(store))
    return pytester


@pytest.mark.rootless
def test_images_build_once_and_failures_are_errors_of_their_tests(
    project: pytest.Pytester, runpytest: RunPytest
) -> None:
    result = runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=4, errors=3)
    out = result.stdout.str()
    builds = [
        line
        for line in out.splitlines()
        if line.startswith("pytest-isolate: building") and line.endswith("Dockerfile")
    ]
    assert len(builds) == 2, builds  # img and broken, once each for the whole session
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_broken_1*",
            "*broken/Dockerfile failed*RUN*exited with code 1*",
            "*ERROR at setup of test_broken_2*",
            "*broken/Dockerfile failed*RUN*exited with code 1*",
            "*ERROR at setup of test_missing*",
            "*no such Dockerfile*",
        ]
    )
    # A second session reuses the store's layer cache: every step is cached.
    again = runpytest("-p", "no:cacheprovider", "-k", "runs_in_the_image")
    again.assert_outcomes(passed=1)
    assert "CACHED" in again.stdout.str()


def test_xdist_workers_share_the_image(project: pytest.Pytester, runpytest: RunPytest) -> None:
    result = runpytest("-p", "no:cacheprovider", "-n", "2", "-k", "runs_in or again or fixture")
    result.assert_outcomes(passed=3)
