"""Run part of the test suite as an unprivileged user, from a throwaway copy of the tree.

Why a copy: the checkout and its venv usually live under ``/root`` (mode 0700), which the test
user cannot even traverse, and the venv's interpreter is pyenv's, also under ``/root``. So the
harness copies the sources and the *installed* dependencies into a fresh 0755 directory and runs
them with the system interpreter of the same minor version. Copying installed files (not
re-installing) keeps the run offline and takes a fraction of a second.

The parts, plan before act:

* :func:`parse_subids` / :func:`free_range` decide about ``/etc/subuid`` ranges (pure);
  :func:`ensure_user` creates the user and its ranges under a lock (acts).
* :func:`dependency_closure` and :func:`staging_plan` decide what to copy (reads metadata only);
  :func:`apply_plan` copies.
* :func:`inner_command` / :func:`inner_environment` build the run (pure); :func:`run_as` runs it.
* :func:`parse_summary` reads pytest's last line, so the caller can insist on "passed >= 1".

This module imports only the standard library at the top: it is also imported by the copied
test file inside the unprivileged run, where only the copied packages exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

USER = "isolate-test"
"""The unprivileged account the harness runs as (created when missing)."""

SUBID_COUNT = 65536
"""Size of the subordinate id range the user needs (one full 16-bit range, as useradd gives)."""

REPO_PARTS = ("runtime", "pytest_isolate", "tests", "pyproject.toml")
"""What of the checkout the inner run needs; ``pyproject.toml`` carries the markers and addopts."""

_LOCK_DIRS = ("/run/lock", "/var/lock")


class HarnessError(RuntimeError):
    """The rootless run could not be prepared; the message names the file, user or package."""


# --- subordinate ids (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class IdRange:
    """``count`` ids from ``start``, as one line of ``/etc/subuid`` grants them."""

    start: int
    count: int

    @property
    def end(self) -> int:
        """One past the last id."""
        return self.start + self.count

    def overlaps(self, other: IdRange) -> bool:
        return self.start < other.end and other.start < self.end

    def option(self) -> str:
        """The ``first-last`` form ``usermod --add-subuids`` takes."""
        return f"{self.start}-{self.end - 1}"


def parse_subids(text: str, origin: str = "/etc/subuid") -> dict[str, list[IdRange]]:
    """Parse ``owner:start:count`` lines; the owner is a name or a numeric uid, kept as written.

    Malformed lines raise with the file and line number, since newuidmap would reject the same
    file later with a much vaguer message.
    """
    out: dict[str, list[IdRange]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) != 3 or not fields[1].isdigit() or not fields[2].isdigit():
            raise HarnessError(f"{origin}:{number}: expected owner:start:count, got {raw!r}")
        out.setdefault(fields[0], []).append(IdRange(int(fields[1]), int(fields[2])))
    return out


def ranges_of(entries: Mapping[str, list[IdRange]], name: str, uid: int) -> list[IdRange]:
    """The ranges granted to a user, whether the file names it or gives its uid."""
    return [*entries.get(name, []), *entries.get(str(uid), [])]


def free_range(taken: Iterable[IdRange], count: int = SUBID_COUNT, floor: int = 100000) -> IdRange:
    """The lowest ``count`` ids at or above ``floor`` that overlap no range already granted.

    Overlapping grants would let two users' containers share ids, so a fixed guess such as
    200000 is only right by luck.
    """
    start = floor
    for r in sorted(taken):
        if IdRange(start, count).overlaps(r):
            start = max(start, r.end)
    return IdRange(start, count)


# --- the user (acts) ----------------------------------------------------------------------------


def _lock_path() -> Path:
    for d in _LOCK_DIRS:
        if os.path.isdir(d) and os.access(d, os.W_OK):
            return Path(d) / "pytest-isolate-test-user.lock"
    return Path(tempfile.gettempdir()) / "pytest-isolate-test-user.lock"


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise HarnessError(f"{argv[0]} not found (apt-get install passwd)") from e
    if done.returncode != 0:
        raise HarnessError(
            f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}"
        )


def ensure_user(
    name: str = USER, subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")
) -> pwd.struct_passwd:
    """Create ``name`` if missing and make sure it owns subordinate uid and gid ranges.

    ``useradd`` grants the ranges itself on most systems (``SUB_UID_COUNT`` in login.defs); when
    it did not, a free range is added with ``usermod``. Check-then-act happens under a lock on a
    sidecar file, so concurrent runs (two CI jobs, two tox envs) do not race ``useradd``.
    """
    from filelock import FileLock  # a dependency of the project, only needed on the root side

    with FileLock(str(_lock_path()), timeout=60):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            _run(["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh", name])
            user = pwd.getpwnam(name)
        for path, flag in ((subuid, "--add-subuids"), (subgid, "--add-subgids")):
            text = path.read_text() if path.exists() else ""
            entries = parse_subids(text, str(path))
            if not ranges_of(entries, name, user.pw_uid):
                taken = [r for rs in entries.values() for r in rs]
                _run(["usermod", flag, free_range(taken).option(), name])
    if user.pw_uid == 0 or user.pw_gid == 0:
        raise HarnessError(f"user {name} has uid or gid 0: the rootless run would not be rootless")
    return user


# --- what to copy (reads metadata) --------------------------------------------------------------


def project_requirements(pyproject: Path) -> list[str]:
    """The ``[project] dependencies`` of the checkout: the roots of what the inner run imports."""
    try:
        data = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise HarnessError(f"{pyproject}: cannot read the project's dependencies: {e}") from e
    deps = data.get("project", {}).get("dependencies", [])
    return [str(d) for d in deps]


def dependency_closure(requirements: Iterable[str]) -> list[metadata.Distribution]:
    """Every installed distribution the requirements pull in, following markers and extras.

    Markers are evaluated for the running interpreter; the inner one has the same minor version
    and platform, so it would pick the same set (``colorama`` for Windows stays out, for example).
    """
    from packaging.requirements import Requirement  # pytest depends on packaging
    from packaging.utils import canonicalize_name

    seen: dict[str, metadata.Distribution] = {}
    wanted: set[tuple[str, str]] = set()  # (distribution, extra) pairs already expanded
    todo: list[tuple[Requirement, str]] = [(Requirement(r), "") for r in requirements]
    while todo:
        req, via_extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": via_extra}):
            continue
        key = canonicalize_name(req.name)
        try:
            dist = seen.get(key) or metadata.distribution(req.name)
        except metadata.PackageNotFoundError as e:
            raise HarnessError(
                f"{req.name} (needed by the tests) is not installed in {sys.prefix}"
            ) from e
        seen[key] = dist
        for extra in ("", *sorted(req.extras)):
            if (key, extra) in wanted:
                continue
            wanted.add((key, extra))
            todo.extend((Requirement(r), extra) for r in dist.requires or [])
    return sorted(seen.values(), key=lambda d: canonicalize_name(d.metadata["Name"]))


@dataclass(frozen=True)
class CopyStep:
    """Copy ``source`` (a file or a whole directory) to ``target``."""

    source: Path
    target: Path


def _distribution_steps(dist: metadata.Distribution, site: Path) -> Iterator[CopyStep]:
    name = dist.metadata["Name"]
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        # Its files are a path hook into a checkout, not the package: nothing to copy.
        raise HarnessError(f"{name} is an editable install; the rootless run needs a real one")
    files = dist.files
    if files is None:
        raise HarnessError(f"{name} has no RECORD of its files; reinstall it with pip")
    for rel in files:
        parts = PurePosixPath(str(rel)).parts
        # Scripts live beside site-packages (../../../bin) and a .pth is only read in a site
        # directory: neither is importable from PYTHONPATH.
        if not parts or parts[0] in ("..", "/") or ".." in parts or parts[-1].endswith(".pth"):
            continue
        source = Path(str(dist.locate_file(rel)))
        if source.is_file():
            yield CopyStep(source, site.joinpath(*parts))


def staging_plan(
    repo: Path, dists: Iterable[metadata.Distribution], tree: Path, site: Path
) -> list[CopyStep]:
    """What to copy where: the checkout's parts into ``tree``, each installed file into ``site``.

    Files are taken from each distribution's RECORD rather than whole top-level directories, so
    a shared ``__pycache__`` or a namespace directory brings only what belongs to the closure.
    Byte-code comes along: the inner interpreter has the same minor version and so the same cache
    tag, and the copies keep their mtimes, so imports do not recompile.
    """
    steps = [CopyStep(repo / part, tree / part) for part in REPO_PARTS if (repo / part).exists()]
    for dist in dists:
        steps.extend(_distribution_steps(dist, site))
    return steps


def project_dist_info(pyproject: Path) -> dict[str, str]:
    """The minimal ``*.dist-info`` of the project itself: name, version and entry points.

    The inner run imports the project from the copied sources, so without this it would not see
    the ``pytest11`` entry point that an installed pytest-isolate registers.
    """
    data = tomllib.loads(pyproject.read_text())["project"]
    name, version = data["name"], data["version"]
    files = {"METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}
    groups = dict(data.get("entry-points", {}))
    if "scripts" in data:
        groups["console_scripts"] = data["scripts"]
    if groups:
        files["entry_points.txt"] = "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
            for group, eps in groups.items()
        )
    dirname = f"{name.replace('-', '_')}-{version}.dist-info"
    return {f"{dirname}/{fname}": text for fname, text in files.items()}


def _place_file(source: Path, target: Path) -> None:
    """Hard-link when that is as good as a copy, else copy.

    A link is ten times faster on this kind of disk (1,700 files: 0.2 s against 2 s) and shares
    the mtime the byte-code checks. It is only as good as a copy when the file is root's, already
    readable by everyone and writable by no one else: then the user can read it and nothing more,
    and :func:`_open_up` has no reason to touch the shared inode.
    """
    st = source.stat()
    if st.st_uid == 0 and st.st_mode & 0o044 == 0o044 and not st.st_mode & 0o022:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another filesystem (EXDEV), a link limit: copy instead
    shutil.copy2(source, target)


def apply_plan(steps: Iterable[CopyStep]) -> None:
    """Carry out :func:`staging_plan`: whole directories are copied, single files placed."""
    for step in steps:
        step.target.parent.mkdir(parents=True, exist_ok=True)
        if step.source.is_dir():
            shutil.copytree(
                step.source,
                step.target,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".mypy_cache"),
                dirs_exist_ok=True,
            )
        else:
            _place_file(step.source, step.target)


# --- the scratch directory ----------------------------------------------------------------------


def traversable_by_others(path: Path) -> bool:
    """Can a user with no group in common reach into ``path`` (``o+x`` on it and every parent)?"""
    path = path.resolve()
    for p in (path, *path.parents):
        try:
            mode = p.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def scratch_root() -> Path:
    """A fresh 0755 directory the test user can reach: $TMPDIR if it can, else /tmp or /var/tmp.

    pytest's own ``tmp_path`` will not do: it lives under ``/tmp/pytest-of-root``, mode 0700.
    """
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp"):
        if os.path.isdir(base) and traversable_by_others(Path(base)):
            root = Path(tempfile.mkdtemp(prefix="isolate-rootless-", dir=base))
            root.chmod(0o755)
            return root
    raise HarnessError("no temporary directory that other users can traverse (tried $TMPDIR, /tmp)")


def remove_tree(root: Path) -> None:
    """Remove the scratch tree, including what the user made read-only.

    Files the user created (its home, its ``TMPDIR``, tmp_path trees, files owned by its
    sub-ids) are all inside ``root`` or its sibling :func:`user_tmp`. Root deletes them
    regardless of owner; a directory the user left without write or search permission is opened
    up and the removal retried.
    """

    def retry(path: str) -> None:
        for p in (os.path.dirname(path), path):
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)

    for top in (user_tmp(root), root):
        if not os.path.lexists(top):
            continue
        if sys.version_info >= (3, 12):
            shutil.rmtree(top, onexc=lambda _f, path, _e: retry(path))
        else:
            shutil.rmtree(top, onerror=lambda _f, path, _e: retry(path))


def user_tmp(root: Path) -> Path:
    """The user's ``TMPDIR``: beside ``root`` in the system's temporary directory, not inside it.

    As for any user, every directory from ``/tmp`` down to a test's ``tmp_path`` then belongs to
    the user. Rootless, a container writes there through overlayfs, whose copy-up recreates each
    parent directory with its owner; a parent owned by real root (``root`` here) cannot be, as
    root is not mapped in the user's namespace (EOVERFLOW).
    """
    return root.with_name(root.name + "-tmp")


@dataclass(frozen=True)
class Staged:
    """The scratch layout: sources in ``tree``, packages in ``site``, the user's own dirs."""

    root: Path
    tree: Path
    site: Path
    home: Path
    tmp: Path

    @property
    def pythonpath(self) -> list[Path]:
        return [self.tree, self.site]


def _open_up(top: Path) -> None:
    """Make everything under ``top`` readable (and dirs searchable) by others, nothing more.

    Hard links are skipped: :func:`_place_file` only links files that are readable already,
    and their inode is the installed file's.
    """
    for dirpath, _dirs, filenames in os.walk(top):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)
        for f in filenames:
            st = os.lstat(p := os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_mode & 0o444 != 0o444:
                os.chmod(p, st.st_mode | 0o444)


def stage(repo: Path, root: Path, user: pwd.struct_passwd) -> Staged:
    """Copy the checkout and the dependency closure under ``root`` for ``user`` to run.

    The copies stay owned by root, so the user's run cannot change what it tests; ``home``
    and ``tmp`` belong to the user, and pytest's ``tmp_path`` lands in ``tmp`` through
    ``TMPDIR``, so everything the run creates is under ``root`` or ``tmp`` (:func:`user_tmp`)
    and goes with them.
    """
    staged = Staged(root, root / "tree", root / "site", root / "home", user_tmp(root))
    for d in (staged.tree, staged.site):
        d.mkdir(mode=0o755)
    for d in (staged.home, staged.tmp):
        d.mkdir(mode=0o700)
        os.chown(d, user.pw_uid, user.pw_gid)
    pyproject = repo / "pyproject.toml"
    dists = dependency_closure(project_requirements(pyproject))
    apply_plan(staging_plan(repo, dists, staged.tree, staged.site))
    for rel, text in project_dist_info(pyproject).items():
        target = staged.site / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    _open_up(staged.tree)
    _open_up(staged.site)
    return staged


# --- the run ------------------------------------------------------------------------------------


def inner_interpreter(candidates: Iterable[str] | None = None) -> Path | None:
    """A system interpreter of *this* minor version that any user can execute, or None.

    The copied packages were installed for this minor version (byte-code tags, markers), and
    pyenv's interpreters sit under ``/root``, so only a system one of the same minor will do.
    """
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if candidates is None:
        candidates = (f"/usr/bin/{minor}", f"/usr/local/bin/{minor}")
    for c in candidates:
        p = Path(c)
        if p.is_file() and traversable_by_others(p) and p.resolve().stat().st_mode & stat.S_IXOTH:
            return p
    return None


def inner_command(python: Path, tests: Sequence[Path], marker: str = "rootless") -> list[str]:
    """The inner pytest run over the directories ``tests``.

    ``-S`` keeps the system's site-packages (Debian ships pytest plugins there) out: the run
    sees the standard library plus exactly the copied tree.
    """
    return [
        str(python),
        "-S",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-m",
        marker,
        *map(str, tests),
    ]


PASSED_THROUGH = ("PYTEST_ISOLATE_DEBIAN_TARBALL",)
"""Variables of the root side that the inner run keeps: they name inputs (files any user can
read, such as the Debian tarball ``.ci/run`` makes), not settings of the outer run."""


def inner_environment(
    user: pwd.struct_passwd,
    home: Path,
    tmp: Path,
    path: list[Path],
    outer: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A fresh environment: nothing of the root side (PYTEST_ADDOPTS, VIRTUAL_ENV) leaks in,
    except the :data:`PASSED_THROUGH` variables set in ``outer`` (default ``os.environ``)."""
    outer = os.environ if outer is None else outer
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": str(home),
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join(str(p) for p in path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "PY_COLORS": "0",
        **{name: outer[name] for name in PASSED_THROUGH if outer.get(name)},
    }


@dataclass(frozen=True)
class RunResult:
    returncode: int
    output: str
    timed_out: bool = False


def run_as(
    user: pwd.struct_passwd,
    argv: list[str],
    env: Mapping[str, str],
    cwd: Path,
    timeout: float,
) -> RunResult:
    """Run ``argv`` as ``user`` (real and effective ids, its groups), output merged.

    setpriv, not su/runuser: no PAM session and no login shell, just the id switch. The child
    gets its own process group, so a timeout kills every process it started.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise HarnessError("setpriv not found (apt-get install util-linux)")
    switch = [
        setpriv,
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--init-groups",
        "--",
    ]
    proc = subprocess.Popen(
        switch + argv,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return RunResult(proc.returncode, out)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return RunResult(proc.returncode, out, timed_out=True)
    finally:
        # Containers the run left behind belong to its session: end them with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


_SUMMARY = re.compile(r"^=+ (?P<body>.*?) in [0-9.]+s(?: \([0-9:]+\))? =+$")
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)")
_PLURAL = {"error": "errors", "warning": "warnings"}


def parse_summary(output: str) -> dict[str, int] | None:
    """The counts of pytest's final ``=== 1 passed, 2 skipped in 0.1s ===`` line, or None.

    ``error``/``errors`` and ``warning``/``warnings`` fold into the plural key.
    """
    for line in reversed(output.splitlines()):
        m = _SUMMARY.match(line.strip())
        if m is None:
            continue
        counts: dict[str, int] = {}
        for number, word in _COUNT.findall(m.group("body")):
            key = _PLURAL.get(word, word)
            counts[key] = counts.get(key, 0) + int(number)
        return counts
    return None


def verdict(result: RunResult, timeout: float) -> str | None:
    """Why the inner run does not count as a pass, or None when it does.

    Exit status 0 alone is not enough: a run where every test skipped (no user namespaces, a
    probe that is wrong as non-root) also exits 0 and would prove nothing.
    """
    if result.timed_out:
        return f"the rootless run took over {timeout:.0f}s and was killed"
    if result.returncode == 5:
        return "the rootless run selected no tests (exit status 5)"
    if result.returncode != 0:
        return f"the rootless run exited {result.returncode}"
    counts = parse_summary(result.output)
    if counts is None:
        return "no pytest summary line in the rootless run's output"
    if counts.get("failed", 0) or counts.get("errors", 0):
        return f"the rootless run had {counts.get('failed', 0)} failed, {counts.get('errors', 0)} errors"
    if not counts.get("passed", 0):
        return "no test passed in the rootless run"
    return None
