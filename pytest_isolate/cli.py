"""The docker-like command line: ``pytest-isolate run|build|images|...`` on the same engine as
the plugin.

``run`` exits as ``docker run`` does: the container's own code, 128+N for a death by signal N,
125 when the container could not be set up, 126/127 when the command cannot be executed / found.
The image commands (:mod:`pytest_isolate.cli_images`) exit 1 when they fail; a command line that
does not parse exits 2 (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pytest_isolate import cli_build, cli_containers, cli_images, cli_registry
from runtime import ContainerSpec
from runtime.errors import ExecError, IsolateError
from runtime.spec import parse_tmpfs, parse_volume

EXIT_SETUP = 125
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pytest-isolate",
        description="Run processes in hermetic Linux namespace containers (no daemon needed).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    cli_build.add_command(sub)
    cli_images.add_commands(sub)
    cli_containers.add_commands(sub)
    cli_registry.add_commands(sub)
    return p


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run a command in a new container",
        description="Run a command in a new container, like `docker run`.",
        usage="pytest-isolate run [OPTIONS] IMAGE [COMMAND] [ARG...]",
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
    cli_containers.add_run_options(run)
    cli_build.add_pull_option(run)
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
    run.add_argument(
        "--entrypoint",
        default=None,
        metavar="CMD",
        help="replace the image's ENTRYPOINT (and drop its CMD); '' clears it",
    )
    run.add_argument(
        "image",
        metavar="IMAGE",
        help="an image of the store, 'host', or a root filesystem directory (./rootfs)",
    )
    run.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="COMMAND", help="command and arguments"
    )
    run.set_defaults(handler=None)


def _run(args: argparse.Namespace) -> int:
    from pytest_isolate import cli_run  # images and the Dockerfile parser: only for run

    image, store = cli_run.runnable(args.image, cli_images.open_store, args.pull)
    plan = cli_run.plan_process(
        image,
        command=args.cmd,
        entrypoint=args.entrypoint,
        env_items=args.env,
        caller_env=os.environ,
        workdir=args.workdir,
        user=args.user,
    )
    spec = ContainerSpec(
        rootfs=image.rootfs,
        argv=plan.argv,
        env=plan.env,
        cwd=plan.cwd,
        user=plan.user,
        hostname=args.hostname,
        binds=tuple(parse_volume(v) for v in args.volume),
        tmpfs=tuple(parse_tmpfs(t) for t in args.tmpfs),
        read_only=args.read_only,
        userns={"auto": None, "host": False, "private": True}[args.userns],
        tty=args.tty,
        init=args.init,
        name=args.name,
    )
    # While a container runs on the store's layers, a prune waits (it takes the guard's lock
    # exclusively), so no layer directory is deleted under a running container.
    with store.guard() if store is not None else contextlib.nullcontext():
        if args.detach:  # the guard is held until the container runs
            return cli_containers.run_detached(spec, image, args)
        return _run_container(spec, args)


def _run_container(spec: ContainerSpec, args: argparse.Namespace) -> int:
    from runtime.engine import Engine

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
    if args.command == "run":
        try:
            return _run(args)
        except ExecError as e:
            print(f"pytest-isolate: {e}", file=sys.stderr)
            return EXIT_NOT_FOUND if e.errno == 2 else EXIT_CANNOT_EXEC
        except IsolateError as e:
            print(f"pytest-isolate: {e}", file=sys.stderr)
            return EXIT_SETUP
    try:
        store = cli_containers.open_store()
        return int(args.handler(args, store, sys.stdout, sys.stderr))
    except IsolateError as e:
        print(f"pytest-isolate: {e}", file=sys.stderr)
        return cli_images.EXIT_FAILED
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # The reader went away (`images | head`): stop quietly, and keep Python's exit-time
        # flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return cli_images.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
