"""The docker-like command line: ``pytest-isolate run|...`` on the same engine as the plugin.

Exit status follows docker: the container's own code, 128+N for a death by signal N, 125 when
the container could not be set up, 126/127 when the command cannot be executed / found.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from runtime import ContainerSpec, Engine, Rootfs
from runtime.errors import ExecError, IsolateError, SpecError
from runtime.spec import HOST, parse_env, parse_tmpfs, parse_volume

EXIT_SETUP = 125
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pytest-isolate",
        description="Run processes in hermetic Linux namespace containers (no daemon needed).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a command in a new container",
        description="Run a command in a new container, like `docker run`.",
        usage="pytest-isolate run [OPTIONS] IMAGE COMMAND [ARG...]",
    )
    run.add_argument(
        "--rm", action="store_true", help="remove the container when it exits (default)"
    )
    run.add_argument("-i", "--interactive", action="store_true", help="keep STDIN open")
    run.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-TTY")
    run.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="set an environment variable",
    )
    run.add_argument(
        "-w",
        "--workdir",
        default=None,
        metavar="DIR",
        help="working directory inside the container",
    )
    run.add_argument(
        "-u", "--user", default=None, metavar="USER[:GROUP]", help="user name or uid (and group)"
    )
    run.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="SRC:DST[:ro]",
        help="bind mount a host path",
    )
    run.add_argument(
        "--tmpfs", action="append", default=[], metavar="DST[:OPTS]", help="mount a tmpfs"
    )
    run.add_argument("--hostname", default="isolate", help="container host name")
    run.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    run.add_argument(
        "--userns",
        choices=("auto", "host", "private"),
        default="auto",
        help="user namespace: private (always), host (root only), auto (private unless root)",
    )
    run.add_argument(
        "--init",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a tiny init as PID 1 that forwards signals and reaps zombies (default: on)",
    )
    run.add_argument("image", metavar="IMAGE", help="'host', or a root filesystem directory")
    run.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="COMMAND", help="command and arguments"
    )
    return p


def _rootfs(image: str) -> Rootfs:
    if image == HOST:
        return Rootfs(host=True)
    if os.path.isdir(image):
        return Rootfs(lowers=(os.path.abspath(image),))
    raise SpecError(
        f"no such image or root filesystem directory: {image!r} "
        "(use 'host' or a directory holding a root filesystem)"
    )


def _run(args: argparse.Namespace) -> int:
    if not args.cmd:
        raise SpecError("run needs a COMMAND after the IMAGE")
    spec = ContainerSpec(
        rootfs=_rootfs(args.image),
        argv=tuple(args.cmd),
        env={
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            **parse_env(args.env, os.environ),
        },
        cwd=args.workdir or "/",
        user=args.user,
        hostname=args.hostname,
        binds=tuple(parse_volume(v) for v in args.volume),
        tmpfs=tuple(parse_tmpfs(t) for t in args.tmpfs),
        read_only=args.read_only,
        userns={"auto": None, "host": False, "private": True}[args.userns],
        tty=args.tty,
        init=args.init,
    )
    engine = Engine()
    with engine.create(spec) as container:
        stdin = None if args.interactive or args.tty else os.open(os.devnull, os.O_RDONLY)
        try:
            proc = container.start((stdin, None, None))
        finally:
            if stdin is not None:
                os.close(stdin)
        if args.tty:
            from pytest_isolate.tty import proxy

            assert proc.pty_master is not None
            proxy(proc.pty_master, proc, interactive=args.interactive)
        forwarded = (
            signal.SIGINT,
            signal.SIGTERM,
            signal.SIGHUP,
            signal.SIGQUIT,
            signal.SIGUSR1,
            signal.SIGUSR2,
        )
        previous = {s: signal.signal(s, lambda sig, _f: proc.kill(sig)) for s in forwarded}
        try:
            status = container.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return status.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
    except ExecError as e:
        print(f"pytest-isolate: {e}", file=sys.stderr)
        return EXIT_NOT_FOUND if e.errno == 2 else EXIT_CANNOT_EXEC
    except IsolateError as e:
        print(f"pytest-isolate: {e}", file=sys.stderr)
        return EXIT_SETUP
    return 2


if __name__ == "__main__":
    sys.exit(main())
