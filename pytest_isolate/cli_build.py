"""``pytest-isolate build``: a Dockerfile to an image in the store, with a progress display.

The options are ``docker build``'s. Progress goes to stderr; with ``-q`` there is none, and the
image id is printed on stdout (``id=$(pytest-isolate build -q .)``). A failed build exits 1 with
the builder's message (Dockerfile, line, instruction; the exit code and the last output lines of
a failed RUN); Ctrl-C exits 130 and, like a kill at any moment, leaves no partial layer.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from pytest_isolate.cli_format import human_size
from runtime.errors import SpecError
from runtime.image.reference import parse
from runtime.image.store import Store

__all__ = ["add_command", "build_options", "parse_build_args", "parse_secret"]


def parse_build_args(items: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """``--build-arg K=V``, or ``--build-arg K`` to take K from the environment (skipped when
    it is not set there), as docker does (pure)."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not name:
            raise SpecError(f"--build-arg {item!r}: expected NAME=VALUE or NAME")
        if eq:
            out[name] = value
        elif name in environ:
            out[name] = environ[name]
    return out


def parse_secret(text: str) -> tuple[str, Path]:
    """``--secret id=ID,src=PATH`` (``source=`` too; the id defaults to the file name) (pure)."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or not value:
            raise SpecError(f"--secret {text!r}: expected id=ID,src=PATH")
        key = key.strip().lower()
        if key == "source":
            key = "src"
        if key not in ("id", "src", "type"):
            raise SpecError(f"--secret {text!r}: unknown field {key!r} (id, src)")
        fields[key] = value
    if fields.get("type", "file") != "file":
        raise SpecError(f"--secret {text!r}: only type=file is supported")
    if "src" not in fields:
        raise SpecError(f"--secret {text!r}: src=PATH is required")
    src = Path(fields["src"])
    return fields.get("id") or src.name, src


def build_options(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    progress: Any,
    cache_from: Sequence[Any] = (),
) -> Any:
    """The builder's options from the command line (checks what it can before building)."""
    from runtime.build.builder import BuildOptions

    context = Path(args.context)
    if not context.is_dir():
        raise SpecError(f"build context {args.context!r} is not a directory")
    for tag in args.tags:
        parse(tag)  # a bad tag fails now, not after the build
    filters = tuple(f for item in args.no_cache_filter for f in item.split(",") if f)
    secrets = dict(parse_secret(s) for s in args.secrets)
    for sid, path in secrets.items():
        if not path.is_file():
            raise SpecError(f"--secret id={sid}: {path} is not a file")
    return BuildOptions(
        context=context,
        dockerfile=Path(args.file) if args.file else None,
        tags=tuple(args.tags),
        build_args=parse_build_args(args.build_args, environ),
        target=args.target,
        no_cache=args.no_cache,
        no_cache_filter=filters,
        network=args.network,
        progress=progress,
        secrets={k: v.resolve() for k, v in secrets.items()},
        pull=args.pull,
        cache_from=tuple(cache_from),
    )


def cmd_build(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    from pytest_isolate.progress import make_progress
    from runtime.build.builder import build

    display = None if args.quiet else make_progress(args.progress, err)
    cache_from = []
    if args.cache_from or args.cache_to:
        if args.cache_to:
            parse(args.cache_to)  # a bad reference fails now, not after the build
        from runtime.registry.cache import RegistryCache

        def warn(text: str) -> None:
            print(f"WARNING: {text}", file=err)

        cache_from = [
            RegistryCache(store, ref, insecure=args.insecure, warn=warn) for ref in args.cache_from
        ]
    opts = build_options(args, os.environ, display, cache_from)
    failed = True
    try:
        result = build(opts, store=store)
        failed = False
    finally:
        for cache in cache_from:
            cache.close()
        if display is not None:
            display.close(failed=failed)
    if args.cache_to:
        from runtime.registry.cache import export_cache

        steps = [(s.cache_key, s.diff_id) for s in result.steps if s.cache_key and s.diff_id]
        digest = export_cache(store, steps, args.cache_to, insecure=args.insecure)
        if display is not None:
            display.note(f"exported the cache of {len(steps)} steps to {args.cache_to}@{digest}")
    if args.quiet:
        out.write(result.image_id + "\n")
        return 0
    assert display is not None
    cached = sum(1 for s in result.steps if s.cached)
    layers = result.config.diff_ids
    size = sum(store.get_layer(d).size for d in dict.fromkeys(layers))
    display.note(
        f"writing image {result.image_id} ({len(result.steps)} steps, {cached} cached, "
        f"{len(layers)} layers, {human_size(size)})"
    )
    for tag in result.tags:
        display.note(f"naming to {tag}")
    return 0


def add_pull_option(p: argparse.ArgumentParser) -> None:
    """docker's ``--pull``, shared by ``build`` (FROM) and ``run``."""
    p.add_argument(
        "--pull",
        choices=("never", "missing", "always"),  # runtime.image.images.PULL_POLICIES, not
        # imported here: that module loads the engine, which a cached build does not need
        default="missing",
        help="pull images from their registry: missing (default: only what the store lacks), "
        "always, or never",
    )


def add_insecure_option(p: argparse.ArgumentParser) -> None:
    """``--insecure HOST``: registries reached over plain HTTP (loopback ones always are)."""
    p.add_argument(
        "--insecure",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="reach this registry over plain HTTP (loopback registries always are); repeatable",
    )


def add_command(sub: Any) -> None:
    """Add ``build`` to the ``pytest-isolate`` sub-command parser ``sub``."""
    p = sub.add_parser(
        "build",
        help="build an image from a Dockerfile",
        description="Build an image from a Dockerfile, like `docker build`; see docs/builder.md.",
    )
    p.add_argument(
        "-t",
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="NAME[:TAG]",
        help="name the image (repeatable)",
    )
    p.add_argument("-f", "--file", default=None, metavar="PATH", help="default: CONTEXT/Dockerfile")
    p.add_argument(
        "--build-arg",
        dest="build_args",
        action="append",
        default=[],
        metavar="K=V",
        help="set a build argument (K alone: from the environment)",
    )
    p.add_argument("--target", default=None, metavar="STAGE", help="build up to this stage")
    p.add_argument("--no-cache", action="store_true", help="do not use the layer cache")
    p.add_argument(
        "--no-cache-filter",
        action="append",
        default=[],
        metavar="STAGE",
        help="build these stages without the cache (repeatable, or comma-separated)",
    )
    p.add_argument(
        "--network",
        choices=("host", "none"),
        default="host",
        help="RUN's network (default host; RUN --network=... overrides per step)",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "plain", "tty"),
        default="auto",
        help="auto: one updating line per step on a terminal, else plain (every line)",
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress; print the image id on success"
    )
    p.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        default=[],
        metavar="id=ID,src=PATH",
        help="a file for RUN --mount=type=secret (repeatable)",
    )
    add_pull_option(p)
    p.add_argument(
        "--cache-from",
        action="append",
        default=[],
        metavar="REF",
        help="use the build cache pushed to this registry reference (repeatable)",
    )
    p.add_argument(
        "--cache-to",
        default=None,
        metavar="REF",
        help="push the cache of every layer step built or used to this registry reference",
    )
    add_insecure_option(p)
    p.add_argument("context", metavar="CONTEXT", help="the build context directory")
    p.set_defaults(handler=cmd_build)
