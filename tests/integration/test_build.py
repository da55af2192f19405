"""Real builds: scratch images with a static busybox, host-based images, multi-stage builds, the
layer cache (hits and misses), eight concurrent builds, a build killed mid-RUN, failures.

Contexts live in ``build_fixtures/``; each test copies one to ``tmp_path`` and adds the host's
static busybox (``apt-get install busybox-static``).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.build.builder import BuildEvent, BuildOptions, BuildResult, build
from runtime.engine import Engine
from runtime.errors import BuildError
from runtime.image import layer
from runtime.image.images import LayeredView, resolve_image
from runtime.image.store import PACKED_AGAIN, Store
from runtime.spec import ContainerSpec
from tests.integration import debian_repo

FIXTURES = Path(__file__).parent / "build_fixtures"
REPO = Path(__file__).resolve().parents[2]
BUSYBOX = Path("/bin/busybox")


def _is_static_elf(path: Path) -> bool:
    """An ELF executable without a program interpreter runs in an empty root filesystem."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only, enough for CI
        return False
    phoff = int.from_bytes(data[32:40], "little")
    size, count = int.from_bytes(data[54:56], "little"), int.from_bytes(data[56:58], "little")
    return all(
        int.from_bytes(data[phoff + i * size : phoff + i * size + 4], "little") != 3  # PT_INTERP
        for i in range(count)
    )


needs_busybox = pytest.mark.skipif(
    not _is_static_elf(BUSYBOX),
    reason="needs a static /bin/busybox (apt-get install busybox-static)",
)


def context(tmp_path: Path, name: str) -> Path:
    """A private copy of ``build_fixtures/<name>`` with busybox added."""
    dest = tmp_path / f"ctx-{name}"
    shutil.copytree(FIXTURES / name, dest)
    if _is_static_elf(BUSYBOX):
        shutil.copy2(BUSYBOX, dest / "busybox")
    return dest


class Events:
    def __init__(self) -> None:
        self.events: list[BuildEvent] = []

    def __call__(self, event: BuildEvent) -> None:
        self.events.append(event)

    def output(self) -> list[str]:
        return [e.text for e in self.events if e.kind == "output"]


def do_build(store: Store, engine: Engine, ctx: Path, **options: object) -> BuildResult:
    return build(BuildOptions(context=ctx, **options), store=store, engine=engine)  # type: ignore[arg-type]


def ran(result: BuildResult) -> list[str]:
    """The steps that made a layer in this build (the cache did not have them)."""
    return [s.instruction for s in result.steps if s.diff_id is not None and not s.cached]


def run_image(engine: Engine, store: Store, ref: str, *argv: str) -> tuple[int, str]:
    image = resolve_image(store, ref)
    command = argv or image.argv()
    assert command is not None
    spec = ContainerSpec(image.rootfs, argv=command, env=image.env, cwd=image.cwd)
    out = io.BytesIO()
    r, w = os.pipe()
    try:
        status = engine.run(spec, stdio=(None, w, w))
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out.write(f.read())
    return status.exit_code, out.getvalue().decode()


def image_view(store: Store, ref: str) -> LayeredView:
    layers = [str(rec.path) for rec in reversed(store.image_layers(ref))]
    return LayeredView(layers, rootless=os.geteuid() != 0)


def layer_paths(store: Store, result: BuildResult) -> set[str]:
    found = set()
    for diff_id in result.config.diff_ids:
        base = store.get_layer(diff_id).path
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                found.add(os.path.relpath(os.path.join(dirpath, name), base))
    return found


# --- images ------------------------------------------------------------------------------------


@needs_busybox
@pytest.mark.rootless
def test_scratch_image_with_busybox(tmp_path: Path, store: Store, engine: Engine) -> None:
    events = Events()
    result = do_build(
        store, engine, context(tmp_path, "scratch"), tags=("scratchy:1",), progress=events
    )
    assert result.tags == ("docker.io/library/scratchy:1",)

    code, out = run_image(engine, store, "scratchy:1")
    assert (code, out) == (0, "hello world\n")
    code, out = run_image(
        engine, store, "scratchy:1", "sh", "-c", "stat -c %a data.txt; cat heredoc.txt; ls /bin/vi"
    )
    assert out.splitlines()[:2] == ["750", "made by hello"]
    assert code != 0, "the file the RUN removed came back"

    c = result.config.container
    assert c.env_map == {"GREETING": "hello", "PATH": "/bin"}
    assert (c.working_dir, c.cmd, c.exposed_ports) == (
        "/app",
        ("cat", "/app/greeting"),
        ("8080/tcp",),
    )
    assert c.labels == {"org.example.kind": "test"}
    history = result.config.history or ()
    assert [h.empty_layer for h in history] == [
        None,
        None,
        True,
        True,
        None,
        None,
        None,
        True,
        True,
        True,
    ]
    assert (
        history[4].created_by
        == 'RUN |1 WHO=world /bin/sh -c echo "$GREETING $WHO" > greeting && rm /bin/vi'
    )

    # The RUN layers hold what the commands wrote, not the mount points the engine made.
    assert not {"etc", "etc/hostname", "proc", "sys", "dev"} & layer_paths(store, result)
    # Every diff id is the digest of its stored directory packed again.
    for diff_id in result.config.diff_ids:
        path = store.get_layer(diff_id).path
        assert layer.layer_digest(path, rootless=os.geteuid() != 0)[0] == diff_id

    kinds = [e.kind for e in events.events if e.step == 5]
    assert kinds[0] == "step" and kinds[-1] == "done"
    assert store.fsck() == []


@pytest.mark.rootless
def test_host_based_image(tmp_path: Path, store: Store, engine: Engine) -> None:
    result = do_build(store, engine, context(tmp_path, "host"), tags=("on-host",))
    image = resolve_image(store, "on-host")
    assert image.rootfs.host and len(image.rootfs.lowers) == 2
    assert result.config.container.labels == {"io.pytest-isolate.base": "host"}

    code, out = run_image(engine, store, "on-host")
    assert (code, out) == (0, "from-run\nfrom-copy\n")
    code, out = run_image(
        engine,
        store,
        "on-host",
        "sh",
        "-c",
        "test -e /etc/os-release || echo gone; test -x /usr/bin/env && echo host",
    )
    assert (code, out) == (0, "gone\nhost\n")
    # As root the root is one overlay over a read-only overlay of "/"; rootless it is split
    # per top-level directory. Either way the store's layers are not shown.
    script = (
        f"test -e {image.rootfs.lowers[0]} && echo shown; awk '$5 == \"/etc\"' /proc/self/mountinfo"
    )
    code, out = run_image(engine, store, "on-host", "sh", "-c", script)
    assert code == 0 and "shown" not in out
    assert (" overlay " in out) == (os.geteuid() != 0)


@needs_busybox
@pytest.mark.rootless
def test_multi_stage_builds_only_the_stages_the_target_needs(
    tmp_path: Path, store: Store, engine: Engine
) -> None:
    ctx = context(tmp_path, "multistage")
    result = do_build(store, engine, ctx, tags=("final",))
    assert {s.stage for s in result.steps} == {"base", "builder", "stage-3"}
    view = image_view(store, "final")
    assert view.read_text("/out/artifact") == "built 1\n"
    assert view.lookup("/bin/busybox") is not None
    assert layer_paths(store, result) == {"out", "out/artifact", "bin", "bin/busybox"}

    builder = do_build(store, engine, ctx, target="builder", build_args={"VERSION": "2"})
    assert {s.stage for s in builder.steps} == {"base", "builder"}
    assert ran(builder) == ['RUN echo "built $VERSION" > /artifact']
    assert image_view(store, builder.image_id).read_text("/artifact") == "built 2\n"

    with pytest.raises(BuildError, match="exit code 7"):
        do_build(store, engine, ctx, target="unused")


@needs_busybox
@pytest.mark.rootless
def test_heredocs_mounts_onbuild_and_metadata(tmp_path: Path, store: Store, engine: Engine) -> None:
    ctx = context(tmp_path, "features")
    token = tmp_path / "token"
    token.write_text("s3cret")
    events = Events()
    result = do_build(store, engine, ctx, secrets={"token": token}, progress=events)
    assert any("syntax=docker/dockerfile:1" in e.text for e in events.events if e.kind == "warning")

    view = image_view(store, result.image_id)
    assert view.read_text("/onbuild") == "triggered\n"
    assert view.read_text("/heredoc") == "from heredoc\n"
    assert view.read_text("/script").startswith("script /dev/pipes/")
    assert view.read_text("/cat-heredoc") == "inline\n"
    assert view.read_text("/from-bind") == "from the context\n"
    assert view.read_text("/cache-count") == "1\n"
    assert view.read_text("/secret-copy") == "s3cret"
    paths = layer_paths(store, result)
    assert not {"mnt", "tmp", "run", "cache", "dev"} & {p.split("/")[0] for p in paths}

    c = result.config.container
    assert (c.entrypoint, c.cmd) == (("/bin/echo",), None), "ENTRYPOINT resets an inherited CMD"
    assert c.shell == ("/bin/sh", "-e", "-c") and c.on_build is None
    assert c.healthcheck is not None and c.healthcheck.test == ("CMD-SHELL", "true")
    assert c.healthcheck.interval == 5_000_000_000
    assert (c.stop_signal, c.volumes, c.user) == ("SIGTERM", ("/data",), "1000:1000")
    assert result.config.author == "someone"

    assert ran(do_build(store, engine, ctx, secrets={"token": token})) == []
    again = do_build(store, engine, ctx, secrets={"token": token}, no_cache=True)
    assert image_view(store, again.image_id).read_text("/cache-count") == "2\n"
    with pytest.raises(BuildError, match="secret 'token' is required"):
        (ctx / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN --mount=type=secret,id=token,required ["/bin/busybox", "true"]\n'
        )
        do_build(store, engine, ctx)


# --- the cache ---------------------------------------------------------------------------------


@needs_busybox
@pytest.mark.rootless
def test_cache_hits_and_misses(tmp_path: Path, store: Store, engine: Engine) -> None:
    ctx = context(tmp_path, "cache")
    copy_app, run = "COPY app /app/", 'RUN ["/bin/busybox", "sh", "-c", "echo $MODE > /mode"]'
    first = do_build(store, engine, ctx)
    assert ran(first) == ["COPY busybox /bin/busybox", copy_app, run]

    again = do_build(store, engine, ctx)
    assert ran(again) == [] and again.image_id == first.image_id

    os.utime(ctx / "app" / "a.txt", (1, 1))  # mtimes are not content
    (ctx / "notes.log").write_text("ignored by .dockerignore")
    assert ran(do_build(store, engine, ctx)) == []

    (ctx / "app" / "a.txt").write_text("changed")
    assert ran(do_build(store, engine, ctx)) == [copy_app, run]
    assert ran(do_build(store, engine, ctx)) == []

    (ctx / "app" / "b.txt").chmod(0o600)
    assert ran(do_build(store, engine, ctx)) == [copy_app, run]

    two = do_build(store, engine, ctx, build_args={"MODE": "two"})
    assert ran(two) == [run]
    assert image_view(store, two.image_id).read_text("/mode") == "two\n"
    assert ran(do_build(store, engine, ctx, build_args={"MODE": "one"})) == []

    forced = do_build(store, engine, ctx, no_cache=True)
    assert ran(forced) == ["COPY busybox /bin/busybox", copy_app, run]
    assert ran(do_build(store, engine, ctx)) == []  # the forced build refreshed the cache
    assert store.fsck() == []


@needs_busybox
@pytest.mark.rootless
def test_a_changed_base_image_misses_and_no_cache_filter_picks_stages(
    tmp_path: Path, store: Store, engine: Engine
) -> None:
    base_ctx = context(tmp_path, "cache")
    base = do_build(store, engine, base_ctx, tags=("base:latest",))
    ctx = tmp_path / "child"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        'FROM base AS first\nSHELL ["/bin/busybox", "sh", "-c"]\nRUN cat /mode > /copied\n'
        "FROM first AS second\nRUN echo second > /second\n"
    )
    assert ran(do_build(store, engine, ctx)) == [
        "RUN cat /mode > /copied",
        "RUN echo second > /second",
    ]
    assert ran(do_build(store, engine, ctx)) == []
    only_second = do_build(store, engine, ctx, no_cache_filter=("second",))
    assert ran(only_second) == ["RUN echo second > /second"]

    rebuilt = do_build(store, engine, base_ctx, tags=("base:latest",), build_args={"MODE": "new"})
    assert rebuilt.image_id != base.image_id
    child = do_build(store, engine, ctx)
    assert ran(child) == ["RUN cat /mode > /copied", "RUN echo second > /second"]
    assert image_view(store, child.image_id).read_text("/copied") == "new\n"


# --- sources -----------------------------------------------------------------------------------


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@needs_busybox
@pytest.mark.rootless
def test_copy_and_add_sources(tmp_path: Path, store: Store, engine: Engine) -> None:
    ctx = context(tmp_path, "sources")
    with tarfile.open(ctx / "archive.tar.gz", "w:gz") as tar:
        for name, data in (("top.txt", b"top\n"), ("deep/inner.txt", b"inner\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid = len(data), 0o640, 42
            tar.addfile(info, io.BytesIO(data))
    served = tmp_path / "www"
    served.mkdir()
    (served / "remote.txt").write_text("remote\n")
    with http_server(served) as url:
        result = do_build(store, engine, ctx, build_args={"URL": f"{url}/remote.txt"})
    view = image_view(store, result.image_id)
    assert view.listdir("/texts") == ["a.txt", "b.txt"]
    assert view.read_text("/copied-sub/c.md") == "C\n"
    assert view.read_text("/unpacked/deep/inner.txt") == "inner\n"
    assert view.read_text("/downloaded/remote.txt") == "remote\n"
    downloaded = view.lookup("/downloaded/remote.txt")
    assert downloaded is not None and downloaded.st.st_mode & 0o777 == 0o600
    owned = view.lookup("/owned/a.txt")
    unpacked = view.lookup("/unpacked/top.txt")
    assert owned is not None and unpacked is not None
    if os.geteuid() == 0:  # rootless layers cannot keep other owners
        assert (owned.st.st_uid, owned.st.st_gid) == (1234, 5678)
        assert unpacked.st.st_uid == 42 and unpacked.st.st_mode & 0o777 == 0o640

    with pytest.raises(BuildError, match=r"Dockerfile:4: COPY \*\.txt /texts/: .*no file"):
        for name in ("a.txt", "b.txt"):
            (ctx / name).unlink()
        do_build(store, engine, ctx, build_args={"URL": "http://127.0.0.1:1/x"})


@pytest.mark.rootless
def test_a_built_layer_is_fingerprinted_by_its_diff_id_and_fsck_packs_it_again(
    tmp_path: Path, store: Store, engine: Engine
) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "data").mkdir(parents=True)
    (ctx / "data" / "a.txt").write_text("a\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY data/ /data/\n")
    result = do_build(store, engine, ctx)
    [diff_id] = result.config.diff_ids
    record = store.get_layer(diff_id)
    rootless = os.geteuid() != 0
    # The diff id is the fingerprint: no pass over the files was spent on another digest.
    assert record.content_algorithm == PACKED_AGAIN[rootless].name
    assert record.content_digest == diff_id
    assert store.fsck() == []
    (record.path / "data" / "a.txt").write_text("b\n")
    [problem] = store.fsck()
    assert (problem.kind, problem.subject) == ("layer", diff_id)
    assert f"content changed: {PACKED_AGAIN[rootless].name} digest" in problem.detail


# --- failures and interruptions ----------------------------------------------------------------


@needs_busybox
@pytest.mark.rootless
def test_a_failed_run_names_the_line_the_exit_code_and_the_output(
    tmp_path: Path, store: Store, engine: Engine
) -> None:
    ctx = context(tmp_path, "cache")
    (ctx / "Dockerfile").write_text(
        "FROM scratch\nCOPY busybox /bin/busybox\n"
        'RUN ["/bin/busybox", "sh", "-c", "echo first; echo last words >&2; exit 3"]\n'
    )
    with pytest.raises(BuildError) as info:
        do_build(store, engine, ctx)
    message = str(info.value)
    assert f"{ctx / 'Dockerfile'}:3: RUN [" in message
    assert "exit code 3" in message
    assert "| first\n  | last words" in message
    layers = os.listdir(store.root / "layers" / "sha256")
    assert len(layers) == 1, "only the COPY layer may be stored"

    (ctx / "Dockerfile").write_text("FROM scratch\nRUN true\n")
    with pytest.raises(BuildError, match=r"Dockerfile:2: RUN true: .*empty"):
        do_build(store, engine, ctx)
    (ctx / "Dockerfile").write_text("FROM missing-image:1\n")
    with pytest.raises(BuildError, match=r"pytest-isolate import ROOTFS\.tar missing-image:1"):
        do_build(store, engine, ctx, pull="never")


class Counter:
    """A loopback server counting the RUNs that report to it; ``hold`` keeps them waiting."""

    def __init__(self, hold: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.count = 0
        self.hold = hold
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            if self.hold:
                self.held.append(conn)
            else:
                with conn:
                    conn.recv(64)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        self.sock.close()
        self.thread.join()


BUILD_SCRIPT = """
import json, sys
from pathlib import Path
from runtime.build.builder import BuildOptions, build
from runtime.engine import Engine
from runtime.image.store import Store

store, ctx, state, port = sys.argv[1:5]
def progress(event):
    if event.kind == "output":
        print("OUT " + event.text, flush=True)
result = build(
    BuildOptions(context=Path(ctx), build_args={"PORT": port}, progress=progress),
    store=Store(store),
    engine=Engine(state_root=Path(state)),
)
print("RESULT " + json.dumps({
    "image": result.image_id,
    "ran": [s.instruction for s in result.steps if s.diff_id and not s.cached],
}), flush=True)
"""


def spawn_build(store: Store, ctx: Path, state: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", BUILD_SCRIPT, str(store.root), str(ctx), str(state), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )


@needs_busybox
@pytest.mark.rootless
def test_eight_concurrent_builds_make_each_layer_once(
    tmp_path: Path, store: Store, engine: Engine
) -> None:
    ctx = context(tmp_path, "concurrent")
    counter = Counter()
    try:
        procs = [spawn_build(store, ctx, tmp_path / f"state{i}", counter.port) for i in range(8)]
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        counter.close()
    results = []
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    assert len({r["image"] for r in results}) == 1
    runs = [step for r in results for step in r["ran"]]
    assert sorted(runs) == sorted(
        [
            "COPY busybox /bin/busybox",
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]',
            "RUN echo ran | nc 127.0.0.1 $PORT; seq 1 1000 > /numbers",
            "COPY Dockerfile /",
        ]
    ), "each layer is made by exactly one of the builds"
    assert counter.count == 1, "the reporting RUN executed once"
    assert store.fsck() == []


@needs_busybox
@pytest.mark.rootless
def test_a_build_killed_mid_run_leaves_no_partial_layer(
    tmp_path: Path, store: Store, engine: Engine
) -> None:
    ctx = context(tmp_path, "concurrent")
    held = Counter(hold=True)
    try:
        proc = spawn_build(store, ctx, tmp_path / "state-killed", held.port)
        deadline = time.monotonic() + 30
        while held.count == 0:  # the RUN is connected and waits for the server
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the RUN never started"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        held.close()
    assert store.fsck() == []
    layers_before = set(os.listdir(store.root / "layers" / "sha256"))
    assert len(layers_before) == 2, (
        "the COPY and the first RUN finished; the killed one is not there"
    )
    assert os.listdir(store.root / "tmp"), "the killed RUN's work is left in tmp/ for the sweeper"

    counter = Counter()
    try:
        result = do_build(store, engine, ctx, build_args={"PORT": str(counter.port)})
    finally:
        counter.close()
    assert ran(result) == [
        "RUN echo ran | nc 127.0.0.1 $PORT; seq 1 1000 > /numbers",
        "COPY Dockerfile /",
    ]
    assert counter.count == 1
    report = store.prune()
    assert report.tmp, "prune swept the dead build's work"
    assert store.fsck() == []


# --- a real distribution -----------------------------------------------------------------------

DEBIAN_TARBALL = os.environ.get("PYTEST_ISOLATE_DEBIAN_TARBALL")
"""A root filesystem tarball of ``mmdebstrap --variant=minbase bookworm``; ``.ci/run`` makes it."""

APT = "apt-get -o Acquire::http::Proxy=false -o Acquire::Retries=0"
"""apt without a proxy (a proxy in the environment would take 127.0.0.1 off the host) and
without retries (a refused connection fails at once)."""

GREETING = b"hello from the loopback repository\n"
PACKAGES = (
    debian_repo.DebPackage("pi-data", "1.0", {"/usr/share/pi-data/greeting.txt": GREETING}),
    debian_repo.DebPackage(
        "pi-greet",
        "1.0",
        {"/usr/bin/pi-greet": b"#!/bin/sh\nexec cat /usr/share/pi-data/greeting.txt\n"},
        depends=("pi-data (>= 1.0)",),
    ),
)


@pytest.mark.skipif(
    not DEBIAN_TARBALL,
    reason="set PYTEST_ISOLATE_DEBIAN_TARBALL to a root filesystem tarball made by "
    "`mmdebstrap --variant=minbase bookworm debian.tar` to build a real Debian image "
    "(.ci/run makes one)",
)
@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (part of dpkg)")
@pytest.mark.rootless
def test_debian_apt_get_install_over_the_default_network(
    tmp_path: Path, store: Store, engine: Engine
) -> None:
    """``RUN apt-get install`` on the default (host) network, from a repository on loopback;
    ``RUN --network=none`` cannot reach it."""
    from runtime.image.importer import import_rootfs

    assert DEBIAN_TARBALL is not None
    tarball = Path(DEBIAN_TARBALL)
    if not (tarball.is_file() and os.access(tarball, os.R_OK)):
        pytest.fail(f"PYTEST_ISOLATE_DEBIAN_TARBALL={tarball}: not a readable file", pytrace=False)
    import_rootfs(store, tarball, "debian:bookworm")
    repo = debian_repo.make_repo(tmp_path / "apt", PACKAGES)
    ctx = tmp_path / "ctx"
    ctx.mkdir()

    with debian_repo.serve(repo) as served:
        (ctx / "Dockerfile").write_text(
            "FROM debian:bookworm\n"
            "ARG REPO\n"
            'RUN echo "deb [trusted=yes] $REPO ./" > /etc/apt/sources.list '
            "&& rm -f /etc/apt/sources.list.d/* "
            f"&& {APT} update && {APT} install -y --no-install-recommends pi-greet\n"
            'CMD ["/usr/bin/pi-greet"]\n'
        )
        events = Events()
        result = do_build(
            store, engine, ctx, tags=("pi:1",), build_args={"REPO": served.url}, progress=events
        )
        assert all(served.fetched(p.filename) for p in PACKAGES), served.requests
        assert any("Setting up pi-greet (1.0)" in line for line in events.output())
        assert len(result.config.diff_ids) == 2

        assert run_image(engine, store, "pi:1") == (0, GREETING.decode())
        code, out = run_image(
            engine,
            store,
            "pi:1",
            "/bin/sh",
            "-c",
            "dpkg -s pi-greet | grep ^Status; dpkg -s pi-data | grep ^Status; apt-mark showauto pi-data pi-greet",
        )
        assert (code, out.splitlines()) == (
            0,
            ["Status: install ok installed", "Status: install ok installed", "pi-data"],
        ), out

        # The same update with RUN --network=none: its own loopback has no server on the port.
        asked = len(served.requests)
        update = f"{APT} update --error-on=any"
        (ctx / "Dockerfile").write_text(f"FROM pi:1\nRUN --network=none {update}\n")
        with pytest.raises(BuildError, match="exit code 100") as info:
            do_build(store, engine, ctx)
        port = served.url.rsplit(":", 1)[1]
        assert f"127.0.0.1:{port}" in str(info.value) and "connect" in str(info.value).lower()
        assert len(served.requests) == asked, "a RUN without network reached the host's server"
        # ... while the default network still reaches it: the failure was the network's.
        (ctx / "Dockerfile").write_text(f"FROM pi:1\nRUN --network=default {update}\n")
        do_build(store, engine, ctx)
        assert len(served.requests) > asked
