"""The log file of a detached container: one line per piece of output, streams kept apart.

The supervisor reads the container's stdout and stderr from two pipes and appends what arrives
as lines in the format of CRI / conmon's ``k8s-file`` driver::

    2024-05-01T10:00:00.123456Z stdout F hello world
    2024-05-01T10:00:00.123470Z stderr P half a li
    2024-05-01T10:00:00.223470Z stderr F ne

``F`` is a full line (its newline is implied), ``P`` a partial one that the next record of the
same stream continues. One file keeps the order in which output arrived across both streams,
and ``logs`` can still send each stream to its own place (docker's ``logs 2>/dev/null``) and
prefix timestamps. Everything is bytes: a container may write anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["STDERR", "STDOUT", "LogRecord", "encode", "parse", "tail"]

STDOUT, STDERR = "stdout", "stderr"
_STREAMS = {STDOUT.encode(), STDERR.encode()}


@dataclass(frozen=True)
class LogRecord:
    """Output of one stream: ``data`` ends with a newline when it completed a line."""

    time: str
    stream: str
    data: bytes


def encode(stream: str, chunk: bytes, time: str) -> bytes:
    """The log lines for ``chunk`` read from ``stream`` at ``time`` (pure).

    Each completed line is an ``F`` record; a trailing piece without its newline is a ``P``
    record. A carriage return stays part of the content.
    """
    if stream not in (STDOUT, STDERR):
        raise ValueError(f"unknown stream {stream!r}")
    out = []
    prefix = f"{time} {stream} ".encode()
    *lines, rest = chunk.split(b"\n")
    for line in lines:
        out.append(prefix + b"F " + line + b"\n")
    if rest:
        out.append(prefix + b"P " + rest + b"\n")
    return b"".join(out)


def parse(line: bytes) -> LogRecord | None:
    """One log line back as a record; ``None`` for a line that is not one (cut short by a
    crash while it was written)."""
    if not line.endswith(b"\n"):
        return None
    fields = line[:-1].split(b" ", 3)
    if len(fields) < 3 or fields[1] not in _STREAMS or fields[2] not in (b"F", b"P"):
        return None
    content = fields[3] if len(fields) == 4 else b""
    if fields[2] == b"F":
        content += b"\n"
    return LogRecord(fields[0].decode("ascii", "replace"), fields[1].decode(), content)


def records(lines: Iterable[bytes]) -> Iterator[LogRecord]:
    """The records of ``lines``, skipping any that are damaged."""
    for line in lines:
        record = parse(line)
        if record is not None:
            yield record


def tail(items: list[LogRecord], lines: int | None) -> list[LogRecord]:
    """The records that make the last ``lines`` lines of output, counted per line across both
    streams (a line split over ``P`` records counts once, as docker's ``--tail``)."""
    if lines is None:
        return items
    if lines <= 0:
        return []
    complete = 0
    for index in range(len(items) - 1, -1, -1):
        if items[index].data.endswith(b"\n"):
            complete += 1
            if complete > lines:
                return items[index + 1 :]
    return items
