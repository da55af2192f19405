"""What a detached container is on disk, and how a name or an id prefix finds one.

A detached container lives in an ordinary engine state directory (``<state root>/<id>/``, see
:mod:`runtime.state`) whose owner is its supervisor. Next to the engine's own files the
supervisor keeps:

* ``container.json``: the :class:`ContainerRecord` (id, name, image, command, state, exit
  code...), replaced atomically on every change, so ``ps`` reads it without asking anyone;
* ``container.log``: the container's output (:mod:`runtime.detached.logs`);
* ``ctl.sock``: the supervisor's socket (:mod:`runtime.detached.protocol`).

Whether a container exists is decided by the state lock, never by the record: a record whose
supervisor died is stale, and :func:`runtime.state.sweep` removes it with the directory.

The pure parts (ids, names, :func:`resolve`) take their inputs as arguments and are unit-tested
without processes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime import state
from runtime.errors import ContainerError, SpecError

__all__ = [
    "CREATED",
    "EXITED",
    "LOG",
    "RECORD",
    "RUNNING",
    "SOCKET",
    "ContainerRecord",
    "generate_name",
    "live_records",
    "new_id",
    "now",
    "read_record",
    "resolve",
    "validate_name",
    "write_record",
]

RECORD = "container.json"
LOG = "container.log"
SOCKET = "ctl.sock"

CREATED, RUNNING, EXITED = "created", "running", "exited"
STATES = (CREATED, RUNNING, EXITED)

SHORT = 12
"""Characters of an id that ``ps`` shows, as docker does."""

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


def now() -> str:
    """The current time as an RFC 3339 UTC timestamp (microseconds), like the records hold."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ContainerRecord:
    """A detached container's metadata, as its supervisor last wrote it."""

    id: str
    name: str
    image: str
    """The image as the user named it (``bb:1``, ``host``, ``./rootfs``)."""
    image_id: str | None
    """The store's image id; ``None`` for ``host`` and directories."""
    command: tuple[str, ...]
    created: str
    state: str = CREATED
    pid: int | None = None
    """The container's PID 1 as the host sees it, while it runs."""
    exit_code: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    supervisor: int | None = None
    """The supervisor's pid (for people; liveness is the state lock's job)."""
    stop_signal: str | None = None
    """The image's STOPSIGNAL; ``stop`` sends it (SIGTERM when unset)."""
    auto_remove: bool = False

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown container state {self.state!r}")

    @property
    def short_id(self) -> str:
        return self.id[:SHORT]

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def evolve(self, **changes: Any) -> ContainerRecord:
        return replace(self, **changes)

    def to_json(self) -> str:
        data = asdict(self)
        data["command"] = list(self.command)
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ContainerRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a container record is a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["command"] = tuple(known.get("command") or ())
        return cls(**known)


# --- ids and names (pure) -----------------------------------------------------------------------


def new_id(token: Callable[[int], str] = secrets.token_hex) -> str:
    """A random 64-hex-digit id whose short form is not all digits (docker avoids those too:
    a short id that looks like a number would be confusing next to pids and exit codes)."""
    while True:
        cid = token(32)
        if not cid[:SHORT].isdigit():
            return cid


def validate_name(name: str) -> str:
    """Docker's rule for container names; :class:`SpecError` names the bad one."""
    if not _NAME_RE.fullmatch(name):
        raise SpecError(
            f"invalid container name {name!r}: use two or more of [a-zA-Z0-9_.-], starting with "
            "a letter or digit"
        )
    return name


_ADJECTIVES = (
    "amber", "brave", "calm", "clever", "crisp", "dapper", "eager", "fuzzy", "gentle", "happy",
    "jolly", "keen", "lively", "lucid", "mellow", "nimble", "plucky", "quiet", "rapid", "serene",
    "sharp", "sturdy", "tidy", "vivid", "witty", "zesty",
)  # fmt: skip
_NOUNS = (
    "badger", "beaver", "condor", "dolphin", "falcon", "ferret", "gecko", "heron", "ibex",
    "jackal", "koala", "lemur", "lynx", "marmot", "narwhal", "ocelot", "otter", "panda",
    "puffin", "quokka", "raven", "salmon", "tapir", "walrus", "wombat", "yak",
)  # fmt: skip


def generate_name(
    taken: Iterable[str], choice: Callable[[Sequence[str]], str] | None = None
) -> str:
    """An ``adjective_animal`` name not in ``taken`` (a digit is appended when all are)."""
    pick = choice or secrets.choice
    used = set(taken)
    for attempt in range(64):
        name = f"{pick(_ADJECTIVES)}_{pick(_NOUNS)}"
        if attempt >= 16:
            name += str(attempt)
        if name not in used:
            return name
    raise ContainerError("could not find a free container name; give one with --name")


def resolve(records: Sequence[ContainerRecord], key: str) -> ContainerRecord:
    """The container ``key`` means: a full id, a name, or an id prefix that only one id has.

    Docker's order: an exact id, then an exact name, then a unique prefix. An unknown key and
    an ambiguous prefix are :class:`ContainerError`\\ s that name the key (and the candidates).
    """
    if not key:
        raise ContainerError("no container named ''")
    for r in records:
        if r.id == key:
            return r
    for r in records:
        if r.name == key:
            return r
    matches = [r for r in records if r.id.startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(f"{r.short_id} ({r.name})" for r in matches)
        raise ContainerError(f"container id prefix {key!r} is ambiguous: {names}")
    raise ContainerError(f"no such container: {key}")


# --- on disk ------------------------------------------------------------------------------------


def write_record(directory: Path, record: ContainerRecord) -> None:
    """Replace ``directory/container.json`` atomically (a reader sees the old or the new one)."""
    part = directory / f".{RECORD}.part"
    part.write_text(record.to_json())
    os.rename(part, directory / RECORD)


def read_record(directory: Path) -> ContainerRecord | None:
    """The record in ``directory``, or ``None`` when it has none (not a detached container, or
    one still being created) or it cannot be read (being removed)."""
    try:
        return ContainerRecord.from_json((directory / RECORD).read_text())
    except (OSError, ValueError, TypeError):
        return None


def live_records(root: Path) -> list[ContainerRecord]:
    """The detached containers under the state root ``root`` whose supervisor is alive, oldest
    first."""
    found = []
    for path, alive in state.iter_states(root):
        if not alive:
            continue
        record = read_record(path)
        if record is not None and record.id == path.name:
            found.append(record)
    return sorted(found, key=lambda r: (r.created, r.id))
