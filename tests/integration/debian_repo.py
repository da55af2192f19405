"""A flat apt repository on loopback, made in the test: ``RUN apt-get install`` with no internet.

The Debian test (``test_build.py``) must show that a ``RUN`` on the default network can install
packages, while tests may only talk to loopback. So the packages are built here with
``dpkg-deb --build`` (part of ``dpkg``, on every Debian host: nothing is downloaded), indexed
by a ``Packages`` and a ``Release`` file written here, and served over HTTP on ``127.0.0.1``
by :func:`serve`, which also records what apt fetched, so the test can tell a real
install from a cached or skipped one.

The parts, plan before act: :func:`control_text`, :func:`packages_stanza` and
:func:`release_text` are pure; :func:`build_deb` and :func:`make_repo` write files.

A flat repository (``deb [trusted=yes] http://127.0.0.1:PORT ./``) needs no ``dists/`` tree:
apt reads ``Release`` and ``Packages`` next to the ``.deb`` files. ``trusted=yes`` lets apt use
the unsigned ``Release``; its hashes are still checked.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "DebPackage",
    "Served",
    "build_deb",
    "control_text",
    "make_repo",
    "packages_stanza",
    "release_text",
    "serve",
]


@dataclass(frozen=True)
class DebPackage:
    """A binary package of plain files, ``Architecture: all`` so it installs anywhere."""

    name: str
    version: str
    files: Mapping[str, bytes]
    """Absolute path inside the system -> content; every file is installed mode 0755 when its
    path is under a ``bin`` directory, 0644 otherwise."""
    depends: Sequence[str] = ()
    description: str = "a package made by the pytest-isolate tests"

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_all.deb"


def control_text(pkg: DebPackage, installed_size_kib: int) -> str:
    """The ``DEBIAN/control`` of ``pkg`` (pure). Field order follows Debian policy 5.3."""
    lines = [
        f"Package: {pkg.name}",
        f"Version: {pkg.version}",
        "Architecture: all",
        "Maintainer: pytest-isolate tests <tests@localhost>",
        f"Installed-Size: {installed_size_kib}",
    ]
    if pkg.depends:
        lines.append(f"Depends: {', '.join(pkg.depends)}")
    lines += ["Section: misc", "Priority: optional", f"Description: {pkg.description}"]
    return "\n".join(lines) + "\n"


def packages_stanza(control: str, filename: str, data: bytes) -> str:
    """The ``Packages`` entry of a ``.deb`` (pure): its control fields, where it is, its hashes.

    This is what ``dpkg-scanpackages`` writes; apt refuses a download whose size or sha256
    differs from it.
    """
    return (
        control.rstrip("\n")
        + f"\nFilename: ./{filename}\nSize: {len(data)}\n"
        + f"MD5sum: {hashlib.md5(data).hexdigest()}\n"
        + f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
    )


def release_text(indexes: Mapping[str, bytes], date: str) -> str:
    """A flat repository's ``Release`` (pure): the date and the sha256 of every index file."""
    lines = [f"Date: {date}", "Architectures: all amd64 arm64 i386", "SHA256:"]
    lines += [
        f" {hashlib.sha256(data).hexdigest()} {len(data):>10} {name}"
        for name, data in sorted(indexes.items())
    ]
    return "\n".join(lines) + "\n"


def build_deb(pkg: DebPackage, workdir: Path, out: Path) -> Path:
    """Build ``pkg`` with ``dpkg-deb --build`` into ``out``; returns the ``.deb``'s path.

    ``--root-owner-group`` records root as the owner of every file whoever builds it, so the
    package is the same when the rootless run builds it.
    """
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise FileNotFoundError("dpkg-deb not found (it is part of dpkg)")
    tree = workdir / f"{pkg.name}-tree"
    size = 0
    for path, content in pkg.files.items():
        rel = PurePosixPath(path).relative_to("/")
        target = tree / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(0o755 if "bin" in rel.parts[:-1] else 0o644)
        size += len(content)
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(control_text(pkg, max(1, (size + 1023) // 1024)))
    for d in [tree, *(p for p in tree.rglob("*") if p.is_dir())]:
        d.chmod(0o755)
    deb = out / pkg.filename
    done = subprocess.run(
        [dpkg_deb, "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RuntimeError(f"dpkg-deb --build {pkg.name} exited {done.returncode}: {done.stderr}")
    return deb


def make_repo(root: Path, packages: Sequence[DebPackage]) -> Path:
    """Build ``packages`` and write a flat repository in ``root/repo``; returns that directory."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    stanzas = []
    for pkg in packages:
        deb = build_deb(pkg, root, repo)
        # The index repeats the control file as packed, as dpkg-scanpackages would.
        control = subprocess.run(
            ["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True
        ).stdout
        stanzas.append(packages_stanza(control, pkg.filename, deb.read_bytes()))
    index = "\n".join(stanzas).encode()
    (repo / "Packages").write_bytes(index)
    date = email.utils.formatdate(usegmt=True)
    (repo / "Release").write_text(release_text({"Packages": index}, date))
    return repo


@dataclass(frozen=True)
class Served:
    """A running :func:`serve` server: its base URL and every request it answered so far."""

    url: str
    requests: list[tuple[str, str, int]] = field(default_factory=list)
    """``(method, path, status)`` in arrival order."""

    def fetched(self, name: str) -> bool:
        """Whether a GET of a path ending in ``/name`` was answered with 200."""
        return any(
            method == "GET" and path.rsplit("/", 1)[-1] == name and status == 200
            for method, path, status in self.requests
        )


@contextmanager
def serve(root: Path) -> Iterator[Served]:
    """Serve ``root`` over HTTP on ``127.0.0.1`` (a free port) in a thread, recording requests."""
    requests: list[tuple[str, str, int]] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            requests.append((self.command, self.path, int(code)))

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Served(f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
