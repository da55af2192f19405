"""How long a container takes, next to bwrap, a plain subprocess and a plain fork.

Run by hand, as root and (optionally) as an unprivileged user::

    .venv/bin/python bench/bench_engine.py --n 200
    .venv/bin/python bench/bench_engine.py --n 100 --breakdown
    setpriv --reuid isolate-test --regid isolate-test --init-groups \\
        env -i PATH=/usr/bin:/bin HOME=/tmp /usr/bin/python3 -B bench/bench_engine.py

Columns, all from this one warm Python process (modules imported, one ``Engine`` reused, as
the plugin reuses one for a whole session):

* ``engine_run``  ``Engine.run(ContainerSpec(Rootfs(host=True), argv=("/bin/true",)))``
* ``bwrap``       ``bwrap --unshare-all --ro-bind / / --proc /proc --dev /dev /bin/true``
* ``subprocess``  ``subprocess.run(["/bin/true"])``: what any process start costs
* ``engine_call`` ``Engine.call(ContainerSpec(Rootfs(host=True)), trivial)``
* ``fork_call``   ``os.fork()`` + pipe + ``waitpid`` running ``trivial`` and pickling its result

The columns run interleaved (A, B, C, A, B, C, ...), so a burst of load from other work on the
machine hits every column alike instead of one whole column.

``--breakdown`` times ``create`` / ``start`` / ``wait`` / ``remove`` separately (and the same
for a callable), and follows one extra, *marked* container per round through its stages: the
bench wraps engine functions so the parent and the stage processes (forks of this process)
write ``CLOCK_MONOTONIC`` timestamps to a pipe. Those wrappers reach into private names of
``runtime.launch``; they are diagnostics for a person reading the numbers, not an API. The
unmarked containers give the phase numbers; the marked ones only the timeline.

The bench checks that it leaves nothing behind: no state directory, no mount in its own mount
namespace, no child process. It exits 1 if it did.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import pickle
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime import (
    ContainerSpec,
    Engine,
    Rootfs,
    _sys,
    engine,
    idmap,
    launch,
    process,
    rootfs,
    state,
)

BWRAP_ARGV = (
    "--unshare-all",
    "--ro-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "/bin/true",
)
RUN_SPEC = ContainerSpec(Rootfs(host=True), argv=("/bin/true",))
CALL_SPEC = ContainerSpec(Rootfs(host=True))


def trivial() -> int:
    """The callable both ``engine_call`` and ``fork_call`` run."""
    return 42


# --- the columns -----------------------------------------------------------------------------


def fork_call(fn: Callable[[], Any]) -> Any:
    """The least a forked callable can cost: fork, run, pickle the result into a pipe, reap."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r)
            data = pickle.dumps(("ok", fn()))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    outcome = pickle.loads(b"".join(chunks))
    return outcome[1]


@dataclass
class Column:
    name: str
    run: Callable[[], None]
    skipped: str | None = None
    samples: list[float] = field(default_factory=list)


def make_columns(eng: Engine) -> list[Column]:
    def engine_run() -> None:
        status = eng.run(RUN_SPEC)
        if status.exit_code != 0:
            raise RuntimeError(f"engine_run: /bin/true {status}")

    bwrap = shutil.which("bwrap")

    def bwrap_run() -> None:
        assert bwrap is not None
        subprocess.run([bwrap, *BWRAP_ARGV], check=True)

    def plain() -> None:
        subprocess.run(["/bin/true"], check=True)

    def engine_call() -> None:
        if eng.call(CALL_SPEC, trivial) != 42:
            raise RuntimeError("engine_call: wrong result")

    def forked() -> None:
        if fork_call(trivial) != 42:
            raise RuntimeError("fork_call: wrong result")

    cols = [
        Column("engine_run", engine_run),
        Column("bwrap", bwrap_run),
        Column("subprocess", plain),
        Column("engine_call", engine_call),
        Column("fork_call", forked),
    ]
    if bwrap is None:
        cols[1].skipped = "bwrap not found on PATH (apt-get install bubblewrap)"
    else:
        probe = subprocess.run([bwrap, *BWRAP_ARGV], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            cols[1].skipped = f"bwrap cannot run here: {probe.stderr.strip() or probe.returncode}"
    return cols


# --- statistics ------------------------------------------------------------------------------


def summary(samples: list[float]) -> dict[str, float]:
    """Median, p90 (linear interpolation between closest ranks), min, mean; in ms."""
    xs = sorted(samples)
    return {
        "median_ms": statistics.median(xs),
        "p90_ms": statistics.quantiles(xs, n=10, method="inclusive")[8] if len(xs) > 1 else xs[0],
        "min_ms": xs[0],
        "mean_ms": statistics.fmean(xs),
        "n": len(xs),
    }


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


# --- leftovers -------------------------------------------------------------------------------


def private_state_root(base: Path | None) -> Path:
    """A state root of our own on the same tmpfs as the default one.

    Other work on the machine may run containers under the default root at the same time; a
    private root lets the leftover check tell our containers from theirs.
    """
    if base is not None:
        return base
    return state.default_root().parent / f"bench-{os.getpid()}" / "containers"


def leftovers(root: Path) -> list[str]:
    """What this run left behind: state directories, mounts under ``root``, child processes."""
    out = []
    if root.is_dir():
        out += [f"state directory left behind: {p}" for p in sorted(root.iterdir())]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if str(root) in line:
            out.append(f"mount left behind: {line}")
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        out.append(f"unreaped child process {pid}" if pid else "a child process is still running")
    except ChildProcessError:
        pass
    return out


def remove_private_root(root: Path, created: bool) -> None:
    """Remove the (empty) private root and the directory made for it."""
    if not created:
        return
    with contextlib.suppress(OSError):
        root.rmdir()
        root.parent.rmdir()


# --- breakdown: phases and marked stages -----------------------------------------------------


PHASES = ("create", "start", "wait", "remove")
CALL_PHASES = ("create", "start", "result", "remove")


def run_phases(eng: Engine, spec: ContainerSpec = RUN_SPEC) -> dict[str, float]:
    t = [time.perf_counter_ns()]
    c = eng.create(spec)
    try:
        t.append(time.perf_counter_ns())
        c.start()
        t.append(time.perf_counter_ns())
        status = c.wait()
        t.append(time.perf_counter_ns())
    finally:
        c.remove()
    t.append(time.perf_counter_ns())
    if status.exit_code != 0:
        raise RuntimeError(f"breakdown: /bin/true {status}")
    return {p: (t[i + 1] - t[i]) / 1e6 for i, p in enumerate(PHASES)}


def call_phases(eng: Engine, spec: ContainerSpec = CALL_SPEC) -> dict[str, float]:
    t = [time.perf_counter_ns()]
    c = eng.create(spec)
    try:
        t.append(time.perf_counter_ns())
        proc = c.start(target=trivial)
        t.append(time.perf_counter_ns())
        value = launch.callable_result(proc)
        t.append(time.perf_counter_ns())
    finally:
        c.remove()
    t.append(time.perf_counter_ns())
    if value != 42:
        raise RuntimeError("breakdown: wrong callable result")
    return {p: (t[i + 1] - t[i]) / 1e6 for i, p in enumerate(CALL_PHASES)}


_MARK = struct.Struct("<48sBq")  # label, kind (0 point in time, 1 duration), ns


class Marks:
    """Timestamps from the caller and from forked stage processes, through one pipe.

    A mark is one 57-byte write, below ``PIPE_BUF``: atomic, so several writers never interleave.
    """

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self._buf = b""

    def point(self, label: str) -> None:
        os.write(self.w, _MARK.pack(label.encode()[:48], 0, time.monotonic_ns()))

    def duration(self, label: str, ns: int) -> None:
        os.write(self.w, _MARK.pack(label.encode()[:48], 1, ns))

    def drain(self) -> tuple[list[tuple[str, int]], dict[str, int]]:
        """Points in time order and summed durations written since the last drain."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.r, 65536):
                self._buf += chunk
        n = len(self._buf) // _MARK.size * _MARK.size
        data, self._buf = self._buf[:n], self._buf[n:]
        points: list[tuple[str, int]] = []
        durations: dict[str, int] = {}
        for raw, kind, ns in _MARK.iter_unpack(data):
            label = raw.rstrip(b"\0").decode()
            if kind == 0:
                points.append((label, ns))
            else:
                durations[label] = durations.get(label, 0) + ns
        points.sort(key=lambda p: p[1])
        return points, durations

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _who() -> str:
    if os.getpid() == 1:
        return "init"
    return "caller" if os.getpid() == _CALLER_PID else "stage"


_CALLER_PID = os.getpid()


def _op_kind(op: rootfs.Op) -> str:
    if isinstance(op, rootfs.Mount):
        if op.fstype is None:
            return "bind mount"
        return f"mount {op.fstype}"
    return type(op).__name__


@contextlib.contextmanager
def marking(marks: Marks) -> Iterator[None]:
    """Wrap the engine's stage functions to write marks; restore them afterwards."""
    saved: list[tuple[object, str, object]] = []

    def wrap(owner: object, name: str, before: str | None, after: str | None) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before:
                marks.point(f"{_who()}: {before}")
            result = original(*args, **kwargs)
            if after:
                marks.point(f"{_who()}: {after}")
            return result

        saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    original_fork = os.fork

    def fork() -> int:
        pid = original_fork()
        marks.point(f"{_who()}: fork returned" if pid else f"{_who()}: forked child runs")
        return pid

    original_unshare = _sys.unshare

    def unshare(flags: int) -> None:
        names = [
            n
            for n, f in (
                ("user", _sys.CLONE_NEWUSER),
                ("mnt", _sys.CLONE_NEWNS),
                ("uts", _sys.CLONE_NEWUTS),
                ("ipc", _sys.CLONE_NEWIPC),
                ("net", _sys.CLONE_NEWNET),
                ("pid", _sys.CLONE_NEWPID),
                ("cgroup", _sys.CLONE_NEWCGROUP),
            )
            if flags & f
        ]
        what = "unshare " + "+".join(names)
        marks.point(f"{_who()}: {what} begin")
        original_unshare(flags)
        marks.point(f"{_who()}: {what} end")

    original_apply_one = rootfs._apply_one

    def apply_one(op: rootfs.Op, sys_: _sys.Syscalls) -> None:
        t0 = time.monotonic_ns()
        original_apply_one(op, sys_)
        marks.duration(_op_kind(op), time.monotonic_ns() - t0)

    original_exit = os._exit

    def exit_(code: int) -> Any:
        marks.point(f"{_who()}: _exit")
        original_exit(code)

    replacements: list[tuple[object, str, object]] = [
        (os, "fork", fork),
        (_sys, "unshare", unshare),
        (rootfs, "_apply_one", apply_one),
        (os, "_exit", exit_),
    ]
    for module, attr, fn in replacements:
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, fn)

    wrap(state, "create", "state dir begin", "state dir end")
    wrap(rootfs, "plan_overlays", None, "overlays planned")
    wrap(engine, "_prepare_state", None, "state prepared")
    wrap(rootfs, "plan_mounts", None, "mounts planned")
    wrap(launch, "_fork_into_new_pid_namespace", "fork into pid ns begin", None)
    wrap(idmap, "open_user_namespace", "user namespace begin", "user namespace end")
    wrap(launch, "_init", "init begins", None)
    wrap(rootfs, "apply", "mounts begin", "mounts end")
    wrap(_sys, "set_loopback_up", "loopback begin", "loopback end")
    wrap(process, "resolve_user", "resolve user begin", "resolve user end")
    wrap(launch, "_close_fds_except", "close fds begin", "close fds end")
    wrap(process, "drop_privileges", "drop privileges begin", "drop privileges end")
    wrap(os, "posix_spawn", "posix_spawn begin", "posix_spawn end")
    wrap(launch, "_send_ready", "send ready", None)
    wrap(launch, "_run_callable", "callable begins", None)
    wrap(os, "wait", None, "reaped")
    wrap(launch.ContainerProcess, "wait_ready", "wait_ready begin", "wait_ready end")
    wrap(launch, "_waitpid", "waitpid begin", "waitpid end")
    wrap(state.StateDir, "release", "release state begin", "release state end")
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def marked_run(
    eng: Engine, marks: Marks, call: bool
) -> tuple[list[tuple[str, float]], dict[str, int]]:
    """One container with marks: the timeline as (label, ms since previous mark)."""
    spec = CALL_SPEC if call else RUN_SPEC
    spec = dataclasses.replace(spec, pass_fds=(marks.w,))
    with marking(marks):
        marks.point("caller: create begin")
        c = eng.create(spec)
        try:
            marks.point("caller: start begin")
            if call:
                proc = c.start(target=trivial)
                marks.point("caller: result begin")
                launch.callable_result(proc)
                marks.point("caller: result end")
            else:
                c.start()
                marks.point("caller: wait begin")
                c.wait()
                marks.point("caller: wait end")
        finally:
            c.remove()
            marks.point("caller: remove end")
    points, durations = marks.drain()
    timeline = []
    for (_, t0), (label, t1) in itertools.pairwise(points):
        timeline.append((label, (t1 - t0) / 1e6))
    if points:
        timeline.insert(0, (points[0][0], 0.0))
    return timeline, durations


def aggregate_timelines(runs: list[list[tuple[str, float]]]) -> list[dict[str, Any]]:
    """Median time *to* each mark from the one before it, in the order marks usually come."""
    by_label: dict[str, list[float]] = {}
    position: dict[str, list[int]] = {}
    for tl in runs:
        for i, (label, ms) in enumerate(tl):
            by_label.setdefault(label, []).append(ms)
            position.setdefault(label, []).append(i)
    order = sorted(by_label, key=lambda k: statistics.median(position[k]))
    return [
        {
            "mark": k,
            "median_ms": statistics.median(by_label[k]),
            "seen": len(by_label[k]),
        }
        for k in order
    ]


# --- main ------------------------------------------------------------------------------------


def host_facts() -> dict[str, Any]:
    bwrap = shutil.which("bwrap")
    bwrap_version = ""
    if bwrap:
        bwrap_version = subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    return {
        "uid": os.getuid(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "bwrap": bwrap_version or None,
    }


def bench_columns(eng: Engine, n: int, warmup: int) -> dict[str, Any]:
    cols = make_columns(eng)
    active = [c for c in cols if c.skipped is None]
    for _ in range(warmup):
        for c in active:
            c.run()
    for _ in range(n):
        gc.collect()
        for c in active:
            c.samples.append(timed(c.run))
    result: dict[str, Any] = {"columns": {}, "ratios": {}}
    for c in cols:
        if c.skipped is not None:
            result["columns"][c.name] = {"skipped": c.skipped}
        else:
            result["columns"][c.name] = {**summary(c.samples), "samples_ms": c.samples}
    stats = result["columns"]
    for num, den in (("engine_run", "bwrap"), ("engine_call", "fork_call")):
        if "median_ms" in stats[num] and "median_ms" in stats[den]:
            result["ratios"][f"{num}/{den}"] = {
                "median": stats[num]["median_ms"] / stats[den]["median_ms"],
                "p90": stats[num]["p90_ms"] / stats[den]["p90_ms"],
                "median_diff_ms": stats[num]["median_ms"] - stats[den]["median_ms"],
            }
    return result


def fork_unshare_exit(flags: int) -> float:
    """ms for fork + ``unshare(flags)`` + ``_exit`` + ``waitpid``: the kernel's own price of the
    namespaces (creation and teardown), with no mounts and no Python work in the child."""
    t0 = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            if flags:
                _sys.unshare(flags)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    ms = (time.perf_counter_ns() - t0) / 1e6
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"unshare({flags:#x}) failed in the kernel-floor probe")
    return ms


def floor_flags(eng: Engine) -> dict[str, int]:
    """The namespace sets the floor compares: none, the engine's, one namespace at a time."""
    ns = eng._ns_flags
    user = 0 if os.geteuid() == 0 else _sys.CLONE_NEWUSER
    out = {"fork + _exit": 0, "all of the engine's namespaces": ns | user}
    for name, flag in (
        ("mnt", _sys.CLONE_NEWNS),
        ("uts", _sys.CLONE_NEWUTS),
        ("ipc", _sys.CLONE_NEWIPC),
        ("net", _sys.CLONE_NEWNET),
        ("pid", _sys.CLONE_NEWPID),
        ("cgroup", _sys.CLONE_NEWCGROUP),
    ):
        if ns & flag:
            out[f"{name} only" + (" (+user)" if user else "")] = flag | user
    if user:
        out["user only"] = user
    return out


def bench_breakdown(eng: Engine, n: int, warmup: int) -> dict[str, Any]:
    for _ in range(warmup):
        run_phases(eng)
        call_phases(eng)
    run_samples: dict[str, list[float]] = {p: [] for p in PHASES}
    call_samples: dict[str, list[float]] = {p: [] for p in CALL_PHASES}
    run_tl: list[list[tuple[str, float]]] = []
    call_tl: list[list[tuple[str, float]]] = []
    run_ops: dict[str, list[float]] = {}
    floors = floor_flags(eng)
    floor_samples: dict[str, list[float]] = {k: [] for k in floors}
    marks = Marks()
    try:
        for _ in range(n):
            gc.collect()
            for p, ms in run_phases(eng).items():
                run_samples[p].append(ms)
            for p, ms in call_phases(eng).items():
                call_samples[p].append(ms)
            tl, ops = marked_run(eng, marks, call=False)
            run_tl.append(tl)
            for kind, ns in ops.items():
                run_ops.setdefault(kind, []).append(ns / 1e6)
            tl, _ = marked_run(eng, marks, call=True)
            call_tl.append(tl)
            for k, flags in floors.items():
                floor_samples[k].append(fork_unshare_exit(flags))
    finally:
        marks.close()

    def phases(samples: dict[str, list[float]]) -> dict[str, Any]:
        out = {p: summary(xs) for p, xs in samples.items()}
        totals = [sum(xs) for xs in zip(*samples.values(), strict=True)]
        out["total"] = summary(totals)
        return out

    return {
        "run_phases": phases(run_samples),
        "call_phases": phases(call_samples),
        "run_timeline": aggregate_timelines(run_tl),
        "call_timeline": aggregate_timelines(call_tl),
        "kernel_floor": {k: summary(v) for k, v in floor_samples.items()},
        "mount_ops_ms": {
            k: {"median_ms": statistics.median(v), "seen": len(v)}
            for k, v in sorted(run_ops.items(), key=lambda kv: -statistics.median(kv[1]))
        },
    }


def print_columns(res: dict[str, Any]) -> None:
    print(f"{'column':<12} {'median':>9} {'p90':>9} {'min':>9} {'mean':>9}   (ms)")
    for name, s in res["columns"].items():
        if "skipped" in s:
            print(f"{name:<12} skipped: {s['skipped']}")
            continue
        print(
            f"{name:<12} {s['median_ms']:9.2f} {s['p90_ms']:9.2f} {s['min_ms']:9.2f} "
            f"{s['mean_ms']:9.2f}"
        )
    for name, r in res["ratios"].items():
        print(
            f"{name:<22} median x{r['median']:.2f} ({r['median_diff_ms']:+.2f} ms), "
            f"p90 x{r['p90']:.2f}"
        )


def print_breakdown(res: dict[str, Any]) -> None:
    for title, key in (("Engine.run phases", "run_phases"), ("Engine.call phases", "call_phases")):
        print(f"\n{title} (ms)")
        for p, s in res[key].items():
            print(f"  {p:<8} median {s['median_ms']:7.2f}   p90 {s['p90_ms']:7.2f}")
    for title, key in (
        ("Engine.run timeline (marked; ms since the previous mark)", "run_timeline"),
        ("Engine.call timeline (marked; ms since the previous mark)", "call_timeline"),
    ):
        print(f"\n{title}")
        for row in res[key]:
            print(f"  {row['median_ms']:7.3f}  {row['mark']}  [{row['seen']}]")
    print("\nkernel floor: fork + unshare + _exit + waitpid, no mounts (ms)")
    for k, s in res["kernel_floor"].items():
        print(f"  {k:<32} median {s['median_ms']:7.2f}   p90 {s['p90_ms']:7.2f}")
    print("\nmount plan ops in the init, summed per kind (ms, median per container)")
    for kind, s in res["mount_ops_ms"].items():
        print(f"  {s['median_ms']:7.3f}  {kind}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="timed repetitions (default 100)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="time create/start/wait/remove and the stages inside them instead of the columns",
    )
    ap.add_argument(
        "--state-root",
        type=Path,
        default=None,
        help="where containers keep state (default: a private directory next to the engine's)",
    )
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")

    root = private_state_root(args.state_root)
    eng = Engine(state_root=root)
    out: dict[str, Any] = {"host": {**host_facts(), "state_root": str(root)}, "n": args.n}
    out["warmup"] = args.warmup
    started = time.monotonic()
    try:
        if args.breakdown:
            out["breakdown"] = bench_breakdown(eng, args.n, args.warmup)
        else:
            out.update(bench_columns(eng, args.n, args.warmup))
    finally:
        problems = leftovers(root)
        if problems:
            print("\n".join(["leftovers:", *problems]), file=sys.stderr)
        else:
            remove_private_root(root, created=args.state_root is None)
    out["seconds"] = round(time.monotonic() - started, 1)
    out["host"]["loadavg_end"] = os.getloadavg()
    out["leftovers"] = problems

    if args.json:
        print(json.dumps(out, indent=1))
    else:
        h = out["host"]
        print(
            f"uid {h['uid']}, kernel {h['kernel']}, Python {h['python']}, {h['cpus']} cpus, "
            f"{h['bwrap'] or 'no bwrap'}, state in {h['state_root']}; n={args.n} "
            f"(+{args.warmup} warm-up), {out['seconds']} s, load "
            f"{h['loadavg_start'][0]:.2f} -> {h['loadavg_end'][0]:.2f}"
        )
        if args.breakdown:
            print_breakdown(out["breakdown"])
        else:
            print_columns(out)
        print("\nleftovers: " + ("; ".join(problems) if problems else "none"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
