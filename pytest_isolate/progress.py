"""The progress display of ``pytest-isolate build``, fed by the builder's events.

Two displays, as ``docker build --progress``:

* ``plain``: every event is a line, BuildKit's plain format, which a docker user reads at a
  glance and CI logs keep whole::

      #2 [2/5] RUN make
      #2 0.412 cc -o app main.c
      #2 DONE 1.3s
      #3 [3/5] COPY app /usr/local/bin/
      #3 CACHED

* ``tty``: one line per step, rewritten in place while the step runs (its elapsed time and its
  latest output line, cut to the terminal's width), then left as the step's summary::

      => [2/5] RUN make                                     1.3s
      => CACHED [3/5] COPY app /usr/local/bin/              0.0s

``auto`` picks ``tty`` when the stream is a terminal (and ``TERM`` is not ``dumb``), else
``plain``. Both write to the stream they are given (stderr: stdout stays for ``-q``'s id). The
clock and the width are injected, so the rendering is tested without a terminal.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # the builder is imported only when a build runs
    from runtime.build.builder import BuildEvent

__all__ = ["PlainProgress", "TtyProgress", "label", "make_progress"]

Clock = Callable[[], float]
TICK = 0.1
"""Seconds between repaints of the running step's elapsed time on a terminal."""


def label(event: BuildEvent) -> str:
    """``[name 3/7] RUN make``: the stage (when it has a name), the step and the instruction."""
    named = event.stage and not event.stage.startswith("stage-")
    where = f"{event.stage} " if named else ""
    return f"[{where}{event.step}/{event.total}] {event.instruction}"


class PlainProgress:
    """Every event as a line (``--progress plain``)."""

    def __init__(self, out: TextIO, *, clock: Clock = time.monotonic) -> None:
        self._out = out
        self._clock = clock
        self._started: dict[int, float] = {}

    def __call__(self, event: BuildEvent) -> None:
        n = event.step
        if event.kind == "warning":
            line = f"WARNING: {event.text}"
        elif event.kind == "step":
            self._started[n] = self._clock()
            line = f"#{n} {label(event)}"
        elif event.kind == "output":
            line = f"#{n} {self._clock() - self._started.get(n, self._clock()):.3f} {event.text}"
        elif event.kind == "cached":
            line = f"#{n} CACHED"
        else:
            line = f"#{n} DONE {event.seconds:.1f}s"
        self._out.write(line + "\n")
        self._out.flush()

    def note(self, text: str) -> None:
        """A line after the steps (``writing image ...``)."""
        self._out.write(text + "\n")
        self._out.flush()

    def close(self, *, failed: bool = False) -> None:
        """Nothing is pending in a plain display."""


class TtyProgress:
    """One line per step, updated in place (``--progress auto`` on a terminal)."""

    def __init__(
        self,
        out: TextIO,
        *,
        clock: Clock = time.monotonic,
        width: Callable[[], int] | None = None,
        tick: float | None = TICK,
    ) -> None:
        self._out = out
        self._clock = clock
        self._width = width or (lambda: _terminal_width(out))
        self._lock = threading.Lock()
        self._current: BuildEvent | None = None
        self._started = 0.0
        self._last_output = ""
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if tick is not None:
            self._ticker = threading.Thread(
                target=self._tick, args=(tick,), name="build-progress", daemon=True
            )
            self._ticker.start()

    def __call__(self, event: BuildEvent) -> None:
        with self._lock:
            if event.kind == "warning":
                self._clear()
                self._out.write(f"WARNING: {event.text}\n")
                self._paint()
            elif event.kind == "step":
                self._current = event
                self._started = self._clock()
                self._last_output = ""
                self._paint()
            elif event.kind == "output":
                if event.text.strip():
                    self._last_output = event.text.strip()
                self._paint()
            else:
                prefix = "CACHED " if event.kind == "cached" else ""
                self._finish(prefix, event.seconds)
            self._out.flush()

    def note(self, text: str) -> None:
        with self._lock:
            self._clear()
            self._out.write(text + "\n")
            self._paint()
            self._out.flush()

    def close(self, *, failed: bool = False) -> None:
        """Stop repainting; a step still running is left marked ``ERROR`` (or interrupted)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self._current is not None:
                self._finish("ERROR " if failed else "CANCELED ", self._clock() - self._started)
            self._out.flush()

    # -- drawing (with the lock held)

    def _line(self, prefix: str, seconds: float, detail: str) -> str:
        width = max(20, self._width())
        assert self._current is not None
        timing = f"{seconds:.1f}s"
        head = f" => {prefix}{label(self._current)}"
        if detail:
            head += f"  | {detail}"
        room = width - len(timing) - 1
        if len(head) > room:
            head = head[: max(0, room - 1)] + "…"
        return head.ljust(room) + " " + timing

    def _clear(self) -> None:
        if self._current is not None:
            self._out.write("\r\x1b[K")

    def _paint(self) -> None:
        if self._current is None:
            return
        elapsed = self._clock() - self._started
        self._out.write("\r\x1b[K" + self._line("", elapsed, self._last_output))

    def _finish(self, prefix: str, seconds: float) -> None:
        if self._current is None:
            return
        self._out.write("\r\x1b[K" + self._line(prefix, seconds, "") + "\n")
        self._current = None

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if self._current is not None:
                    self._paint()
                    self._out.flush()


def _terminal_width(out: TextIO) -> int:
    """``$COLUMNS``, else the terminal's width, else 80 (a pty may report 0)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        width = os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):
        width = 0
    return width if width > 0 else 80


def make_progress(
    mode: str, out: TextIO, env: Mapping[str, str] | None = None
) -> PlainProgress | TtyProgress:
    """The display for ``--progress MODE`` (``auto``, ``plain`` or ``tty``) on ``out``."""
    environ = os.environ if env is None else env
    if mode == "auto":
        try:
            is_tty = out.isatty()
        except (AttributeError, ValueError):
            is_tty = False
        mode = "tty" if is_tty and environ.get("TERM", "") != "dumb" else "plain"
    if mode == "tty":
        return TtyProgress(out)
    return PlainProgress(out)
