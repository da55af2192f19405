"""The exchange commands of the command line: ``pull``, ``push``, ``login``, ``logout``, ``save``
and ``load``.

They are thin: the work is in :mod:`runtime.registry.transfer` (the distribution API),
:mod:`runtime.registry.credentials` (where logins live) and :mod:`runtime.image.archive`
(``docker save`` archives and OCI layouts). What is printed follows docker's non-interactive
output, one line per layer state change (``<id>: Pull complete``), because that is what CI logs
show and what a docker user reads at a glance; a terminal gets no byte counters on purpose,
the lines are the progress.

Exit status as for the image commands: 0 on success, 1 when the command failed.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from pytest_isolate.cli_build import add_insecure_option
from runtime.errors import SpecError

if TYPE_CHECKING:
    # Imported where a command runs: every `pytest-isolate` command parses this module's
    # options, and the registry client and archive code would add ~50 ms to each start.
    from runtime.image.manifest import Platform
    from runtime.image.store import Store
    from runtime.registry.transfer import TransferEvent

__all__ = ["add_commands", "event_line", "parse_platform"]

_SAVE_FORMATS = ("docker-archive", "oci-archive", "oci-dir")

_PULL_WORDS = {
    "waiting": "Waiting",
    "present": "Already exists",
    "downloading": "Pulling fs layer",
    "done": "Pull complete",
    "failed": "Failed",
}
_PUSH_WORDS = {
    "waiting": "Preparing",
    "exists": "Layer already exists",
    "mounted": "Mounted from another repository",
    "uploading": "Pushing",
    "done": "Pushed",
    "failed": "Failed",
}


# --- pure ------------------------------------------------------------------------------------


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` as docker's ``--platform`` takes it."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise SpecError(f"--platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64/v8")
    from runtime.image.manifest import Platform

    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def event_line(event: TransferEvent, words: dict[str, str]) -> str | None:
    """The line docker prints for a layer's new state; ``None`` for states it does not show."""
    word = words.get(event.state)
    if word is None:
        return None
    return f"{event.digest.removeprefix('sha256:')[:12]}: {word}"


class _Lines:
    """Prints each layer's state once when it changes (workers call it from several threads)."""

    def __init__(self, out: TextIO, words: dict[str, str], quiet: bool) -> None:
        self._out, self._words, self._quiet = out, words, quiet
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, event: TransferEvent) -> None:
        if self._quiet:
            return
        with self._lock:
            if self._seen.get(event.digest) == event.state:
                return
            self._seen[event.digest] = event.state
            line = event_line(event, self._words)
            if line is not None:
                print(line, file=self._out, flush=True)


# --- commands --------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    platform = parse_platform(args.platform) if args.platform else None
    from runtime.registry import transfer

    result = transfer.pull(
        store,
        args.reference,
        platform=platform,
        insecure=args.insecure,
        progress=_Lines(out, _PULL_WORDS, args.quiet),
    )
    if args.quiet:
        print(result.reference, file=out)
        return 0
    print(f"Digest: {result.digest}", file=out)
    print(
        f"Status: downloaded {result.downloaded} of {result.layers} layers for {result.reference}",
        file=out,
    )
    print(result.reference, file=out)
    return 0


def cmd_push(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    from runtime.registry import transfer

    result = transfer.push(
        store,
        args.image,
        args.destination or args.image,
        docker_format=args.format == "docker",
        insecure=args.insecure,
        progress=_Lines(out, _PUSH_WORDS, args.quiet),
    )
    print(
        f"{result.reference}: digest: {result.digest}"
        + (
            ""
            if args.quiet
            else f" (uploaded {result.uploaded}, mounted {result.mounted}, "
            f"existed {result.existed})"
        ),
        file=out,
    )
    return 0


def _password(args: argparse.Namespace, read_stdin: Callable[[], str]) -> str:
    if args.password is not None and args.password_stdin:
        raise SpecError("login: --password and --password-stdin exclude each other")
    if args.password_stdin:
        return read_stdin().rstrip("\r\n")
    if args.password is not None:
        return str(args.password)
    return getpass.getpass("Password: ")


def cmd_login(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    from runtime.registry import credentials
    from runtime.registry.client import Registry

    username = args.username
    if username is None:
        if args.password_stdin:
            raise SpecError("login: --password-stdin needs --username")
        username = input("Username: ")
    login = credentials.Credentials(username, _password(args, sys.stdin.read))
    # Checked before it is stored, as docker does: a typo must not be saved as a login.
    with Registry(args.server, insecure=args.insecure, credentials=lambda _: login) as registry:
        registry.ping(authenticate=True)
    path = credentials.store(args.server, login)
    print(f"Login Succeeded (saved in {path})", file=out)
    return 0


def cmd_logout(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    from runtime.registry import credentials

    if credentials.erase(args.server):
        print(f"Removing login credentials for {args.server}", file=out)
    else:
        print(f"Not logged in to {args.server}", file=out)
    return 0


def cmd_save(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    from runtime.image import archive

    if args.output is not None:
        archive.save(store, args.images, args.output, format=args.format)
        return 0
    if args.format == "oci-dir":
        raise SpecError("save --format oci-dir needs -o DIRECTORY")
    if out.isatty():
        raise SpecError("save: refusing to write an archive to a terminal; use -o FILE")
    # The archive is written whole, then copied: a failed save writes nothing to the pipe.
    with tempfile.TemporaryDirectory(prefix="pytest-isolate-save-") as work:
        path = os.path.join(work, "archive.tar")
        archive.save(store, args.images, path, format=args.format)
        out.flush()
        with open(path, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
        sys.stdout.buffer.flush()
    return 0


def cmd_load(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    from runtime.image import archive

    with contextlib.ExitStack() as stack:
        source = args.input
        if source is None:  # the loader reads archives by name: spool standard input first
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="pytest-isolate-load-"))
            source = os.path.join(work, "archive.tar")
            with open(source, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
        for name in archive.load(store, source):
            print(f"Loaded image: {name}", file=out)
    return 0


# --- parser ----------------------------------------------------------------------------------


def add_commands(sub: Any) -> None:
    """Add the exchange commands to the ``pytest-isolate`` sub-command parser ``sub``."""
    p = sub.add_parser(
        "pull",
        help="pull an image from a registry",
        description="Download an image (for this host's platform) into the store.",
    )
    p.add_argument("reference", metavar="NAME[:TAG|@DIGEST]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="default: this host's")
    p.add_argument("-q", "--quiet", action="store_true", help="only print the reference")
    add_insecure_option(p)
    p.set_defaults(handler=cmd_pull)

    p = sub.add_parser(
        "push",
        help="push an image to a registry",
        description="Upload an image: `push NAME[:TAG]`, or `push IMAGE DESTINATION` to push "
        "an image under another name (as `skopeo copy` does).",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("destination", nargs="?", metavar="DESTINATION")
    p.add_argument(
        "--format",
        choices=("oci", "docker"),
        default=None,
        help="manifest type for an image not pulled from a registry (default: oci; a pulled "
        "image keeps its own manifest)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only print the digest line")
    add_insecure_option(p)
    p.set_defaults(handler=cmd_push)

    p = sub.add_parser(
        "login",
        help="log in to a registry",
        description="Check credentials against a registry and save them for pull and push.",
    )
    p.add_argument("server", metavar="SERVER")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password", help="insecure: visible in the process list")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_insecure_option(p)
    p.set_defaults(handler=cmd_login)

    p = sub.add_parser(
        "logout", help="log out from a registry", description="Forget the saved login."
    )
    p.add_argument("server", metavar="SERVER")
    p.set_defaults(handler=cmd_logout)

    p = sub.add_parser(
        "save",
        help="save images to an archive",
        description="Write images to a `docker save` archive (default), an OCI layout tarball "
        "or an OCI layout directory.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", metavar="PATH", help="default: standard output")
    p.add_argument("--format", choices=_SAVE_FORMATS, default="docker-archive")
    p.set_defaults(handler=cmd_save)

    p = sub.add_parser(
        "load",
        help="load images from an archive",
        description="Load a `docker save` archive, an OCI layout tarball or directory.",
    )
    p.add_argument("-i", "--input", metavar="PATH", help="default: standard input")
    p.set_defaults(handler=cmd_load)
