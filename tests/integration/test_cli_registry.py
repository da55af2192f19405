"""The exchange commands for real: ``python -m pytest_isolate pull|push|login|logout|save|load``
and ``build --cache-to/--cache-from``, between two stores in ``tmp_path`` and Debian's
``docker-registry`` on 127.0.0.1 (tests/registry_fixtures.py). Logins go to files in
``tmp_path`` (``PYTEST_ISOLATE_AUTH``, ``DOCKER_CONFIG``), never the user's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_build import BUSYBOX, needs_busybox
from tests.integration.test_cli_images import Result
from tests.registry_fixtures import RegistryServer

pytestmark = [needs_busybox, pytest.mark.rootless]

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "/bin/busybox cat /proc/sys/kernel/random/uuid > /made"]
COPY hello.txt /etc/hello.txt
CMD ["/bin/busybox", "cat", "/etc/hello.txt"]
"""

Cli = Callable[..., Result]


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """Login files of this test only."""
    return {
        "PYTEST_ISOLATE_AUTH": str(tmp_path / "auth.json"),
        "DOCKER_CONFIG": str(tmp_path / "docker"),
    }


def make_cli(tmp_path: Path, name: str, home: dict[str, str]) -> Cli:
    env = {
        **os.environ,
        **home,
        "PYTEST_ISOLATE_STORE": str(tmp_path / f"store-{name}"),
        "PYTEST_ISOLATE_STATE": str(tmp_path / f"state-{name}"),
    }

    def run(*args: str, stdin: str | None = None, cwd: Path | None = None) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest_isolate", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            cwd=cwd,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def here(tmp_path: Path, home: dict[str, str]) -> Cli:
    return make_cli(tmp_path, "here", home)


@pytest.fixture
def there(tmp_path: Path, home: dict[str, str]) -> Cli:
    """Another machine: an empty store."""
    return make_cli(tmp_path, "there", home)


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copy2(BUSYBOX, ctx / "busybox")
    (ctx / "hello.txt").write_text("hello over the registry\n")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    return ctx


def ok(result: Result) -> Result:
    assert result.code == 0, result.err
    return result


def test_push_then_pull_and_run_on_another_store(
    registry: RegistryServer, here: Cli, there: Cli, context: Path
) -> None:
    ok(here("build", "-q", "-t", "app:1", str(context)))
    remote = f"{registry.host}/team/app:1"
    pushed = ok(here("push", "app:1", remote))
    assert f"{registry.host}/team/app:1: digest: sha256:" in pushed.out
    assert pushed.out.count(": Pushed") == 3, pushed.out  # three layers, none there before

    # `run` pulls what the store lacks (policy `missing`); `--pull never` refuses to.
    refused = there("run", "--pull", "never", remote)
    assert refused.code == 125 and "is not in the store" in refused.err
    ran = ok(there("run", remote))
    assert ran.out == "hello over the registry\n"

    pulled = ok(there("pull", remote))
    assert pulled.out.count(": Already exists") == 3, pulled.out
    digest = pushed.out.split("digest: ")[1].split()[0]
    assert f"Digest: {digest}" in pulled.out
    # `push IMAGE DEST` does not tag DEST here (as podman and skopeo): compare by the source.
    ids = [
        ok(cli("images", "-q", "--no-trunc", ref)).out
        for cli, ref in ((here, "app:1"), (there, remote))
    ]
    assert ids[0] == ids[1] != ""
    # The second push finds every layer in the registry.
    assert ok(here("push", "app:1", remote)).out.count("Layer already exists") == 3


def test_login_is_checked_saved_and_removed(
    registry_basic: RegistryServer, here: Cli, context: Path, home: dict[str, str]
) -> None:
    host = registry_basic.host
    ok(here("build", "-q", "-t", f"{host}/app:1", str(context)))
    denied = here("push", f"{host}/app:1")
    assert denied.code == 1 and f"pytest-isolate login {host}" in denied.err

    wrong = here(
        "login", "-u", registry_basic.username or "", "--password-stdin", host, stdin="no\n"
    )
    assert wrong.code == 1
    assert not Path(home["PYTEST_ISOLATE_AUTH"]).exists(), "a refused login was saved"
    good = ok(
        here(
            "login",
            "-u",
            registry_basic.username or "",
            "--password-stdin",
            host,
            stdin=f"{registry_basic.password}\n",
        )
    )
    assert good.out.startswith("Login Succeeded")
    assert os.stat(home["PYTEST_ISOLATE_AUTH"]).st_mode & 0o077 == 0
    ok(here("push", f"{host}/app:1"))

    assert ok(here("logout", host)).out == f"Removing login credentials for {host}\n"
    assert ok(here("logout", host)).out == f"Not logged in to {host}\n"
    assert here("push", f"{host}/app:1").code == 1


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive", "oci-dir"])
def test_save_then_load_into_another_store(
    tmp_path: Path, here: Cli, there: Cli, context: Path, fmt: str
) -> None:
    ok(here("build", "-q", "-t", "app:1", str(context)))
    archive = tmp_path / f"app.{fmt}"
    ok(here("save", "--format", fmt, "-o", str(archive), "app:1"))
    loaded = ok(there("load", "-i", str(archive)))
    assert "Loaded image: " in loaded.out
    assert ok(there("run", "--pull", "never", "app:1")).out == "hello over the registry\n"
    ids = [ok(cli("images", "-q", "--no-trunc", "app:1")).out for cli in (here, there)]
    assert ids[0] == ids[1] != ""


def test_save_to_stdout_and_load_from_stdin(
    tmp_path: Path, here: Cli, there: Cli, context: Path, home: dict[str, str]
) -> None:
    ok(here("build", "-q", "-t", "app:1", str(context)))
    env = {**os.environ, **home}
    streamed = subprocess.run(
        f"{sys.executable} -m pytest_isolate save app:1 | "
        f"PYTEST_ISOLATE_STORE={tmp_path / 'store-there'} {sys.executable} -m pytest_isolate load",
        shell=True,
        capture_output=True,
        text=True,
        env={**env, "PYTEST_ISOLATE_STORE": str(tmp_path / "store-here")},
        timeout=120,
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "Loaded image: docker.io/library/app:1\n"
    assert ok(there("run", "--pull", "never", "app:1")).out == "hello over the registry\n"


def test_a_build_reuses_the_cache_another_store_pushed(
    registry: RegistryServer, here: Cli, there: Cli, context: Path
) -> None:
    cache = f"{registry.host}/team/cache:main"
    ok(here("build", "-q", "-t", "app:1", "--cache-to", cache, str(context)))
    first = ok(here("run", "app:1", "/bin/busybox", "cat", "/made")).out

    built = ok(
        there("build", "--progress", "plain", "-t", "app:1", "--cache-from", cache, str(context))
    )
    # COPY, RUN, COPY (steps 2-4) came from the registry: nothing ran here.
    assert {"#2 CACHED", "#3 CACHED", "#4 CACHED"} <= set(built.err.splitlines()), built.err
    # The RUN did not run again: its output is the one made in the first store.
    assert ok(there("run", "app:1", "/bin/busybox", "cat", "/made")).out == first

    # A cache reference that does not exist warns and builds.
    (context / "hello.txt").write_text("changed\n")
    cold = ok(there("build", "-q", "--cache-from", f"{registry.host}/team/none:x", str(context)))
    assert "WARNING: cache" in cold.err and "not used" in cold.err
