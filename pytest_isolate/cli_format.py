"""Pure helpers of the command line: docker's human sizes and ages, tables, and option values.

Nothing here touches the store or the terminal, so every rule is unit-tested on its own. The
spellings follow what a docker user reads every day: ``4.26MB`` (decimal units, three
significant digits), ``2 weeks ago``, columns padded to at least ten characters with three
spaces between them, ``…`` where text is cut.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime

from runtime.errors import SpecError

__all__ = [
    "ELLIPSIS",
    "docker_time",
    "human_age",
    "human_duration",
    "human_size",
    "parse_created",
    "parse_duration",
    "parse_size",
    "table",
    "truncate",
]

ELLIPSIS = "…"
_SIZE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
_BINARY = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(?:i?b)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhdw])", re.ASCII)
_MIN_WIDTH = 10
_PADDING = 3


def human_size(size: float) -> str:
    """Bytes as docker shows them: decimal units, three significant digits (``4.26MB``)."""
    if size < 0:
        raise ValueError(f"a size cannot be negative: {size}")
    value = float(size)
    unit = 0
    while unit < len(_SIZE_UNITS) - 1 and float(f"{value:.3g}") >= 1000:
        value /= 1000
        unit += 1
    return f"{value:.3g}{_SIZE_UNITS[unit]}"


def human_duration(seconds: float) -> str:
    """An elapsed time in docker's words: ``Less than a second``, ``About an hour``, ``3 weeks``."""
    secs = int(seconds)
    if secs < 1:
        return "Less than a second"
    if secs == 1:
        return "1 second"
    if secs < 60:
        return f"{secs} seconds"
    minutes = secs // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{secs // (365 * 86400)} years"


def parse_created(text: str | None) -> datetime | None:
    """An OCI ``created`` timestamp (RFC 3339, any fraction length) as an aware datetime."""
    if not text:
        return None
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        return None
    base, fraction, zone = match.groups()
    micro = (fraction or "0")[:6].ljust(6, "0")
    offset = "+00:00" if zone == "Z" else zone
    try:
        return datetime.fromisoformat(f"{base}.{micro}{offset}")
    except ValueError:
        return None


def human_age(created: str | None, now: datetime) -> str:
    """``2 weeks ago`` for a ``created`` timestamp, ``N/A`` when there is none."""
    when = parse_created(created)
    if when is None:
        return "N/A"
    return human_duration(max(0.0, (now - when).total_seconds())) + " ago"


def docker_time(created: str | None) -> str:
    """A timestamp as docker's ``CreatedAt`` prints it: ``2024-05-01 10:00:00 +0000 UTC``."""
    when = parse_created(created)
    if when is None:
        return ""
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def parse_size(text: str) -> int:
    """``10G``, ``512m``, ``1.5GiB``, ``2048``: bytes, with binary multiples (as docker's
    ``--max-used-space`` and ``--memory`` read them); :class:`SpecError` otherwise."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise SpecError(f"invalid size {text!r}: expected a number with an optional unit, e.g. 10G")
    number, unit = match.groups()
    return int(float(number) * _BINARY[unit.lower()])


def parse_duration(text: str) -> float:
    """``7d``, ``12h``, ``1h30m``, ``2w``, ``90s``: seconds; :class:`SpecError` otherwise."""
    stripped = text.strip()
    parts = _DURATION_PART.findall(stripped)
    if not parts or "".join(n + u for n, u in parts) != stripped:
        raise SpecError(
            f"invalid duration {text!r}: expected numbers with units s, m, h, d or w, e.g. 7d "
            "or 1h30m"
        )
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def truncate(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the last one an ellipsis when anything was cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + ELLIPSIS


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns as docker's CLI lays them out (at least ten wide, three apart)."""
    if not headers:
        return ""
    widths = [
        max(_MIN_WIDTH, max(len(r[i]) for r in [headers, *rows]) + _PADDING)
        for i in range(len(headers) - 1)
    ]
    lines = []
    for row in [headers, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append(("".join(cells) + row[-1]).rstrip())
    return "\n".join(lines) + "\n"
