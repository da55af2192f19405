"""``commit``: a container's changes become a new image (running or stopped, scratch or host)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from runtime.build.builder import BuildOptions, build
from runtime.engine import Container, Engine
from runtime.errors import ImageError, SpecError
from runtime.image import layer
from runtime.image.images import commit, is_host_based, resolve_image
from runtime.image.store import Store
from runtime.spec import ContainerSpec, Rootfs, TmpfsMount
from tests.integration.test_build import BUSYBOX, image_view, needs_busybox

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
CMD ["sh"]
"""


@pytest.fixture
def busybox_image(tmp_path: Path, store: Store, engine: Engine) -> str:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copy2(BUSYBOX, ctx / "busybox")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    build(BuildOptions(context=ctx, tags=("bb:base",)), store=store, engine=engine)
    return "bb:base"


def spec_of(
    store: Store, ref: str, argv: tuple[str, ...] | None = None, **fields: object
) -> ContainerSpec:
    image = resolve_image(store, ref)
    return ContainerSpec(image.rootfs, argv=argv, env=image.env, cwd=image.cwd, **fields)  # type: ignore[arg-type]


def sh(container: Container, script: str) -> str:
    result = container.exec_capture(["sh", "-c", script])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def layer_entries(store: Store, diff_id: str) -> set[str]:
    base = store.get_layer(diff_id).path
    return {
        os.path.relpath(os.path.join(d, n), base)
        for d, dirs, files in os.walk(base)
        for n in dirs + files
    }


@needs_busybox
@pytest.mark.rootless
def test_commit_of_a_running_container(store: Store, engine: Engine, busybox_image: str) -> None:
    base = store.get_image(busybox_image)
    spec = spec_of(store, busybox_image, tmpfs=(TmpfsMount("/scratch-space"),))
    with engine.create(spec) as c:
        c.start()
        sh(c, "echo added > /added && rm /bin/vi && mkdir -p /var/new && echo x > /scratch-space/x")
        image_id = commit(
            c,
            store,
            "bb:committed",
            changes=['CMD ["cat", "/added"]', "ENV COMMITTED=yes", "WORKDIR /var"],
            message="snapshot",
        )
        assert sh(c, "echo still running") == "still running\n"

    image = store.get_image("bb:committed")
    assert image.id == image_id
    config = image.config
    assert config.diff_ids[:-1] == base.config.diff_ids
    assert config.container.cmd == ("cat", "/added")
    assert config.container.env_map == {"PATH": "/bin", "COMMITTED": "yes"}
    assert config.container.working_dir == "/var"
    assert (config.history or ())[-1].comment == "snapshot"

    new = config.diff_ids[-1]
    entries = layer_entries(store, new)
    assert {"added", "bin/vi", "var/new"} <= entries
    assert not {"etc", "proc", "sys", "dev", "scratch-space"} & entries, "mount points left in"
    assert layer.layer_digest(store.get_layer(new).path, rootless=os.geteuid() != 0)[0] == new

    with engine.create(spec_of(store, "bb:committed", argv=("cat", "/added"))) as c2:
        c2.start()
        assert c2.wait().exit_code == 0
    view = image_view(store, "bb:committed")
    assert view.read_text("/added") == "added\n"
    assert view.lookup("/bin/vi", follow=False) is None
    assert view.lookup("/bin/ls", follow=False) is not None


@needs_busybox
@pytest.mark.rootless
def test_commit_of_a_stopped_container(store: Store, engine: Engine, busybox_image: str) -> None:
    spec = spec_of(store, busybox_image, argv=("sh", "-c", "echo done > /result"))
    with engine.create(spec) as c:
        c.start()
        assert c.wait().exit_code == 0
        image_id = commit(c, store, None, base=busybox_image)
    assert image_view(store, image_id).read_text("/result") == "done\n"
    assert store.get_image(image_id).tags == ()
    assert store.fsck() == []


@pytest.mark.rootless
def test_commit_of_a_host_container(store: Store, engine: Engine) -> None:
    with engine.create(ContainerSpec(Rootfs(host=True))) as c:
        c.start()
        c.exec_capture(["sh", "-c", "mkdir -p /opt/committed && echo hi > /opt/committed/f"])
        image_id = commit(c, store, "host-snap", changes=["LABEL kind=snapshot"])
    image = resolve_image(store, image_id)
    assert image.rootfs.host and is_host_based(image.config)
    assert image.config.container.labels == {"io.pytest-isolate.base": "host", "kind": "snapshot"}
    [diff_id] = image.config.diff_ids
    assert {"opt", "opt/committed", "opt/committed/f"} <= layer_entries(store, diff_id)
    with engine.create(ContainerSpec(image.rootfs)) as c:
        c.start()
        assert c.exec_capture(["cat", "/opt/committed/f"]).stdout == "hi\n"


@pytest.mark.rootless
def test_commit_of_a_container_of_an_image_on_the_host(
    tmp_path: Path, store: Store, engine: Engine
) -> None:
    # As root such a container's root is one overlay over a read-only view of the host's "/",
    # rootless it is split: either way deleting a host file is a whiteout in the next layer.
    host_file = tmp_path / "on-the-host.txt"
    host_file.write_text("host\n")
    with engine.create(ContainerSpec(Rootfs(host=True))) as c:
        c.start()
        c.exec_capture(["sh", "-c", "mkdir -p /opt/one && echo 1 > /opt/one/f"])
        first = commit(c, store, "on-host:1")
    with engine.create(ContainerSpec(resolve_image(store, first).rootfs)) as c:
        c.start()
        script = f"cat {host_file} && rm {host_file} /opt/one/f && echo 2 > /opt/two"
        assert c.exec_capture(["sh", "-c", script]).stdout == "host\n"
        second = commit(c, store, "on-host:2")
    with engine.create(ContainerSpec(resolve_image(store, second).rootfs)) as c:
        c.start()
        script = f"test -e {host_file} || echo gone; test -e /opt/one/f || echo gone; cat /opt/two"
        assert c.exec_capture(["sh", "-c", script]).stdout == "gone\ngone\n2\n"
    assert host_file.read_text() == "host\n"
    [_, top] = store.get_image(second).config.diff_ids
    out = io.BytesIO()
    layer.pack_layer(store.get_layer(top).path, out, rootless=os.geteuid() != 0)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        names = set(tar.getnames())
    whiteout = os.path.relpath(host_file.parent, "/") + "/.wh." + host_file.name
    assert {"opt/two", "opt/one/.wh.f", whiteout} <= names


@needs_busybox
@pytest.mark.rootless
def test_commit_refuses_what_it_cannot_do(store: Store, engine: Engine, busybox_image: str) -> None:
    with engine.create(spec_of(store, busybox_image)) as c:
        c.start()
        with pytest.raises(SpecError, match="RUN is not allowed"):
            commit(c, store, None, changes=["RUN echo no"])
        with pytest.raises(ImageError, match="does not run that image's layers"):
            commit(c, store, None, base="host")
    with (
        engine.create(ContainerSpec(Rootfs(lowers=(str(store.root),)))) as c,
        pytest.raises(ImageError, match="is not in the store"),
    ):
        commit(c, store, None)
