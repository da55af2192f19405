"""The container commands: ``run -d`` and ``ps``, ``stop``, ``kill``, ``wait``, ``rm``, ``logs``,
``exec``, ``diff``, ``commit``, ``container prune``.

A detached container is held by its own supervisor process (:mod:`runtime.detached`), so these
commands work like docker's without a daemon: each finds the container by id, name or unique id
prefix in the user's state root (``$PYTEST_ISOLATE_STATE``, else a tmpfs such as
``/run/pytest-isolate``) and asks its supervisor. What to print is decided by pure functions
(:func:`ps_rows`, :func:`status_text`, :func:`command_text`) that the unit tests call directly.

Exit status: 0 on success; 1 when the command failed (for several containers: after doing the
others); ``exec`` and ``wait`` exit with the container command's code (``exec``: 126/127 when the
command cannot be run / found, as ``docker exec``); 2 for a command line that does not parse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from pytest_isolate.cli_format import (
    docker_time,
    human_duration,
    human_size,
    parse_created,
    table,
    truncate,
)
from pytest_isolate.cli_images import add_change_options
from runtime import state
from runtime.detached import client
from runtime.detached.record import EXITED, RUNNING, ContainerRecord
from runtime.errors import ExecError, IsolateError, SpecError
from runtime.image.store import Store
from runtime.spec import ContainerSpec, parse_env

if TYPE_CHECKING:  # the image module pulls in the Dockerfile parser: only for run
    from runtime.image.images import RunnableImage

__all__ = [
    "PsRow",
    "add_commands",
    "add_run_options",
    "command_text",
    "open_store",
    "ps_rows",
    "run_detached",
    "state_root",
    "status_text",
]

EXIT_FAILED = 1
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127
COMMAND_WIDTH = 20
"""``docker ps`` cuts COMMAND to this many characters unless ``--no-trunc``."""

DEFAULT_STOP_TIMEOUT = 10.0
"""Seconds ``stop`` waits before SIGKILL, as docker."""


def state_root() -> Path:
    """Where this user's containers live (see :func:`runtime.state.default_root`)."""
    return state.default_root()


def open_store() -> Store:
    """The user's store, told which images detached containers use: ``rmi`` of such an image
    needs ``-f`` and ``prune -a`` keeps it, as with docker."""
    root = state_root()
    return Store.open(os.environ, in_use=lambda iid: iid in client.images_in_use(root))


# --- pure: what to print ------------------------------------------------------------------------


def _since(start: str | None, now: datetime) -> float:
    when = parse_created(start)
    return 0.0 if when is None else max(0.0, (now - when).total_seconds())


def status_text(record: ContainerRecord, now: datetime) -> str:
    """Docker's STATUS column: ``Up 3 minutes``, ``Exited (137) 2 seconds ago``, ``Created``."""
    if record.state == RUNNING:
        return f"Up {human_duration(_since(record.started_at, now))}"
    if record.state == EXITED:
        return f"Exited ({record.exit_code}) {human_duration(_since(record.finished_at, now))} ago"
    return "Created"


def command_text(command: Sequence[str], no_trunc: bool) -> str:
    """Docker's COMMAND column: the argv joined by spaces, cut, in double quotes."""
    text = " ".join(command)
    return f'"{text if no_trunc else truncate(text, COMMAND_WIDTH)}"'


@dataclass(frozen=True)
class PsRow:
    """One line of ``ps``."""

    id: str
    image: str
    command: str
    created: str
    created_at: str
    status: str
    state: str
    name: str

    def cells(self) -> tuple[str, ...]:
        return (self.id, self.image, self.command, self.created, self.status, self.name)

    def as_json(self) -> dict[str, str]:
        """Docker's ``ps --format json`` fields that apply here."""
        return {
            "ID": self.id,
            "Image": self.image,
            "Command": self.command,
            "CreatedAt": self.created_at,
            "RunningFor": self.created,
            "Status": self.status,
            "State": self.state,
            "Names": self.name,
        }


def ps_rows(
    records: Sequence[ContainerRecord], now: datetime, *, all: bool, no_trunc: bool
) -> list[PsRow]:
    """The rows of ``ps`` (pure): running containers (``all``: every one), newest first."""
    rows = []
    for r in sorted(records, key=lambda r: (r.created, r.id), reverse=True):
        if not all and r.state != RUNNING:
            continue
        rows.append(
            PsRow(
                id=r.id if no_trunc else r.short_id,
                image=r.image,
                command=command_text(r.command, no_trunc),
                created=f"{human_duration(_since(r.created, now))} ago",
                created_at=docker_time(r.created),
                status=status_text(r, now),
                state=r.state,
                name=r.name,
            )
        )
    return rows


# --- run -d -------------------------------------------------------------------------------------


def add_run_options(run: argparse.ArgumentParser) -> None:
    """``run``'s options for detached containers."""
    run.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="run the container in the background and print its id",
    )
    run.add_argument("--name", default=None, help="a name for the container (unique)")


def run_detached(
    spec: ContainerSpec, image: RunnableImage, args: argparse.Namespace, out: TextIO | None = None
) -> int:
    """``run -d``: start ``spec`` under a supervisor, print the container's id (on ``out``,
    default ``sys.stdout``)."""
    if args.tty or args.interactive:
        raise SpecError(
            "run -d cannot be combined with -t or -i: a detached container has no terminal or "
            "stdin to attach to"
        )
    from runtime.detached.supervisor import Launch  # the engine's code, only when one runs

    launch = Launch(
        spec=spec,
        state_root=str(state_root()),
        image=args.image,
        image_id=image.image_id,
        name=args.name,
        stop_signal=image.config.container.stop_signal,
        auto_remove=args.rm,
    )
    record = client.start(launch)
    (out or sys.stdout).write(record.id + "\n")
    return 0


# --- the commands -------------------------------------------------------------------------------


def _each(
    keys: Sequence[str], err: TextIO, action: Callable[[Path, ContainerRecord, str], None]
) -> int:
    """Run ``action`` for each container named; report failures and go on, as docker does."""
    root = state_root()
    status = 0
    for key in keys:
        try:
            action(root, client.find(root, key), key)
        except IsolateError as e:
            err.write(f"pytest-isolate: {e}\n")
            status = EXIT_FAILED
    return status


def cmd_ps(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    records = client.containers(state_root())
    now = datetime.now(UTC)
    rows = ps_rows(records, now, all=args.all, no_trunc=args.no_trunc)
    if args.quiet:
        out.writelines(f"{r.id}\n" for r in rows)
    elif args.format == "json":
        out.writelines(json.dumps(row.as_json()) + "\n" for row in rows)
    else:
        out.write(
            table(
                ("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES"),
                [r.cells() for r in rows],
            )
        )
    return 0


def cmd_stop(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    timeout = None if args.time < 0 else float(args.time)

    def stop(root: Path, record: ContainerRecord, key: str) -> None:
        client.stop(root, record, timeout, args.signal)
        out.write(f"{key}\n")

    return _each(args.containers, err, stop)


def cmd_kill(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    def kill(root: Path, record: ContainerRecord, key: str) -> None:
        client.kill(root, record, args.signal)
        out.write(f"{key}\n")

    return _each(args.containers, err, kill)


def cmd_wait(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    def wait(root: Path, record: ContainerRecord, key: str) -> None:
        out.write(f"{client.wait(root, record)}\n")
        out.flush()

    return _each(args.containers, err, wait)


def cmd_rm(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    def rm(root: Path, record: ContainerRecord, key: str) -> None:
        client.remove(root, record, force=args.force)
        out.write(f"{key}\n")

    return _each(args.containers, err, rm)


def cmd_logs(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    root = state_root()
    record = client.find(root, args.container)
    streams = {"stdout": out, "stderr": err}
    for item in client.read_logs(root, record, follow=args.follow, tail=args.tail):
        target = streams[item.stream]
        data = item.data
        if args.timestamps:
            data = item.time.encode() + b" " + data
        buffer = getattr(target, "buffer", None)
        if buffer is not None:
            target.flush()
            buffer.write(data)
            buffer.flush()
        else:
            target.write(data.decode(errors="replace"))
        if args.follow:
            target.flush()
    return 0


def cmd_exec(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    if args.tty:
        raise SpecError("exec -t is not supported: commands run without a terminal; drop -t")
    if not args.cmd:
        raise SpecError("exec needs a COMMAND after the CONTAINER")
    root = state_root()
    record = client.find(root, args.container)
    stdin = 0 if args.interactive else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    out.flush()
    err.flush()
    try:
        return client.exec_in(
            root,
            record,
            args.cmd,
            (stdin, _fileno(out, 1), _fileno(err, 2)),
            env=parse_env(args.env, os.environ),
            cwd=args.workdir,
            user=args.user,
        )
    except ExecError as e:
        err.write(f"pytest-isolate: {e}\n")
        return EXIT_NOT_FOUND if e.errno == 2 else EXIT_CANNOT_EXEC
    finally:
        if stdin != 0:
            os.close(stdin)


def _fileno(stream: TextIO, default: int) -> int:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return default


def cmd_diff(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    root = state_root()
    out.writelines(f"{c}\n" for c in client.diff(root, client.find(root, args.container)))
    return 0


def cmd_commit(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    root = state_root()
    record = client.find(root, args.container)
    image_id = client.commit(
        root,
        record,
        store.root,
        args.repository,
        changes=args.changes,
        message=args.message or "",
        author=args.author,
    )
    out.write(image_id + "\n")
    return 0


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def cmd_container_prune(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    root = state_root()
    deleted: list[str] = []
    freed = 0
    status = 0
    for record in client.containers(root):
        if record.state != EXITED:
            continue
        size = _tree_size(root / record.id)
        try:
            client.remove(root, record)
        except IsolateError as e:
            err.write(f"pytest-isolate: {e}\n")
            status = EXIT_FAILED
            continue
        deleted.append(record.id)
        freed += size
    if deleted:
        out.write("Deleted Containers:\n")
        out.writelines(f"{cid}\n" for cid in deleted)
        out.write("\n")
    out.write(f"Total reclaimed space: {human_size(freed)}\n")
    return status


# --- the command line ---------------------------------------------------------------------------


def _containers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("containers", nargs="+", metavar="CONTAINER", help="id, name or id prefix")


def _tail(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', not {text!r}") from e


def add_commands(sub: Any) -> None:
    """Add the container commands to the ``pytest-isolate`` sub-command parser ``sub``."""
    p = sub.add_parser(
        "ps",
        help="list containers",
        description="List detached containers (run -d), newest first; -a includes stopped ones.",
    )
    p.add_argument("-a", "--all", action="store_true", help="show stopped containers too")
    p.add_argument("-q", "--quiet", action="store_true", help="only show container ids")
    p.add_argument("--no-trunc", action="store_true", help="do not cut ids and commands")
    p.add_argument("--format", choices=("table", "json"), default="table", help="table or json")
    p.set_defaults(handler=cmd_ps)

    p = sub.add_parser(
        "stop",
        help="stop running containers",
        description=(
            "Send the image's STOPSIGNAL (default SIGTERM) to each container's PID 1, then "
            "SIGKILL after the timeout. A stopped container keeps its files: diff, commit, logs "
            "and rm still work on it."
        ),
    )
    p.add_argument(
        "-t",
        "--time",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        metavar="SECONDS",
        help="seconds to wait before SIGKILL (default 10; -1 waits for ever)",
    )
    p.add_argument("-s", "--signal", default=None, help="signal to send instead of STOPSIGNAL")
    _containers_arg(p)
    p.set_defaults(handler=cmd_stop)

    p = sub.add_parser(
        "kill",
        help="signal running containers",
        description="Send a signal (default SIGKILL) to each container's PID 1.",
    )
    p.add_argument("-s", "--signal", default=None, help="signal to send (default SIGKILL)")
    _containers_arg(p)
    p.set_defaults(handler=cmd_kill)

    p = sub.add_parser(
        "wait",
        help="wait for containers to stop, print their exit codes",
        description="Block until each container stops; print its exit code.",
    )
    _containers_arg(p)
    p.set_defaults(handler=cmd_wait)

    p = sub.add_parser(
        "rm",
        help="remove containers",
        description=(
            "Remove containers with everything they hold (files, log, supervisor). A running "
            "container needs -f, which kills it."
        ),
    )
    p.add_argument("-f", "--force", action="store_true", help="kill and remove a running one")
    _containers_arg(p)
    p.set_defaults(handler=cmd_rm)

    p = sub.add_parser(
        "logs",
        help="show a container's output",
        description="Show what the container wrote: its stdout on stdout, its stderr on stderr.",
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep going until it stops")
    p.add_argument("-t", "--timestamps", action="store_true", help="prefix each line's time")
    p.add_argument("-n", "--tail", type=_tail, default=None, metavar="N", help="last N lines")
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(handler=cmd_logs)

    p = sub.add_parser(
        "exec",
        help="run a command in a running container",
        description=(
            "Run a command in a running container, with this command's stdout and stderr (and "
            "stdin with -i); exits with the command's code."
        ),
        usage="pytest-isolate exec [OPTIONS] CONTAINER COMMAND [ARG...]",
    )
    p.add_argument("-i", "--interactive", action="store_true", help="pass STDIN to the command")
    p.add_argument("-t", "--tty", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable")
    p.add_argument("-w", "--workdir", default=None, metavar="DIR", help="working directory")
    p.add_argument("-u", "--user", default=None, metavar="USER[:GROUP]", help="user")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="COMMAND")
    p.set_defaults(handler=cmd_exec)

    p = sub.add_parser(
        "diff",
        help="show a container's filesystem changes",
        description="List what the container added (A), changed (C) and deleted (D).",
    )
    p.add_argument("container", metavar="CONTAINER")
    p.set_defaults(handler=cmd_diff)

    p = sub.add_parser(
        "commit",
        help="make an image of a container's changes",
        description=(
            "Make a new image from a container's changes (running or stopped), on top of its "
            "image. Prints the image id."
        ),
    )
    p.add_argument("-a", "--author", default=None, help="author of the image")
    add_change_options(p)
    p.add_argument(
        "-p", "--pause", action="store_true", help="accepted for docker habits (not paused)"
    )
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("repository", nargs="?", metavar="REPOSITORY[:TAG]")
    p.set_defaults(handler=cmd_commit)

    p = sub.add_parser(
        "container",
        help="manage containers (prune)",
        description="Commands on all containers.",
    )
    commands = p.add_subparsers(dest="container_command", required=True, metavar="COMMAND")
    prune = commands.add_parser(
        "prune",
        help="remove all stopped containers",
        description="Remove every stopped container, with everything it holds.",
    )
    prune.add_argument("-f", "--force", action="store_true", help="accepted for docker habits")
    prune.set_defaults(handler=cmd_container_prune)
