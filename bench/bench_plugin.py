"""Per-test cost of ``pytest --isolate`` next to plain pytest and pytest-forked, in one run.

    python bench/bench_plugin.py [--tests 300] [--rounds 3] [--python PY] [--skip COLUMN]
    python bench/bench_plugin.py --breakdown [--shutdown-after-done] [--tests 300] [--python PY]

Runs a suite of N trivial tests as: plain pytest, ``--forked`` (pytest-forked), ``--isolate``
(host image), ``--isolate`` in a built image (a Dockerfile ``FROM host`` plus one ``RUN``, given
with ``--isolate-image``) and ``-n 2 --isolate``; the columns are interleaved round by round, so
machine noise hits them alike. Reports the median wall time of each column (and every run) and
the per-test overhead over plain pytest, both spread over the tests and as the slope between a
session of N tests and one of a single test (see :func:`timed_columns`). ``--python`` is the interpreter of a venv that has
pytest, pytest-forked, pytest-xdist and this project installed (pytest-forked 1.7.5 breaks on
pytest >= 9.2, so the bench venv pins pytest 9.0; see bench/README.md).

The built image lives in a private store under ``~/.cache`` (``PYTEST_ISOLATE_STORE``, set
for every column, removed at the end; see :func:`private_store`), built once before timing; a
one-test session then checks that a test really sees the file the ``RUN`` made, so the column
cannot silently time the host image. Each timed session still resolves the image once (a fully
cached build, tens of milliseconds), as a real session does.

``--breakdown`` runs each column but ``-n 2`` once more with this file loaded into pytest as a
plugin (``-p bench_plugin``, the *probe* below) and, when ``perf`` is installed, under
``perf stat`` (CPU time, minor page faults and context switches of the whole process tree). It
prints, per column, the median time of one test's protocol, the timeline of marks inside it,
the minor faults of the forked child and of the pytest process, and what a bare fork of the
pytest process and one copy-on-write fault cost in that same process. With
``--shutdown-after-done`` the probe also tries a what-if: the child ends its report stream right
after its ``done`` message (see ``SHUTDOWN_ENV``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SUITE = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_trivial(i):
    assert i >= 0
"""

MARK = "/etc/pytest-isolate-bench"
DOCKERFILE = f"""\
FROM host
RUN echo built > {MARK}
"""

CHECK = f"""\
from pathlib import Path


def test_in_the_built_image():
    assert Path({MARK!r}).read_text() == "built\\n"
"""

IMAGE_COLUMN = "isolate, built image"
XDIST_COLUMN = "isolate -n 2"
PERF_EVENTS = ("task-clock", "minor-faults", "context-switches")


def columns(dockerfile: Path) -> dict[str, list[str]]:
    return {
        "plain": [],
        "forked": ["--forked"],
        "isolate": ["--isolate"],
        IMAGE_COLUMN: ["--isolate", "--isolate-image", str(dockerfile)],
        XDIST_COLUMN: ["--isolate", "-n", "2"],
    }


def session_argv(python: str, suite: Path, extra: list[str]) -> list[str]:
    return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, str(suite)]


def run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return elapsed


def installed_env(tmp: Path, store: Path) -> dict[str, str]:
    """The sessions' environment: the bench's store, and bytecode as an installed package has.

    This machine sets ``PYTHONDONTWRITEBYTECODE``, and the project is an editable install:
    without bytecode every session would compile the modules it imports, a cost of the
    session (not of a test) that differs by column now that the plugin imports the engine
    only when a test needs one. Bytecode goes to a private ``PYTHONPYCACHEPREFIX``, written by
    untimed warm-up sessions.
    """
    env = {**os.environ, "PYTEST_ISOLATE_STORE": str(store)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    return env


@contextlib.contextmanager
def private_store() -> Iterator[Path]:
    """A store of the bench's own where a user's store lives (``~/.cache``), removed after.

    Not in ``/tmp``: an image on top of the host shows every directory beside the store's
    layers as an overlay of its own (the split layout, docs/engine.md), so the store's place
    changes the cost, and a sibling that another process deletes between a container's plan
    and its mounts fails that container's setup. ``~/.cache`` is where the plugin's store is
    unless ``PYTEST_ISOLATE_STORE`` or ``XDG_CACHE_HOME`` say otherwise.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="pytest-isolate-bench-", dir=cache))
    try:
        yield store
    finally:
        shutil.rmtree(store)


def build_image(python: str, tmp: Path, env: dict[str, str]) -> Path:
    """Build the column's image once (so no timed session builds it), then prove it is used."""
    context = tmp / "image"
    context.mkdir()
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(DOCKERFILE)
    subprocess.run(
        [python, "-m", "pytest_isolate", "build", "-q", str(context)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    check = tmp / "check" / "test_check.py"
    check.parent.mkdir()
    check.write_text(CHECK)
    run(session_argv(python, check, ["--isolate", "--isolate-image", str(dockerfile)]), env)
    return dockerfile


def timed_columns(
    args: argparse.Namespace, chosen: dict[str, list[str]], tmp: Path, env: dict[str, str]
) -> None:
    """Each column's session of N tests, and of one test right after it.

    Two measures of the per-test overhead: the N-test session's time over plain's, divided by
    N (what earlier sessions reported; it spreads each column's once-per-session cost, such as
    importing the engine, over the tests), and the *slope*, (N-test session - one-test
    session) / (N - 1) over plain's slope, which leaves every once-per-session cost out.
    """
    suite = tmp / "suite" / "test_many.py"
    one = tmp / "warm" / "test_warm.py"
    times: dict[str, list[float]] = {k: [] for k in chosen}
    slopes: dict[str, list[float]] = {k: [] for k in chosen}
    for _ in range(args.rounds):
        for col, extra in chosen.items():
            full = run(session_argv(args.python, suite, extra), env)
            single = run(session_argv(args.python, one, extra), env)
            times[col].append(full)
            slopes[col].append((full - single) / (args.tests - 1))
    plain = statistics.median(times["plain"]) if "plain" in times else 0.0
    plain_slope = statistics.median(slopes["plain"]) if "plain" in slopes else 0.0
    print(f"{args.tests} trivial tests, {args.rounds} rounds, medians (every run in s):")
    for col, ts in times.items():
        med = statistics.median(ts)
        per_test = (med - plain) / args.tests * 1000
        slope = (statistics.median(slopes[col]) - plain_slope) * 1000
        runs = " ".join(f"{t:.2f}" for t in ts)
        print(
            f"  {col:22s} {med:7.2f} s   overhead per test over plain: {per_test:6.2f} ms"
            f"   slope over plain's: {slope:6.2f} ms   [{runs}]"
        )
    if "plain" in times:
        # Load from other work comes and goes in bursts longer than one session; within one
        # round the columns ran back to back, so a round's differences are the fairer ones.
        print("overhead per test over plain, round by round (ms; slope in brackets):")
        for col, ts in times.items():
            rounds = [
                f"{(t - p) / args.tests * 1000:7.2f} [{(sl - psl) * 1000:5.2f}]"
                for t, p, sl, psl in zip(
                    ts, times["plain"], slopes[col], slopes["plain"], strict=True
                )
            ]
            print(f"  {col:22s} " + " ".join(rounds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--skip", action="append", default=[], help="a column to leave out")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="where a test's time goes (the probe, perf stat) instead of the timed columns",
    )
    ap.add_argument(
        "--shutdown-after-done",
        action="store_true",
        help="with --breakdown: a what-if, the child ends its report stream after 'done'",
    )
    args = ap.parse_args()
    if args.shutdown_after_done:
        os.environ[SHUTDOWN_ENV] = "1"
    if args.breakdown:
        args.skip.append(XDIST_COLUMN)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-plugin-") as name, private_store() as store:
        tmp = Path(name)
        env = installed_env(tmp, store)
        suite = tmp / "suite" / "test_many.py"
        suite.parent.mkdir()
        suite.write_text(SUITE.format(n=args.tests))
        dockerfile = tmp / "image" / "Dockerfile"
        if IMAGE_COLUMN not in args.skip:
            dockerfile = build_image(args.python, tmp, env)
        chosen = {k: v for k, v in columns(dockerfile).items() if k not in args.skip}
        warm = tmp / "warm" / "test_warm.py"
        warm.parent.mkdir()
        warm.write_text(SUITE.format(n=1))
        for extra in chosen.values():  # untimed: writes the bytecode every column imports
            run(session_argv(args.python, warm, extra), env)
        if args.breakdown:
            breakdown(args, chosen, tmp, env)
        else:
            timed_columns(args, chosen, tmp, env)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


# --- --breakdown: the probe's marks and perf stat, per column --------------------------------


def perf_stat(argv: list[str], out: Path) -> list[str]:
    """``argv`` under ``perf stat`` (counting the whole process tree), when perf is here."""
    if shutil.which("perf") is None:
        return argv
    return ["perf", "stat", "-x,", "-o", str(out), "-e", ",".join(PERF_EVENTS), "--", *argv]


def read_perf(path: Path) -> dict[str, float]:
    counters: dict[str, float] = {}
    if not path.exists():
        return counters
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) < 3 or line.startswith("#"):
            continue
        with contextlib.suppress(ValueError):
            counters[parts[2]] = float(parts[0])
    return counters


def _median(values: list[int] | None) -> float:
    return statistics.median(values) if values else float("nan")


def analyse(marks: list[list[Any]]) -> dict[str, Any]:
    """Per-test medians from the probe's marks (tests before ``WARMUP_TESTS`` left out)."""
    tests: dict[int, list[tuple[str, int, int, int]]] = {}
    for label, test, kind, value, minflt in marks:
        if test >= WARMUP_TESTS:
            tests.setdefault(test, []).append((label, kind, value, minflt))
    totals: list[float] = []
    deltas: dict[str, list[float]] = {}
    positions: dict[str, list[int]] = {}
    after: dict[str, list[float]] = {}
    before: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}
    segment_faults: dict[str, list[int]] = {}
    for entries in tests.values():
        points: list[tuple[int, str, int]] = []
        seen: dict[str, int] = {}
        for label, kind, value, minflt in entries:
            if kind in (FAULTS, COUNT):
                faults.setdefault(label, []).append(value)
                continue
            seen[label] = seen.get(label, 0) + 1
            name = label if seen[label] == 1 else f"{label} #{seen[label]}"
            points.append((value, name, minflt))
        points.sort()
        last_minflt: dict[str, int] = {}  # per process: "pytest" or "child"
        for _, label, minflt in points:
            who = label.partition(":")[0]
            if who in last_minflt:
                segment_faults.setdefault(label, []).append(minflt - last_minflt[who])
            last_minflt[who] = minflt
        times = {label: ns for ns, label, _ in points}
        begin, end = times.get("pytest: test begin"), times.get("pytest: test end")
        if begin is None or end is None:
            continue
        totals.append((end - begin) / 1e6)
        previous = begin
        for i, (ns, label, _) in enumerate(points):
            if ns < begin:  # the container started early, while the test before ran
                before.setdefault(label, []).append((begin - ns) / 1e6)
                continue
            if ns > end:
                after.setdefault(label, []).append((ns - end) / 1e6)
                continue
            if label != "pytest: test begin":
                deltas.setdefault(label, []).append((ns - previous) / 1e6)
                positions.setdefault(label, []).append(i)
            previous = ns
    order = sorted(deltas, key=lambda k: statistics.median(positions[k]))
    return {
        "tests": len(totals),
        "protocol_ms": statistics.median(totals) if totals else float("nan"),
        "timeline": [
            (k, statistics.median(deltas[k]), len(deltas[k]), _median(segment_faults.get(k)))
            for k in order
        ],
        "after_end": [(k, statistics.median(v), len(v)) for k, v in after.items()],
        "before_begin": sorted(
            ((k, statistics.median(v), len(v)) for k, v in before.items()), key=lambda e: -e[1]
        ),
        "faults": {k: statistics.median(v) for k, v in faults.items()},
    }


def breakdown(
    args: argparse.Namespace, chosen: dict[str, list[str]], tmp: Path, env: dict[str, str]
) -> None:
    env = {
        **env,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    suite = tmp / "suite" / "test_many.py"
    results: dict[str, dict[str, Any]] = {}
    for col, extra in chosen.items():
        out, perf_out = tmp / f"probe-{len(results)}.json", tmp / f"perf-{len(results)}.csv"
        argv = perf_stat(session_argv(args.python, suite, ["-p", "bench_plugin", *extra]), perf_out)
        wall = run(argv, {**env, PROBE_ENV: str(out)})
        data = json.loads(out.read_text())
        results[col] = {
            "wall_s": wall,
            "perf": read_perf(perf_out),
            "floors": data["floors"],
            "rss_kb": data["rss_kb"],
            **analyse(data["marks"]),
        }
    print_breakdown(args.tests, results)


def print_breakdown(n: int, results: dict[str, dict[str, Any]]) -> None:
    cols = list(results)
    print(
        f"\n{n} trivial tests, one session per column, medians over tests {WARMUP_TESTS + 1}..{n}"
    )
    print(f"{'':44s}" + "".join(f"{c[:16]:>17s}" for c in cols))

    def row(title: str, values: list[float | None], fmt: str = "{:17.2f}") -> None:
        cells = "".join(fmt.format(v) if v is not None else f"{'-':>17s}" for v in values)
        print(f"{title:44s}{cells}")

    row("wall of the session (s, with the probe)", [results[c]["wall_s"] for c in cols])
    row("one test's protocol (ms)", [results[c]["protocol_ms"] for c in cols])

    def fault(c: str, label: str) -> float | None:
        value = results[c]["faults"].get(label)
        return None if value is None else float(value)

    def parent_faults(c: str) -> float | None:
        begin, end = fault(c, "pytest: test begin"), fault(c, "pytest: test end")
        return None if begin is None or end is None else end - begin

    row("minor faults, pytest process, per test", [parent_faults(c) for c in cols], "{:17.0f}")
    row(
        "minor faults, child, until its _exit", [fault(c, "child: _exit") for c in cols], "{:17.0f}"
    )
    plain = results.get("plain", {}).get("perf", {})
    if plain:
        for event in PERF_EVENTS:
            unit = " (ms)" if event == "task-clock" else ""
            values: list[float | None] = []
            for c in cols:
                counters = results[c]["perf"]
                if event in counters and event in plain:
                    values.append((counters[event] - plain[event]) / n)
                else:
                    values.append(None)
            row(f"perf: {event}{unit} per test over plain", values)
    floors = results[cols[0]]["floors"]
    rss = results[cols[0]]["rss_kb"]
    print(
        f"\nin the pytest process (RSS {rss / 1024:.0f} MiB): fork + _exit + waitpid "
        f"{floors['fork_exit_wait_ms']:.2f} ms ({floors['fork_exit_wait_gc_frozen_ms']:.2f} with "
        f"gc.freeze()); one copy-on-write fault {floors['cow_fault_us']:.2f} us "
        f"({floors['cow_faults']} faults timed)"
    )
    for c in cols:
        res = results[c]
        print(
            f"\n{c}: timeline of one test (median ms to each mark from the previous one, and"
            " the minor faults its process took meanwhile)"
        )
        for label, ms, seen in res["before_begin"]:
            print(f"  -{ms:7.3f}  {label} (before the test's begin)  [{seen}]")
        for label, ms, seen, minflt in res["timeline"]:
            print(f"  {ms:8.3f}  {minflt:6.0f}  {label}  [{seen}]")
        for label, ms, seen in res["after_end"]:
            print(f"  +{ms:7.3f}  {label} (after the test's end)  [{seen}]")
        if "pytest: overlays" in res["faults"]:
            print(f"  overlays per container: {res['faults']['pytest: overlays']:.0f}")
        child = {k: v for k, v in res["faults"].items() if k.startswith("child")}
        if child:
            print(
                "  child's minor faults since its fork: "
                + ", ".join(f"{k.removeprefix('child: ')} {v:.0f}" for k, v in child.items())
            )


# --- the probe: a pytest plugin loaded into a measured session with `-p bench_plugin` --------
#
# Active only when $BENCH_PLUGIN_PROBE names the JSON file to write at the end of the session.
# It wraps functions of pytest, pytest-forked's fork and the plugin and engine (private names
# included: a diagnostic for a person reading numbers, not an API) so that the pytest process
# and its forked children write CLOCK_MONOTONIC marks and minor-fault counts to one pipe, each
# tagged with the test's index (a child inherits it with its memory; inside a container every
# child is PID 1, so a pid would not tell them apart).

PROBE_ENV = "BENCH_PLUGIN_PROBE"
SHUTDOWN_ENV = "BENCH_PLUGIN_SHUTDOWN_AFTER_DONE"
"""A what-if (``--shutdown-after-done``): the child ends its report stream right after
``done``, so the pytest process need not wait for the end of stream that the child's exit
gives (which comes only after the kernel has torn the container's namespaces down)."""
_MARK = struct.Struct("<40siBqq")
"""Label, test index, kind, value, the writer's minor faults so far; 61 bytes < PIPE_BUF: atomic."""
POINT, FAULTS, COUNT = 0, 1, 2
WARMUP_TESTS = 3
"""Tests left out of the per-test statistics (first image resolution, first container)."""


class _Probe:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.pid = os.getpid()
        self.test = -1
        self.buf = b""
        self.marks: list[tuple[str, int, int, int, int]] = []
        self.saved: list[tuple[object, str, object]] = []

    def _write(self, label: str, kind: int, value: int) -> None:
        who = "pytest" if os.getpid() == self.pid else "child"
        minflt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        os.write(
            self.w, _MARK.pack(f"{who}: {label}".encode()[:40], self.test, kind, value, minflt)
        )

    def point(self, label: str) -> None:
        self._write(label, POINT, time.monotonic_ns())

    def faults(self, label: str) -> None:
        self._write(label, FAULTS, resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def count(self, label: str, value: int) -> None:
        self._write(label, COUNT, value)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.r, 65536):
                self.buf += chunk
        n = len(self.buf) // _MARK.size * _MARK.size
        data, self.buf = self.buf[:n], self.buf[n:]
        for raw, test, kind, value, minflt in _MARK.iter_unpack(data):
            self.marks.append((raw.rstrip(b"\0").decode(), test, kind, value, minflt))

    def patch(self, owner: object, name: str, replacement: object) -> None:
        self.saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def wrap(
        self, owner: object, name: str, before: str | None = None, after: str | None = None
    ) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before:
                self.point(before)
            try:
                return original(*args, **kwargs)
            finally:
                if after:
                    self.point(after)

        self.patch(owner, name, wrapper)

    def restore(self) -> None:
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)
        self.saved.clear()


_PROBE: _Probe | None = None


def _install(probe: _Probe) -> None:
    """Wrap what one isolated (or forked) test goes through."""
    original_fork = os.fork

    def fork() -> int:
        probe.point("fork begin")
        pid = original_fork()
        if pid == 0:
            probe.point("child runs")
            probe.faults("child runs")
        else:
            probe.point("fork returned")
        return pid

    original_exit = os._exit

    def exit_(code: int) -> Any:
        if os.getpid() != probe.pid:
            probe.point("_exit")
            probe.faults("_exit")
        original_exit(code)

    probe.patch(os, "fork", fork)
    probe.patch(os, "_exit", exit_)
    from _pytest import runner

    probe.wrap(runner, "runtestprotocol", "runtestprotocol begin", "runtestprotocol end")
    try:
        from pytest_isolate import child, session, wire
        from runtime import _sys, launch, rootfs
        from runtime.engine import Container, Engine
    except ImportError:
        return
    probe.wrap(session, "_prepare_wider_scopes", None, "wider scopes set up")
    probe.wrap(session, "image_for", None, "image resolved")
    probe.wrap(Engine, "create", "create begin", "create end")
    probe.wrap(gc, "freeze", None, "gc frozen")
    probe.wrap(_sys, "unshare", "unshare begin", "unshare end")
    probe.wrap(rootfs, "apply", "mounts begin", "mounts end")
    original_plan = rootfs.plan_overlays

    def plan_overlays(*args: Any, **kwargs: Any) -> Any:
        layout = original_plan(*args, **kwargs)
        probe.count("overlays", len(layout.overlays))
        return layout

    probe.patch(rootfs, "plan_overlays", plan_overlays)
    probe.wrap(launch.ContainerProcess, "wait_ready", None, "ready received")
    probe.wrap(Engine, "collect", "collect begin", "collect end")
    probe.wrap(Container, "retire", "retire begin", "retire end")
    probe.wrap(session, "_run_in_container", None, "in-container part returned")
    original_early = session._launch_early

    def launch_early(*args: Any, **kwargs: Any) -> Any:
        probe.test += 1  # its marks and its child's belong to the next test
        try:
            return original_early(*args, **kwargs)
        finally:
            probe.test -= 1

    probe.patch(session, "_launch_early", launch_early)

    original_ready = launch._send_ready

    def send_ready(*args: Any) -> None:
        probe.faults("ready")
        probe.point("send ready")
        original_ready(*args)

    probe.patch(launch, "_send_ready", send_ready)

    original_run_item = child.run_item

    def run_item(*args: Any) -> None:
        probe.point("run_item begins")
        probe.faults("run_item begins")
        original_run_item(*args)

    probe.patch(child, "run_item", run_item)

    original_send = wire.send

    def send(sock: Any, kind: str, **payload: Any) -> None:
        original_send(sock, kind, **payload)
        what = f"{kind} {payload['report']['when']}" if kind == "report" else kind
        probe.point(f"sent {what}")
        if kind == "done":
            probe.faults("done")
            if os.environ.get(SHUTDOWN_ENV):
                sock.shutdown(socket.SHUT_WR)  # the what-if: end of stream now, not at exit

    probe.patch(wire, "send", send)

    original_receive = wire.receive

    def receive(sock: Any) -> Iterator[dict[str, Any]]:
        for msg in original_receive(sock):
            what = f"{msg['kind']} {msg['report']['when']}" if msg["kind"] == "report" else ""
            probe.point(f"got {what or msg['kind']}")
            yield msg

    probe.patch(wire, "receive", receive)


def pytest_configure(config: pytest.Config) -> None:
    global _PROBE
    out = os.environ.get(PROBE_ENV)
    if not out or _PROBE is not None:
        return
    _PROBE = _Probe(Path(out))
    _install(_PROBE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    probe = _PROBE
    if probe is None:
        return (yield)
    probe.drain()
    probe.test += 1
    probe.faults("test begin")
    probe.point("test begin")
    try:
        return (yield)
    finally:
        probe.point("test end")
        probe.faults("test end")


def pytest_unconfigure(config: pytest.Config) -> None:
    global _PROBE
    probe = _PROBE
    if probe is None:
        return
    _PROBE = None
    probe.restore()
    time.sleep(0.2)  # the last child's _exit mark
    probe.drain()
    result = {"marks": probe.marks, "floors": _floors(), "rss_kb": _rss_kb()}
    probe.out.write_text(json.dumps(result))
    os.close(probe.r)
    os.close(probe.w)


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _floors(n: int = 40) -> dict[str, Any]:
    """What a bare fork of this (pytest) process costs, and one copy-on-write fault."""
    bare: list[float] = []
    frozen: list[float] = []
    for samples, freeze in ((bare, False), (frozen, True)):
        for _ in range(n):
            if freeze:
                gc.freeze()
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            samples.append((time.perf_counter() - t0) * 1000)
            if freeze:
                gc.unfreeze()
    return {
        "fork_exit_wait_ms": statistics.median(bare),
        "fork_exit_wait_gc_frozen_ms": statistics.median(frozen),
        **_cow_fault_cost(),
    }


def _cow_fault_cost(pages: int = 8192) -> dict[str, float]:
    """Touch ``pages`` pages shared with the parent in a forked child: µs per fault.

    The child writes one byte per page twice: the first pass copies every page (a fault each),
    the second writes the copies (no fault), so the loop's own cost is subtracted.
    """
    size = resource.getpagesize()
    buf = bytearray(b"x" * (pages * size))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter_ns()
        for i in range(0, len(buf), size):
            buf[i] = 1
        t1 = time.perf_counter_ns()
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(0, len(buf), size):
            buf[i] = 2
        t2 = time.perf_counter_ns()
        os.write(w, struct.pack("<qqq", t1 - t0, t2 - t1, f1 - f0))
        os._exit(0)
    os.close(w)
    data = os.read(r, 24)
    os.close(r)
    os.waitpid(pid, 0)
    first, second, faults = struct.unpack("<qqq", data)
    return {"cow_faults": faults, "cow_fault_us": (first - second) / 1000 / max(1, faults)}


if __name__ == "__main__":
    main()
