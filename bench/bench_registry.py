"""Push and pull of a ~100 MB image to a local registry, side by side with ``skopeo copy``.

Run by hand, as root (podman's column needs it; the rest does not)::

    .venv/bin/python bench/bench_registry.py                  # 3 rounds
    .venv/bin/python bench/bench_registry.py --rounds 5 --json out.json
    .venv/bin/python bench/bench_registry.py --no-podman

The image, built once per round into a fresh store (untimed): ``FROM scratch``, Debian's
static busybox as ``/bin/busybox``, ``/usr/lib/python3.11`` (without ``__pycache__``) and the
first ~60 MB of regular files of ``/usr/bin``: about 125 MB in ~1,000 files, 47 MB once
gzip-compressed, in three layers. Its command lists two of those directories, so "runnable"
is checked by running it.

Each round starts a fresh Debian ``docker-registry`` (distribution) on 127.0.0.1 for every
push column, so no push finds a blob already there, and runs every column once, in this order,
so a burst of other load hits them alike:

* ``ours: push, first`` -- :func:`runtime.registry.transfer.push` of the freshly built image:
  the one-time pack + gzip of each layer (:func:`runtime.image.exchange.export_image`) and the
  upload;
* ``ours: push, blobs made`` -- the same image pushed again to another empty registry: the
  compressed blobs exist in the store, only the upload is left (every later push of an image);
* ``skopeo copy oci: -> docker://`` -- the same blobs, laid out as an OCI image directory
  (untimed), pushed by skopeo to a third empty registry;
* ``ours: pull`` -- :func:`runtime.registry.transfer.pull` into an empty store, from the
  registry of the first push: layers downloaded, verified (blob digest and size, diff id),
  unpacked, made durable, the image recorded: ready to run;
* ``ours: pytest-isolate pull`` -- the same as a command (``python -m pytest_isolate pull``):
  Python's start-up and imports included, what a user at a shell waits for;
* ``skopeo copy docker:// -> oci:`` -- the same image to an empty OCI directory: downloaded and
  verified, *not* unpacked (an OCI layout keeps the compressed blobs);
* ``podman pull`` -- into a fresh ``--root`` (overlay driver): downloaded and unpacked, as ours;
  skipped, with the reason, when podman is missing or fails;
* ``ours: unpack from local blobs`` -- a diagnostic, not a target: the same layers imported
  into an empty store from the first store's blob files (no network), to show which part of
  a pull is the unpacking.

Every timed operation starts after a ``sync`` (untimed), so none pays for the dirty pages the
one before left (our store makes a pulled layer durable with ``sync(2)``, which writes out
every dirty page of the machine). Throughput is compressed bytes (the blobs' sizes) per
second. skopeo and podman are timed as whole commands (a Go program starts in ~50 ms); ours
in-process, as the pytest plugin and a CI script that imports the engine use it, and once as a
command.

Target (from the issue): push and pull at least at skopeo's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_build import Row  # noqa: E402 - one row type for the bench tables
from runtime.build.builder import BuildOptions, build  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.image import exchange  # noqa: E402
from runtime.image.images import resolve_image  # noqa: E402
from runtime.image.store import Store  # noqa: E402
from runtime.registry.transfer import pull, push  # noqa: E402
from runtime.spec import ContainerSpec  # noqa: E402
from tests.registry_fixtures import RegistryServer, running_registry  # noqa: E402

BUSYBOX = Path("/bin/busybox")
PYTHON_LIB = Path("/usr/lib/python3.11")
USR_BIN = Path("/usr/bin")
BIN_BYTES = 60 << 20
TAG = "bench-registry:1"
REPO_NAME = "bench/image"

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY py /usr/lib/python3.11
COPY bin /usr/bin
CMD ["/bin/busybox", "sh", "-c", "/bin/busybox ls /usr/lib/python3.11 /usr/bin | /bin/busybox wc -l"]
"""


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes, after a ``sync`` (untimed): our store syncs when a layer is
    complete, and must not pay for the dirty pages of the column before it."""
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kwargs)


# --- the inputs --------------------------------------------------------------------------------


def make_context(work: Path) -> tuple[Path, int]:
    """The build context; returns it and the number of bytes of its files."""
    ctx = work / "context"
    ctx.mkdir()
    shutil.copy2(BUSYBOX, ctx / "busybox")
    shutil.copytree(
        PYTHON_LIB, ctx / "py", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    bins = ctx / "bin"
    bins.mkdir()
    total = 0
    for path in sorted(USR_BIN.iterdir()):
        if total >= BIN_BYTES:
            break
        if path.is_file() and not path.is_symlink():
            shutil.copy2(path, bins / path.name)
            total += path.stat().st_size
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    size = sum(p.stat().st_size for p in ctx.rglob("*") if p.is_file() and not p.is_symlink())
    return ctx, size


def oci_layout(store: Store, directory: Path) -> None:
    """The image's exported blobs as an OCI image layout (what ``skopeo copy oci:`` reads)."""
    exported = exchange.export_image(store, TAG)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for layer in exported.layers:
        digest = layer.descriptor.digest
        with store.open_blob(digest) as src, open(blobs / digest[7:], "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    (blobs / exported.config.digest[7:]).write_bytes(exported.config_bytes)
    (blobs / exported.manifest_digest[7:]).write_bytes(exported.manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": exported.media_type,
                "digest": exported.manifest_digest,
                "size": len(exported.manifest),
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))


@contextmanager
def registry(work: Path, name: str) -> Iterator[RegistryServer]:
    directory = work / name
    directory.mkdir()
    try:
        with running_registry(directory, None) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def image_output(engine: Engine, store: Store, ref: str) -> str:
    """Run the image's command; its output (the check that a pull left it runnable)."""
    image = resolve_image(store, ref, policy="never")
    spec = ContainerSpec(image.rootfs, argv=image.argv(), env=image.env, cwd=image.cwd)
    with tempfile.TemporaryFile() as out:
        status = engine.run(spec, stdio=(None, out.fileno(), out.fileno()))
        out.seek(0)
        text = out.read().decode(errors="replace")
    if status.exit_code != 0:
        raise RuntimeError(f"the pulled image did not run: exit {status.exit_code}: {text}")
    return text.strip()


# --- the columns ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, work: Path, ctx: Path, podman: bool) -> None:
        self.work = work
        self.ctx = ctx
        self.podman = podman
        self.engine = Engine(state_root=work / "state")
        names = [
            "ours: push, first (pack + gzip + upload)",
            "ours: push, blobs made (upload)",
            "skopeo copy oci: -> docker://",
            "ours: pull (unpacked, ready to run)",
            "ours: `pytest-isolate pull` command",
            "skopeo copy docker:// -> oci: (not unpacked)",
            "podman pull (unpacked)",
            "ours: unpack from local blobs (no network)",
        ]
        self.rows = {n: Row(n) for n in names}
        self.compressed = 0
        self.unpacked = 0
        self.layers = 0
        self.checked = ""
        self.podman_note = ""

    def row(self, index: int) -> Row:
        return list(self.rows.values())[index]

    def round(self, i: int) -> None:
        store = Store(self.work / f"built-{i}")
        build(BuildOptions(self.ctx, tags=(TAG,)), store=store, engine=self.engine)
        with registry(self.work, f"reg-first-{i}") as first:
            ref = first.ref(REPO_NAME, "v1")
            self.row(0).seconds.append(_timed(lambda: push(store, TAG, ref)))
            exported = exchange.export_image(store, TAG)
            self.compressed = sum(layer.descriptor.size for layer in exported.layers)
            self.layers = len(exported.layers)
            with registry(self.work, f"reg-again-{i}") as again:
                self.row(1).seconds.append(
                    _timed(lambda: push(store, TAG, again.ref(REPO_NAME, "v1")))
                )
            oci = self.work / f"oci-{i}"
            oci_layout(store, oci)
            with registry(self.work, f"reg-skopeo-{i}") as other:
                dest = f"docker://{other.ref(REPO_NAME, 'v1')}"
                argv = ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false"]
                self.row(2).seconds.append(_timed(lambda: _run([*argv, f"oci:{oci}:v1", dest])))
            shutil.rmtree(oci)
            self.pulls(i, store, ref)
        self.unpack_only(i, store)
        shutil.rmtree(store.root)

    def pulls(self, i: int, built: Store, ref: str) -> None:
        pulled = Store(self.work / f"pulled-{i}")
        self.row(3).seconds.append(_timed(lambda: pull(pulled, ref)))
        if pulled.resolve(ref) != built.resolve(TAG):
            raise RuntimeError(f"pulled {pulled.resolve(ref)}, pushed {built.resolve(TAG)}")
        if not self.checked:
            self.checked = image_output(self.engine, pulled, ref)
            self.unpacked = sum(layer.size for layer in pulled.image_layers(pulled.resolve(ref)))
        shutil.rmtree(pulled.root)

        cli_store = self.work / f"pulled-cli-{i}"
        env = {**os.environ, "PYTEST_ISOLATE_STORE": str(cli_store)}
        argv = [sys.executable, "-m", "pytest_isolate", "pull", "-q", ref]
        self.row(4).seconds.append(_timed(lambda: _run(argv, env=env, cwd=REPO)))
        shutil.rmtree(cli_store)

        oci = self.work / f"oci-pulled-{i}"
        argv = ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false"]
        self.row(5).seconds.append(
            _timed(lambda: _run([*argv, f"docker://{ref}", f"oci:{oci}:v1"]))
        )
        shutil.rmtree(oci)

        if self.podman and not self.podman_note:
            self.podman_pull(i, ref)

    def podman_pull(self, i: int, ref: str) -> None:
        root = self.work / f"podman-{i}"
        base = ["podman", "--root", str(root / "root"), "--runroot", str(root / "run")]
        base += ["--storage-driver", "overlay"]
        try:
            self.row(6).seconds.append(
                _timed(lambda: _run([*base, "pull", "-q", "--tls-verify=false", ref]))
            )
        except (subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            self.podman_note = f"podman pull failed: {detail.strip()[-300:]}"
        finally:
            subprocess.run([*base, "system", "reset", "-f"], capture_output=True)
            subprocess.run(["umount", "-R", str(root)], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)

    def unpack_only(self, i: int, built: Store) -> None:
        exported = exchange.export_image(built, TAG)
        target = Store(self.work / f"unpacked-{i}")

        def one(layer: exchange.LayerBlob) -> None:
            with built.open_blob(layer.descriptor.digest) as blob:
                exchange.import_layer(target, layer.descriptor, layer.diff_id, blob)

        def imports() -> None:  # as a pull does: the layers in parallel, up to 4
            with target.guard(), ThreadPoolExecutor(4) as pool:
                list(pool.map(one, exported.layers))

        self.row(7).seconds.append(_timed(imports))
        shutil.rmtree(target.root)


# --- report --------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def report(bench: Bench, notes: list[str]) -> str:
    mb = bench.compressed / 1e6
    lines = [
        "| what | median | MB/s | runs | min | max | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in bench.rows.values():
        low = min(r.seconds) if r.seconds else None
        high = max(r.seconds) if r.seconds else None
        rate = f"{mb / r.median:.0f}" if r.median else "-"
        lines.append(
            f"| {r.name} | {_s(r.median)} | {rate} | {len(r.seconds)} | {_s(low)} | {_s(high)} "
            f"| {r.note} |"
        )
    return "\n".join([*lines, "", *notes])


def verdicts(bench: Bench) -> list[str]:
    rows = list(bench.rows.values())
    first, made, skopeo_push, ours_pull, cli_pull, skopeo_pull, podman, _ = (r.median for r in rows)
    assert first and made and skopeo_push and ours_pull and cli_pull and skopeo_pull
    out = [
        f"push at least at skopeo's throughput: {'MET' if made <= skopeo_push else 'NOT MET'} "
        f"({skopeo_push / made:.2f}x skopeo's with the blobs made; {skopeo_push / first:.2f}x "
        "for the first push, which also packs and compresses)",
        f"pull at least at skopeo's throughput: {'MET' if ours_pull <= skopeo_pull else 'NOT MET'}"
        f" ({skopeo_pull / ours_pull:.2f}x skopeo's in-process, {skopeo_pull / cli_pull:.2f}x as "
        "a command; skopeo does not unpack)",
    ]
    if podman:
        out.append(
            f"pull against podman pull, which unpacks too: {podman / ours_pull:.2f}x podman's "
            f"throughput ({podman / cli_pull:.2f}x as a command)"
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of every column (default 3)")
    p.add_argument("--no-podman", action="store_true", help="skip the podman column")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    for tool, package in (
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        (str(BUSYBOX), "busybox-static"),
    ):
        if shutil.which(tool) is None:
            print(f"needs {tool} (Debian: apt-get install {package})", file=sys.stderr)
            return 2
    podman = not args.no_podman and shutil.which("podman") is not None
    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=os.environ.get("BENCH_DIR")))
    bench: Bench | None = None
    try:
        ctx, context_bytes = make_context(work)
        bench = Bench(work, ctx, podman)
        for i in range(args.rounds):
            bench.round(i)
        skopeo = _run(["skopeo", "--version"]).stdout.strip()
        notes = [
            f"image: {bench.layers} layers, {context_bytes / 1e6:.0f} MB of files, "
            f"{bench.unpacked / 1e6:.0f} MB unpacked, {bench.compressed / 1e6:.1f} MB "
            f"compressed (MB/s above are of these); the pulled image ran and printed "
            f"{bench.checked!r}",
            f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, kernel "
            f"{platform.release()}, Python {platform.python_version()}, uid {os.geteuid()}, "
            f"load {os.getloadavg()[0]:.2f}, work dir {work}; {skopeo}",
        ]
        if args.no_podman:
            notes.append("podman: skipped (--no-podman)")
        elif not podman:
            notes.append("podman column skipped: podman is not installed")
        elif bench.podman_note:
            notes.append(f"podman column skipped: {bench.podman_note}")
        notes += verdicts(bench)
        print(report(bench, notes))
        if args.json is not None:
            numbers = {r.name: r.seconds for r in bench.rows.values()}
            args.json.write_text(
                json.dumps(numbers | {"compressed": bench.compressed, "notes": notes}, indent=2)
            )
    finally:
        if bench is not None:
            bench.engine.close()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
