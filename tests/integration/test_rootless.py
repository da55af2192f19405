"""The rootless run: the ``rootless``-marked integration tests, again, as an unprivileged user.

As root, :func:`test_rootless_tests_pass_as_an_unprivileged_user` copies the tree and its
installed dependencies to a scratch directory (see :mod:`tests.rootless_env`) and runs
``pytest -m rootless tests/integration tests/plugin`` there as the user ``isolate-test``. Everything else
in this file is what that inner run needs to prove it really is unprivileged, plus fast tests
of the harness's pure parts.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests import rootless_env as env

REPO = Path(__file__).resolve().parents[2]

INNER_FLAG = "PYTEST_ISOLATE_ROOTLESS_RUN"
"""Set in the inner run's environment: the self-check runs only there, the harness never does."""

INNER_TIMEOUT = 600.0


# --- the harness (outer, as root) ---------------------------------------------------------------


@pytest.mark.needs_root
def test_rootless_tests_pass_as_an_unprivileged_user() -> None:
    if os.environ.get(INNER_FLAG):
        pytest.skip("already inside the rootless run")
    python = env.inner_interpreter()
    if python is None:
        pytest.skip(
            f"no system python{sys.version_info.major}.{sys.version_info.minor} "
            "that an unprivileged user can run (the copied packages need the same minor version)"
        )
    user = env.ensure_user()
    root = env.scratch_root()
    try:
        staged = env.stage(REPO, root, user)
        environ = env.inner_environment(user, staged.home, staged.tmp, staged.pythonpath)
        environ[INNER_FLAG] = "1"
        argv = env.inner_command(
            python, [staged.tree / "tests" / "integration", staged.tree / "tests" / "plugin"]
        )
        result = env.run_as(user, argv, environ, cwd=staged.tree, timeout=INNER_TIMEOUT)
    finally:
        env.remove_tree(root)
    assert not root.exists() and not env.user_tmp(root).exists()

    problem = env.verdict(result, INNER_TIMEOUT)
    if problem is not None:
        command = " ".join(argv)
        pytest.fail(f"{problem}\n$ {command}  (as {user.pw_name})\n{result.output}", pytrace=False)


# --- the inner run's self-check (as the unprivileged user) --------------------------------------


@pytest.mark.rootless
def test_inner_run_is_unprivileged_and_can_create_a_user_namespace() -> None:
    if not os.environ.get(INNER_FLAG):
        pytest.skip("checks the harness itself; runs only inside the rootless run")
    from runtime import probe

    assert os.geteuid() != 0 and os.getuid() != 0
    status = Path("/proc/self/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(effective.split()[1], 16) == 0, f"the rootless run kept capabilities: {effective}"
    answer = probe.user_namespaces()
    assert answer, f"unshare(CLONE_NEWUSER) as {os.getuid()}: {answer.reason} (fix: {answer.fix})"


# --- the pure parts of the harness --------------------------------------------------------------


def test_parse_subids_keeps_owner_as_written_and_names_bad_lines() -> None:
    entries = env.parse_subids("# c\nalice:100000:65536\n1001:165536:65536\n\n")
    assert entries == {
        "alice": [env.IdRange(100000, 65536)],
        "1001": [env.IdRange(165536, 65536)],
    }
    assert env.ranges_of(entries, "bob", 1001) == [env.IdRange(165536, 65536)]
    assert env.ranges_of(entries, "carol", 1002) == []
    with pytest.raises(env.HarnessError, match=r"/etc/subgid:2: expected owner:start:count"):
        env.parse_subids("a:1:2\nbroken:1\n", "/etc/subgid")


def test_free_range_skips_every_granted_range() -> None:
    taken = [env.IdRange(165536, 65536), env.IdRange(100000, 65536), env.IdRange(300000, 10)]
    assert env.free_range(taken) == env.IdRange(231072, 65536)
    assert env.free_range([env.IdRange(100000, 10), env.IdRange(100020, 65536)], 10) == (
        env.IdRange(100010, 10)
    )
    assert env.free_range([]).option() == "100000-165535"


def test_parse_summary_reads_the_last_summary_line() -> None:
    out = (
        "===== 9 passed in 0.01s =====\n"
        "tests/x.py::t FAILED\n"
        "== 1 failed, 2 passed, 1 skipped, 1 error, 1 warning in 75.20s (0:01:15) ==\n"
    )
    assert env.parse_summary(out) == {
        "failed": 1,
        "passed": 2,
        "skipped": 1,
        "errors": 1,
        "warnings": 1,
    }
    assert env.parse_summary("=== 3 deselected in 0.01s ===") == {"deselected": 3}
    assert env.parse_summary("no summary here") is None


def test_verdict_wants_a_clean_exit_a_summary_and_a_pass() -> None:
    ok = "=== 1 passed, 8 deselected in 0.05s ==="
    assert env.verdict(env.RunResult(0, ok), 60) is None
    cases = {
        env.RunResult(0, ok, timed_out=True): "took over 60s",
        env.RunResult(5, "=== 9 deselected in 0.01s ==="): "selected no tests",
        env.RunResult(1, "=== 1 failed in 0.01s ==="): "exited 1",
        env.RunResult(0, "Killed"): "no pytest summary line",
        env.RunResult(0, "=== 1 passed, 1 error in 0.01s ==="): "0 failed, 1 errors",
        env.RunResult(0, "=== 3 skipped in 0.01s ==="): "no test passed",
    }
    for result, expected in cases.items():
        assert expected in (env.verdict(result, 60) or ""), result


def test_dependency_closure_follows_requirements_and_markers() -> None:
    names = {d.metadata["Name"].lower() for d in env.dependency_closure(["pytest-xdist"])}
    # xdist -> execnet, pytest -> pluggy, iniconfig, packaging; colorama is Windows-only.
    assert {"pytest-xdist", "execnet", "pytest", "pluggy", "iniconfig", "packaging"} <= names
    assert "colorama" not in names
    with pytest.raises(env.HarnessError, match="no-such-dist-xyz"):
        env.dependency_closure(["no-such-dist-xyz"])


def test_staging_plan_copies_record_files_into_site(tmp_path: Path) -> None:
    dist = metadata.distribution("iniconfig")
    steps = env.staging_plan(REPO, [dist], tmp_path / "tree", tmp_path / "site")
    targets = {s.target.relative_to(tmp_path).as_posix() for s in steps}
    assert "tree/runtime" in targets and "tree/pyproject.toml" in targets
    assert "site/iniconfig/__init__.py" in targets
    assert all(".." not in t.split("/") for t in targets)


def test_project_dist_info_registers_the_entry_points(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "pytest-isolate"\nversion = "1.2"\n'
        '[project.entry-points.pytest11]\nisolate = "pytest_isolate.plugin"\n'
        '[project.scripts]\npytest-isolate = "pytest_isolate.cli:main"\n'
    )
    files = env.project_dist_info(pyproject)
    assert "Name: pytest-isolate" in files["pytest_isolate-1.2.dist-info/METADATA"]
    entry_points = files["pytest_isolate-1.2.dist-info/entry_points.txt"]
    assert "[pytest11]\nisolate = pytest_isolate.plugin\n" in entry_points
    assert "[console_scripts]\npytest-isolate = pytest_isolate.cli:main\n" in entry_points


def test_traversable_by_others_needs_search_permission_on_every_parent(tmp_path: Path) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    for p in (tmp_path, tmp_path / "a", inner):
        p.chmod(0o755)
    # tmp_path sits under pytest's 0700 base directory, so even an open path is not reachable.
    assert env.traversable_by_others(inner) is env.traversable_by_others(tmp_path.parent)
    (tmp_path / "a").chmod(0o750)
    assert not env.traversable_by_others(inner)
    assert env.traversable_by_others(Path("/usr/bin"))
