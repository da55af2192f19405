"""The image commands, run for real: ``python -m pytest_isolate ...`` on a store in ``tmp_path``.

The image is a real root filesystem: Debian's static busybox (``busybox-static``) with its applet
links, packed into a tarball by the test and imported.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.image.layer import layer_digest
from runtime.image.store import Store

pytestmark = pytest.mark.rootless

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "ls", "env", "id", "pwd", "sleep", "touch", "true")


@dataclass
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Result]


@dataclass(frozen=True)
class Tarballs:
    tree: Path
    xz: Path
    plain: Path
    gz: Path


def _cli(store_dir: Path, state_dir: Path) -> Cli:
    env = {
        **os.environ,
        "PYTEST_ISOLATE_STORE": str(store_dir),
        "PYTEST_ISOLATE_STATE": str(state_dir),
    }

    def run(*args: str, timeout: float = 60) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest_isolate", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


def busybox_tree(root: Path) -> Path:
    if not BUSYBOX.is_file():
        pytest.skip("needs /bin/busybox, a static build (Debian: apt-get install busybox-static)")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        os.symlink("busybox", root / "bin" / applet)
    for d in ("etc", "tmp", "root"):
        (root / d).mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory: pytest.TempPathFactory) -> Tarballs:
    """A busybox root filesystem as tarballs: xz (as ``tar -cJf`` makes it), plain and gzip."""
    base = tmp_path_factory.mktemp("rootfs")
    tree = busybox_tree(base / "tree")
    made = Tarballs(tree, base / "busybox.tar.xz", base / "r.tar", base / "r.tgz")
    for path, mode in ((made.xz, "w:xz"), (made.plain, "w"), (made.gz, "w:gz")):
        with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
            tar.add(tree, arcname=".")
    return made


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tarballs: Tarballs) -> tuple[Path, str]:
    """A store holding the busybox image as ``bb:1``, imported once through the CLI."""
    base = tmp_path_factory.mktemp("template")
    result = _cli(base / "store", base / "state")("import", str(tarballs.xz), "bb:1")
    assert result.code == 0, result.err
    return base / "store", result.out.strip()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def cli(store_dir: Path, tmp_path: Path) -> Cli:
    return _cli(store_dir, tmp_path / "state")


@pytest.fixture
def rootfs_tar(tarballs: Tarballs) -> Path:
    return tarballs.xz


@pytest.fixture
def imported(template: tuple[Path, str], store_dir: Path) -> str:
    """This test's store: a copy of the template store, with ``bb:1``; returns the image id."""
    shutil.copytree(template[0], store_dir, symlinks=True)
    return template[1]


def test_import_prints_the_id_and_images_lists_it(cli: Cli, imported: str) -> None:
    assert imported.startswith("sha256:") and len(imported) == 71
    listing = cli("images")
    assert listing.code == 0
    header, row = listing.out.splitlines()
    assert header.split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert row.split()[:3] == ["bb", "1", imported[7:19]]
    assert row.endswith("MB")  # busybox is about 2 MB unpacked

    rows = [json.loads(line) for line in cli("images", "--format", "json").out.splitlines()]
    assert [(r["Repository"], r["Tag"], r["ID"]) for r in rows] == [("bb", "1", imported[7:19])]
    assert cli("images", "-q", "--no-trunc").out == imported + "\n"


def test_import_of_each_compression_lands_on_the_same_layer(
    cli: Cli, tarballs: Tarballs, store_dir: Path
) -> None:
    layers = set()
    # r.tar and r.tgz: names without a hint, the compression is found from the content
    for path in (tarballs.xz, tarballs.plain, tarballs.gz):
        result = cli("import", str(path))
        assert result.code == 0, result.err
        layers.add(Store(store_dir).get_image(result.out.strip()).config.diff_ids)
    assert len(layers) == 1


def test_inspect_and_history(cli: Cli, imported: str) -> None:
    result = cli("inspect", "bb:1")
    assert result.code == 0, result.err
    (info,) = json.loads(result.out)
    assert info["Id"] == imported
    assert info["RepoTags"] == ["bb:1"]
    assert info["Comment"] == "imported from busybox.tar.xz"
    assert len(info["RootFS"]["Layers"]) == 1
    lower = Path(info["GraphDriver"]["Data"]["LowerDir"])
    assert (lower / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.readlink(lower / "bin" / "sh") == "busybox"
    # the diff id is the stored layer's, so an export can recreate the tar
    assert layer_digest(lower, rootless=os.geteuid() != 0)[0] == info["RootFS"]["Layers"][0]

    history = cli("history", "bb:1")
    assert history.code == 0
    header, row = history.out.splitlines()
    assert header.split()[:3] == ["IMAGE", "CREATED", "CREATED"]
    assert row.startswith(imported[7:19]) and row.endswith("imported from busybox.tar.xz")
    (entry,) = [
        json.loads(line) for line in cli("history", "--format", "json", "bb:1").out.splitlines()
    ]
    assert entry["Comment"] == "imported from busybox.tar.xz"


def test_inspect_reports_missing_images_and_still_prints_the_others(
    cli: Cli, imported: str
) -> None:
    result = cli("inspect", "bb:1", "nosuch:1")
    assert result.code == 1
    assert [i["Id"] for i in json.loads(result.out)] == [imported]
    assert "no image 'nosuch:1'" in result.err


def test_tag_and_rmi_follow_docker(cli: Cli, imported: str) -> None:
    assert cli("tag", "bb:1", "localhost:5000/team/bb:v2").code == 0
    (info,) = json.loads(cli("inspect", imported).out)
    assert info["RepoTags"] == ["bb:1", "localhost:5000/team/bb:v2"]

    refused = cli("rmi", imported[7:19])
    assert refused.code == 1 and "must be forced" in refused.err

    untag = cli("rmi", "bb:1")
    assert (untag.code, untag.out) == (0, "Untagged: bb:1\n")
    assert cli("images", "-q").out == imported[7:19] + "\n"

    last = cli("rmi", "localhost:5000/team/bb:v2")
    assert last.code == 0
    assert last.out == f"Untagged: localhost:5000/team/bb:v2\nDeleted: {imported}\n"
    assert cli("images", "-q").out == ""


def test_rmi_force_removes_every_tag(cli: Cli, imported: str) -> None:
    assert cli("tag", "bb:1", "bb:2").code == 0
    result = cli("rmi", "-f", imported[7:19])
    assert result.code == 0, result.err
    assert result.out == f"Untagged: bb:1\nUntagged: bb:2\nDeleted: {imported}\n"


def test_a_missing_image_says_how_to_get_it(cli: Cli, store_dir: Path) -> None:
    result = cli("history", "debian:bookworm")
    assert result.code == 1
    assert "no image 'debian:bookworm'" in result.err
    assert "pytest-isolate import ROOTFS.tar debian:bookworm" in result.err
    assert "pytest-isolate pull debian:bookworm" in result.err
    assert cli("tag", "nosuch", "x").code == 1


def test_prune_removes_what_rmi_left_and_all_empties_the_store(
    cli: Cli, imported: str, store_dir: Path
) -> None:
    layers = store_dir / "layers" / "sha256"
    assert len(os.listdir(layers)) == 1
    assert cli("rmi", "bb:1").code == 0
    kept = cli("prune")  # the layer is still build cache (the import's key): kept
    assert kept.code == 0 and "Total reclaimed space: 0B" in kept.out
    assert len(os.listdir(layers)) == 1

    result = cli("prune", "--format", "json", "--max-size", "0")
    assert result.code == 0
    report = json.loads(result.out)
    assert len(report["LayersDeleted"]) == 1 and report["SpaceReclaimed"] > 1_000_000
    assert os.listdir(layers) == []

    assert cli("check").code == 0


def test_prune_all_removes_images(cli: Cli, imported: str, store_dir: Path) -> None:
    result = cli("prune", "--all")
    assert result.code == 0
    assert f"deleted: {imported}" in result.out
    assert cli("images", "-q").out == ""
    assert os.listdir(store_dir / "layers" / "sha256") == []


def test_check_finds_a_changed_layer_and_a_corrupted_blob(
    cli: Cli, imported: str, store_dir: Path
) -> None:
    clean = cli("check")
    assert (clean.code, clean.out) == (0, f"no problems found in {store_dir}\n")

    blob = Store(store_dir).put_blob(io.BytesIO(b"layer bytes"))
    (store_dir / "blobs" / "sha256" / blob[7:]).write_bytes(b"layer bytez")
    (info,) = json.loads(cli("inspect", imported).out)
    lower = Path(info["GraphDriver"]["Data"]["LowerDir"])
    (lower / "etc" / "passwd").write_text("root::0:0::/:/bin/sh\n")

    result = cli("check")
    assert result.code == 1
    lines = result.out.splitlines()
    assert lines[-1] == f"2 problems in {store_dir}"
    assert any(line.startswith(f"blob {blob}: content has digest") for line in lines)
    assert any(
        line.startswith(f"layer {info['RootFS']['Layers'][0]}: content changed") for line in lines
    )
    problems = json.loads(cli("check", "--format", "json").out)
    assert sorted(p["Kind"] for p in problems) == ["blob", "layer"]


def test_import_refuses_an_entry_that_climbs_out(cli: Cli, tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    result = cli("import", str(evil), "evil:1")
    assert result.code == 1
    assert "../../escaped" in result.err
    assert not any(p.name == "escaped" for p in tmp_path.rglob("escaped"))
    assert cli("images", "-q").out == ""


def test_import_of_a_broken_file_names_it(cli: Cli, tmp_path: Path, rootfs_tar: Path) -> None:
    broken = tmp_path / "broken.tar.xz"
    broken.write_bytes(rootfs_tar.read_bytes()[:5000])
    result = cli("import", str(broken), "broken:1")
    assert result.code == 1
    assert str(broken) in result.err and "corrupt compressed data" in result.err
    missing = cli("import", str(tmp_path / "nope.tar"))
    assert missing.code == 1 and "nope.tar" in missing.err
    assert cli("images", "-q").out == ""


# --- run IMAGE and build ---------------------------------------------------------------------

APP = """\
FROM bb:1
ARG GREETING=hello
ENV GREETING=$GREETING PATH=/bin
WORKDIR /app
COPY data.txt ./
RUN echo "built with $GREETING" > stamp && cat data.txt
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo $GREETING from $(pwd); cat stamp"]
"""


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(APP)
    (ctx / "data.txt").write_text("data v1\n")
    return ctx


def test_run_an_imported_image(cli: Cli, imported: str) -> None:
    result = cli("run", "bb:1", "sh", "-c", "echo in $(pwd) as $(id -u); ls /bin/busybox; exit 3")
    assert (result.code, result.out) == (3, "in / as 0\n/bin/busybox\n"), result.err
    by_id = cli("run", "-w", "/tmp", "-e", "X=1", imported[7:19], "sh", "-c", "pwd; echo $X $PATH")
    assert by_id.out == "/tmp\n1 /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"


def test_run_without_a_command_or_an_image(cli: Cli, imported: str) -> None:
    bare = cli("run", "bb:1")
    assert bare.code == 125
    assert "image 'bb:1' has no ENTRYPOINT or CMD" in bare.err
    missing = cli("run", "--pull", "never", "debian:bookworm", "true")
    assert missing.code == 125
    assert "image 'debian:bookworm' is not in the store" in missing.err
    assert "import ROOTFS.tar" in missing.err


def test_build_then_run_applies_the_image_config(cli: Cli, imported: str, context: Path) -> None:
    built = cli("build", "-t", "app:1", "--progress", "plain", str(context))
    assert built.code == 0, built.err
    assert built.out == ""
    lines = built.err.splitlines()
    assert '#6 [6/8] RUN echo "built with $GREETING" > stamp && cat data.txt' in lines
    assert any(line.startswith("#6 ") and line.endswith(" data v1") for line in lines)
    assert lines[-1] == "naming to docker.io/library/app:1"

    assert cli("run", "app:1").out == "hello from /app\nbuilt with hello\n"  # ENTRYPOINT + CMD
    assert cli("run", "app:1", "echo $GREETING; pwd").out == "hello\n/app\n"  # COMMAND for CMD
    assert cli("run", "--entrypoint", "/bin/echo", "app:1", "a", "b").out == "a b\n"
    env = cli("run", "-e", "GREETING=hi", "-w", "/", "app:1", "echo $GREETING $PATH; pwd")
    assert env.out == "hi /bin\n/\n"

    history = cli("history", "--format", "json", "app:1").out.splitlines()
    created_by = [json.loads(line)["CreatedBy"] for line in history]
    assert created_by[0] == 'CMD ["echo $GREETING from $(pwd); cat stamp"]'
    # the ARG is not shown: the ENV of the same name shadows it, as in docker
    assert created_by[2] == 'RUN /bin/sh -c echo "built with $GREETING" > stamp && cat data.txt'
    assert created_by[3] == "COPY data.txt ./"


def test_rebuild_is_cached_until_a_source_or_arg_changes(
    cli: Cli, imported: str, context: Path
) -> None:
    first = cli("build", "-q", "-t", "app:1", str(context))
    assert first.code == 0, first.err
    image_id = first.out.strip()
    again = cli("build", "--progress", "plain", str(context))
    assert again.err.count(" CACHED") == 2
    assert f"writing image {image_id} (8 steps, 2 cached, 3 layers," in again.err

    (context / "data.txt").write_text("data v2\n")
    changed = cli("build", "--progress", "plain", "-t", "app:2", str(context))
    assert changed.err.count(" CACHED") == 0 and "data v2" in changed.err
    assert cli("run", "app:2", "cat data.txt").out == "data v2\n"

    arg = cli("build", "-q", "--build-arg", "GREETING=salut", "-t", "app:3", str(context))
    assert cli("run", "app:3").out == "salut from /app\nbuilt with salut\n", arg.err
    assert len(set(cli("images", "-q").out.split())) == 4  # bb:1, app:1, app:2, app:3


def test_build_target_builds_only_the_stages_it_needs(
    cli: Cli, imported: str, tmp_path: Path
) -> None:
    ctx = tmp_path / "multi"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM bb:1 AS base\nRUN echo base > /base\n"
        "FROM base AS test\nRUN echo running-tests\n"
        "FROM base AS release\nRUN echo release > /release\n"
    )
    result = cli("build", "--progress", "plain", "--target", "release", "-t", "rel:1", str(ctx))
    assert result.code == 0, result.err
    assert "running-tests" not in result.err
    assert "[release 4/4] RUN echo release > /release" in result.err
    assert cli("run", "rel:1", "cat", "/base", "/release").out == "base\nrelease\n"


def test_a_failed_build_names_the_file_line_and_exit_code(
    cli: Cli, imported: str, tmp_path: Path
) -> None:
    ctx = tmp_path / "bad"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM bb:1\nRUN echo about to fail; exit 7\n")
    result = cli("build", "--progress", "plain", str(ctx))
    assert result.code == 1
    assert f"{ctx / 'Dockerfile'}:2: RUN echo about to fail; exit 7" in result.err
    assert "exit code 7" in result.err and "| about to fail" in result.err
    assert cli("check").code == 0

    (ctx / "Dockerfile").write_text("FROM bb:1\nCOPY nothing-here /\n")
    missing = cli("build", "-q", str(ctx))
    assert missing.code == 1 and "nothing-here" in missing.err
    base = cli("build", "-q", "-f", str(ctx / "Dockerfile"), str(tmp_path / "no-such-dir"))
    assert base.code == 1 and "is not a directory" in base.err


def test_import_with_changes_and_a_message(cli: Cli, tarballs: Tarballs) -> None:
    result = cli(
        "import",
        "-m",
        "busybox base",
        "-c",
        'CMD ["/bin/sh", "-c", "echo $GREETING from $(pwd)"]',
        "-c",
        "ENV GREETING=hi",
        "-c",
        "WORKDIR /tmp",
        str(tarballs.gz),
        "bb:c",
    )
    assert result.code == 0, result.err
    assert cli("run", "bb:c").out == "hi from /tmp\n"
    (info,) = json.loads(cli("inspect", "bb:c").out)
    assert info["Comment"] == "busybox base"
    refused = cli("import", "-c", "RUN true", str(tarballs.gz), "bb:d")
    assert refused.code == 1 and "RUN is not allowed" in refused.err
