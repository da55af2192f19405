"""Paired A/B of pytest sessions: variants interleaved round by round, one number each.

    python bench/ab_plugin.py --python PY [--rounds 5] [--tests 300] VARIANT [VARIANT ...]

A VARIANT is ``name`` or ``name:KEY=VALUE,KEY=VALUE`` (environment for that variant's
sessions) and, after ``|``, pytest arguments (default ``--isolate``): ``old:PYTHONPATH=/tmp/old``
runs another tree of this project (a ``git worktree`` of an older commit; ``PYTHONPATH`` comes
before the editable install), ``forked:|--forked`` runs pytest-forked. Each session runs N
trivial tests with this file loaded as a plugin (``-p ab_plugin``), which times each test from
``pytest_runtest_logstart`` to ``pytest_runtest_logfinish`` (not a hook wrapper: the plugin must
not change what it measures). Per variant it prints the median over rounds of each session's
median test, mean test and *span* (from the first test after the warm-up to the end of the
last, per test: the time between tests included, so the number a user waits for), and the
machine's busy CPU per test (``/proc/stat``, all CPUs: the helper, the containers and kernel
workers included). Interleaving matters here: this machine's speed moves by 20% within
minutes, so only variants measured side by side are compared, and the order of the variants
is shuffled every round (``--seed``): with a fixed rotation, one A/B gave a 0.9 ms gain in one
order and none in the reversed order (session 8). Two identical variants (``a`` and ``b``
with the same settings) show the noise: 0.5-1.1 ms apart after 6-8 rounds, on a test of
~11-13 ms. So only a difference that repeats, with the variants in other orders, counts.

Use the venv of ``bench_plugin.py`` (see README.md); bytecode is written to a private prefix as
there.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_trivial(i):
    assert i >= 0
"""
WARMUP_TESTS = 3
_RESULT = re.compile(r"ab_plugin: median=([\d.]+) mean=([\d.]+) span=([\d.]+)")


def _busy_ticks() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _variant(text: str) -> tuple[str, dict[str, str], list[str]]:
    head, _, args = text.partition("|")
    name, _, assignments = head.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return name, env, args.split() if args else ["--isolate"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--python", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tests", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="of the order of each round")
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    variants = [_variant(v) for v in args.variants]
    hz = os.sysconf("SC_CLK_TCK")
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp) / "test_ab.py"
        suite.write_text(SUITE.format(n=args.tests))
        base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        here = str(Path(__file__).resolve().parent)
        shuffler = random.Random(args.seed)
        for r in range(args.rounds):
            # A new order every round: no variant always runs first or after the same other
            # (a session runs differently after a pause, or after another variant's).
            order = list(variants)
            shuffler.shuffle(order)
            for name, env, pytest_args in order:
                path = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), here]))
                argv = [args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
                argv += ["-p", "ab_plugin", *pytest_args, str(suite)]
                busy = _busy_ticks()
                out = subprocess.run(
                    argv,
                    env={**base, **env, "PYTHONPATH": path},
                    cwd=tmp,
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout
                cpu = (_busy_ticks() - busy) / hz / args.tests * 1e3
                found = _RESULT.search(out)
                if found is None:
                    sys.exit(f"{name}: no result\n{out[-3000:]}")
                median, mean, span = (float(v) for v in found.groups())
                results[name].append((median, mean, span, cpu))
                print(
                    f"round {r} {name:12s} median {median:7.2f}  mean {mean:7.2f}  "
                    f"span {span:7.2f} ms  cpu {cpu:6.2f} ms"
                )
    print(f"\nmedians over {args.rounds} rounds, per test (ms):")
    for name, runs in results.items():
        median, mean, span, cpu = (statistics.median(col) for col in zip(*runs, strict=True))
        print(
            f"  {name:12s} median {median:7.2f}  mean {mean:7.2f}  span {span:7.2f}  "
            f"busy CPU {cpu:6.2f}"
        )


# --- the plugin side: loaded into each measured session with `-p ab_plugin` ----------------

_times: list[float] = []
_starts: list[float] = []
_end = [0.0]


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    _starts.append(time.perf_counter())


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    _end[0] = time.perf_counter()
    _times.append((_end[0] - _starts[-1]) * 1e3)


def pytest_terminal_summary(terminalreporter: object) -> None:
    """The median and mean test, and the span: from the first test after the warm-up to the
    end of the last, per test (what the user waits for, the time between tests included)."""
    if len(_times) > WARMUP_TESTS:
        times = _times[WARMUP_TESTS:]
        span = (_end[0] - _starts[WARMUP_TESTS]) * 1e3 / len(times)
        terminalreporter.write_line(  # type: ignore[attr-defined]
            f"ab_plugin: median={statistics.median(times):.3f} "
            f"mean={statistics.mean(times):.3f} span={span:.3f}"
        )


if __name__ == "__main__":
    main()
