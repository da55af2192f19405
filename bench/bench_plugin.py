"""Per-test cost of ``pytest --isolate`` next to plain pytest and pytest-forked, in one run.

    python bench/bench_plugin.py [--tests 300] [--rounds 3] [--python PY]

Runs a suite of N trivial tests as: plain pytest, ``--forked`` (pytest-forked), ``--isolate``
(host image) and ``-n 2 --isolate``; the columns are interleaved round by round, so machine noise
hits them alike. Reports the median wall time of each column and the per-test overhead over
plain pytest. ``--python`` is the interpreter of a venv that has pytest, pytest-forked,
pytest-xdist and this project installed (pytest-forked 1.7.5 breaks on pytest >= 9.2, so
the bench venv pins pytest 9.0; see bench/README.md).
"""

from __future__ import annotations

import argparse
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

COLUMNS = {
    "plain": [],
    "forked": ["--forked"],
    "isolate": ["--isolate"],
    "isolate -n 2": ["--isolate", "-n", "2"],
}


def run(python: str, suite: Path, extra: list[str]) -> float:
    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, str(suite)]
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--skip", action="append", default=[], help="a column to leave out")
    args = ap.parse_args()
    columns = {k: v for k, v in COLUMNS.items() if k not in args.skip}
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp) / "test_many.py"
        suite.write_text(SUITE.format(n=args.tests))
        times: dict[str, list[float]] = {k: [] for k in columns}
        for _ in range(args.rounds):
            for name, extra in columns.items():
                times[name].append(run(args.python, suite, extra))
    plain = statistics.median(times["plain"]) if "plain" in times else 0.0
    print(f"{args.tests} trivial tests, {args.rounds} rounds, medians:")
    for name, ts in times.items():
        med = statistics.median(ts)
        per_test = (med - plain) / args.tests * 1000
        print(f"  {name:14s} {med:7.2f} s   overhead per test over plain: {per_test:6.2f} ms")


if __name__ == "__main__":
    main()
