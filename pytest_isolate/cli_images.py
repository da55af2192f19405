"""The image commands of the command line: ``images``, ``history``, ``inspect``, ``tag``, ``rmi``,
``import``, ``prune`` and ``check``.

Each command is a short function that reads the store and prints; what to print is decided by
pure functions (``*_rows``, :func:`inspect_image`, :func:`plan_rmi`) that the unit tests call
directly. Tables look like docker's; ``--format json`` prints what scripts want: one JSON object
per line for lists (as ``docker images --format json`` does), one JSON document otherwise.

Exit status: 0 on success, 1 when the command failed (docker's CLI does the same), 2 for a
command line that does not parse; ``check`` exits 1 when it found problems.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from pytest_isolate.cli_format import (
    docker_time,
    human_age,
    human_size,
    parse_duration,
    parse_size,
    table,
    truncate,
)
from runtime.errors import ImageError, ImageNotFound, SpecError, StoreCorruptError
from runtime.image.reference import Reference, parse
from runtime.image.store import Image, LayerRecord, Store

__all__ = [
    "EXIT_FAILED",
    "HistoryRow",
    "ImageRow",
    "RmiPlan",
    "add_commands",
    "history_rows",
    "image_rows",
    "inspect_image",
    "not_found_hint",
    "plan_rmi",
]

EXIT_FAILED = 1
NONE = "<none>"
MISSING = "<missing>"
CREATED_BY_WIDTH = 45
"""``docker history`` cuts CREATED BY to this many characters unless ``--no-trunc``."""


def not_found_hint(ref: str) -> str:
    """How to get an image that is not in the store."""
    return (
        f"to get {ref!r}: `pytest-isolate pull {ref}`, `pytest-isolate load` an archive, "
        f"`pytest-isolate build -t {ref} CONTEXT`, or `pytest-isolate import ROOTFS.tar {ref}` "
        "(a root filesystem tarball, e.g. from `mmdebstrap --variant=minbase bookworm "
        "ROOTFS.tar`)"
    )


# --- pure: what to print --------------------------------------------------------------------


def _familiar(canonical: str) -> Reference | None:
    try:
        return parse(canonical)
    except SpecError:
        return None


def _short(image_id: str, no_trunc: bool) -> str:
    return image_id if no_trunc else image_id.removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class ImageRow:
    """One line of ``images``: an image under one of its tags (or ``<none>``)."""

    repository: str
    tag: str
    digest: str
    image_id: str
    created: str | None
    size: int

    def as_json(self, now: datetime, no_trunc: bool) -> dict[str, str]:
        """Docker's ``images --format json`` fields (all strings, as docker prints them)."""
        return {
            "ID": _short(self.image_id, no_trunc),
            "Repository": self.repository,
            "Tag": self.tag,
            "Digest": self.digest,
            "CreatedAt": docker_time(self.created),
            "CreatedSince": human_age(self.created, now),
            "Size": human_size(self.size),
        }


def image_rows(
    images: Sequence[Image],
    sizes: Mapping[str, int],
    *,
    reference: str | None = None,
) -> list[ImageRow]:
    """The rows of ``images`` (pure): one per tag, one ``<none>`` row for an untagged image.

    ``sizes`` holds each layer's bytes by diff id; an image's size is the sum of its layers'.
    ``reference`` (``busybox`` or ``busybox:1.36``) keeps the rows of that repository (and tag).
    """
    want: Reference | None = None
    if reference is not None:
        want = parse(reference, default_tag=False)
    rows: list[ImageRow] = []
    for image in images:
        size = sum(sizes.get(d, 0) for d in dict.fromkeys(image.config.diff_ids))
        refs = [r for r in (_familiar(t) for t in image.tags) if r is not None]
        if want is not None:
            refs = [
                r
                for r in refs
                if r.name == want.name
                and (want.tag is None or r.tag == want.tag)
                and (want.digest is None or r.digest == want.digest)
            ]
            if not refs:
                continue
        created = image.config.created
        if not refs:
            rows.append(ImageRow(NONE, NONE, NONE, image.id, created, size))
        # As docker: a repository's digest (pull, push) goes in the DIGEST column of its
        # tagged rows, and gets a row of its own (tag <none>) only when no tag is there.
        by_repo: dict[str, list[Reference]] = {}
        for r in refs:
            by_repo.setdefault(r.familiar_name, []).append(r)
        for repo, repo_refs in by_repo.items():
            digests = [r.digest for r in repo_refs if r.digest]
            tags = [r.tag for r in repo_refs if r.tag]
            shown = [(t, digests[0] if digests else NONE) for t in tags] or [
                (NONE, d) for d in digests
            ]
            for tag, digest in shown:
                rows.append(ImageRow(repo, tag, digest, image.id, created, size))
    return rows


@dataclass(frozen=True)
class HistoryRow:
    """One line of ``history``: a build step, newest first."""

    image_id: str
    created: str | None
    created_by: str
    size: int
    comment: str

    def as_json(self, now: datetime, no_trunc: bool) -> dict[str, str]:
        return {
            "ID": self.image_id if self.image_id == MISSING else _short(self.image_id, no_trunc),
            "CreatedAt": docker_time(self.created),
            "CreatedSince": human_age(self.created, now),
            "CreatedBy": self.created_by,
            "Size": human_size(self.size),
            "Comment": self.comment,
        }


def history_rows(image: Image, sizes: Mapping[str, int]) -> list[HistoryRow]:
    """The rows of ``history`` (pure), newest step first.

    Steps that made a layer take the layers' sizes in order; ``empty_layer`` steps are 0 B. As in
    docker, only the newest row names the image: the images of earlier steps are not kept
    (``<missing>``).
    """
    config = image.config
    layers = iter(config.diff_ids)
    rows = []
    for entry in config.history or ():
        size = 0
        if not entry.empty_layer:
            diff_id = next(layers, None)
            size = sizes.get(diff_id, 0) if diff_id is not None else 0
        rows.append(
            HistoryRow(MISSING, entry.created, entry.created_by or "", size, entry.comment or "")
        )
    rows.reverse()
    if rows:
        rows[0] = HistoryRow(image.id, *(getattr(rows[0], f) for f in _HISTORY_REST))
    return rows


_HISTORY_REST = ("created", "created_by", "size", "comment")


def inspect_image(image: Image, layers: Sequence[LayerRecord]) -> dict[str, Any]:
    """``inspect`` output for one image (pure), in docker's shape plus its ``History``.

    ``GraphDriver.Data.LowerDir`` lists the unpacked layers as overlay wants them (topmost
    first), so a user can look inside an image without running it.
    """
    config = image.config
    refs = [r for r in (_familiar(t) for t in image.tags) if r is not None]
    history = config.history or ()
    comment = next((h.comment for h in reversed(history) if h.comment), "")
    out: dict[str, Any] = {
        "Id": image.id,
        "RepoTags": [r.familiar for r in refs if r.tag is not None and r.digest is None],
        "RepoDigests": [f"{r.familiar_name}@{r.digest}" for r in refs if r.digest is not None],
        "Parent": "",
        "Comment": comment,
        "Created": config.created or "",
        "Author": config.author or "",
        "Config": config.container.to_dict(),
        "Architecture": config.architecture,
        "Os": config.os,
        "Size": sum(layer.size for layer in {ly.diff_id: ly for ly in layers}.values()),
        "GraphDriver": {
            "Name": "overlay",
            "Data": {"LowerDir": ":".join(str(ly.path) for ly in reversed(layers))},
        },
        "RootFS": {"Type": config.rootfs.type, "Layers": list(config.diff_ids)},
        "History": [h.to_dict() for h in history],
    }
    if config.variant:
        out["Variant"] = config.variant
    return out


@dataclass(frozen=True)
class RmiPlan:
    """What ``rmi ARG`` does: tags to remove, and whether the image itself goes."""

    untag: tuple[str, ...]
    delete: bool


def plan_rmi(arg: str, image: Image, *, force: bool) -> RmiPlan:
    """Docker's rules for ``rmi`` (pure).

    By tag: that tag goes, and the image too when it was its last tag. By id: the image goes
    with its tag, but an image with several tags needs ``force`` (all its tags go then), so an id
    typed by mistake cannot delete what other names still point to.
    """
    named = _familiar(arg)
    if named is not None and named.canonical in image.tags:
        if len(image.tags) == 1:
            return RmiPlan((named.canonical,), True)
        return RmiPlan((named.canonical,), False)
    if len(image.tags) > 1 and not force:
        raise ImageError(
            f"conflict: unable to delete {image.short_id} (must be forced) - image is referenced "
            f"by {len(image.tags)} tags: "
            + ", ".join(sorted(r.familiar for r in map(parse, image.tags)))
        )
    return RmiPlan(tuple(sorted(image.tags)), True)


# --- acting: read the store, print -----------------------------------------------------------


def _layer_sizes(store: Store, diff_ids: Iterable[str]) -> dict[str, int]:
    sizes = {}
    for diff_id in set(diff_ids):
        try:
            sizes[diff_id] = store.get_layer(diff_id).size
        except (ImageNotFound, StoreCorruptError):
            continue  # a missing layer counts 0 here; `check` reports it
    return sizes


def _get(store: Store, ref: str) -> Image:
    try:
        return store.get_image(ref)
    except ImageNotFound as e:
        raise ImageNotFound(f"{e}\n  {not_found_hint(ref)}") from e


def _json_lines(out: TextIO, objects: Iterable[Mapping[str, Any]]) -> None:
    for obj in objects:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")


def cmd_images(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    images = store.list_images()
    sizes = _layer_sizes(store, (d for i in images for d in i.config.diff_ids))
    rows = image_rows(images, sizes, reference=args.reference)
    now = datetime.now(UTC)
    if args.quiet:
        for iid in dict.fromkeys(r.image_id for r in rows):
            out.write(_short(iid, args.no_trunc) + "\n")
    elif args.format == "json":
        _json_lines(out, (r.as_json(now, args.no_trunc) for r in rows))
    else:
        out.write(
            table(
                ("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"),
                [
                    (
                        r.repository,
                        r.tag,
                        _short(r.image_id, args.no_trunc),
                        human_age(r.created, now),
                        human_size(r.size),
                    )
                    for r in rows
                ],
            )
        )
    return 0


def cmd_history(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    image = _get(store, args.image)
    rows = history_rows(image, _layer_sizes(store, image.config.diff_ids))
    now = datetime.now(UTC)
    if args.format == "json":
        _json_lines(out, (r.as_json(now, args.no_trunc) for r in rows))
        return 0
    width = None if args.no_trunc else CREATED_BY_WIDTH
    out.write(
        table(
            ("IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"),
            [
                (
                    r.image_id if r.image_id == MISSING else _short(r.image_id, args.no_trunc),
                    human_age(r.created, now),
                    r.created_by if width is None else truncate(r.created_by, width),
                    human_size(r.size),
                    r.comment,
                )
                for r in rows
            ],
        )
    )
    return 0


def cmd_inspect(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    found = []
    status = 0
    for ref in args.images:
        try:
            image = store.get_image(ref)
            layers = store.image_layers(image.id)
        except (ImageNotFound, StoreCorruptError) as e:
            err.write(f"pytest-isolate: {e}\n")
            status = EXIT_FAILED
            continue
        found.append(inspect_image(image, layers))
    out.write(json.dumps(found, indent=4, ensure_ascii=False) + "\n")
    return status


def cmd_tag(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    _get(store, args.source)  # the hint, when the source is missing
    store.tag(args.target, args.source)
    return 0


def cmd_rmi(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    status = 0
    for ref in args.images:
        try:
            image = store.get_image(ref)
            plan = plan_rmi(ref, image, force=args.force)
            if plan.delete:  # before untagging, as docker: a refusal changes nothing
                store.check_unused(image.id, ref)
            for tag in plan.untag:
                store.untag(tag)
                out.write(f"Untagged: {parse(tag).familiar}\n")
            if plan.delete:
                store.remove_image(image.id)
                out.write(f"Deleted: {image.id}\n")
        except ImageError as e:
            err.write(f"pytest-isolate: {e}\n")
            status = EXIT_FAILED
    return status


def cmd_import(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    from runtime.image.importer import import_rootfs

    result = import_rootfs(
        store, args.file, args.reference, message=args.message, changes=args.changes
    )
    out.write(result.image_id + "\n")
    return 0


def cmd_prune(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    max_size = args.max_size
    if max_size is None and args.all:
        max_size = 0  # everything unused: the build cache too
    report = store.prune(keep_images=not args.all, max_size=max_size, max_age=args.max_age)
    if args.format == "json":
        out.write(
            json.dumps(
                {
                    "ImagesDeleted": list(report.images),
                    "LayersDeleted": list(report.layers),
                    "CacheRecordsDeleted": len(report.cache),
                    "TemporaryRemoved": len(report.tmp),
                    "SpaceReclaimed": report.freed,
                    "SpaceKept": report.kept,
                }
            )
            + "\n"
        )
        return 0
    if report.images:
        out.write("Deleted Images:\n")
        out.writelines(f"deleted: {iid}\n" for iid in report.images)
        out.write("\n")
    if report.layers:
        out.write("Deleted Layers:\n")
        out.writelines(f"deleted: {d}\n" for d in report.layers)
        out.write("\n")
    if report.cache:
        out.write(f"Deleted build cache records: {len(report.cache)}\n")
    if report.tmp:
        out.write(f"Removed unfinished work of dead processes: {len(report.tmp)}\n")
    out.write(f"Total reclaimed space: {human_size(report.freed)}\n")
    out.write(f"Layers kept: {human_size(report.kept)}\n")
    return 0


def cmd_check(args: argparse.Namespace, store: Store, out: TextIO, err: TextIO) -> int:
    problems = store.fsck()
    if args.format == "json":
        out.write(
            json.dumps(
                [{"Kind": p.kind, "Subject": p.subject, "Detail": p.detail} for p in problems]
            )
            + "\n"
        )
    elif problems:
        out.writelines(f"{p}\n" for p in problems)
        out.write(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {store.root}\n")
    else:
        out.write(f"no problems found in {store.root}\n")
    return EXIT_FAILED if problems else 0


# --- the command line ------------------------------------------------------------------------


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="table (default), or json for scripts",
    )


def add_change_options(p: argparse.ArgumentParser) -> None:
    """``-c/--change LINE`` and ``-m/--message``: what ``import`` and ``commit`` write into the
    new image's config and history, as docker's."""
    p.add_argument("-m", "--message", default=None, help="comment recorded in the history")
    p.add_argument(
        "-c",
        "--change",
        dest="changes",
        action="append",
        default=[],
        metavar="LINE",
        help="a Dockerfile line for the config, e.g. 'CMD [\"/bin/sh\"]' (repeatable)",
    )


def add_commands(sub: Any) -> None:
    """Add the image commands to the ``pytest-isolate`` sub-command parser ``sub``."""
    p = sub.add_parser(
        "images",
        help="list images",
        description="List the images in the store, newest first, one line per tag.",
    )
    p.add_argument("reference", nargs="?", metavar="REPOSITORY[:TAG]", help="only this one")
    p.add_argument("-q", "--quiet", action="store_true", help="only show image ids")
    p.add_argument("--no-trunc", action="store_true", help="show full image ids")
    _format_option(p)
    p.set_defaults(handler=cmd_images)

    p = sub.add_parser(
        "history",
        help="show the history of an image",
        description="Show the build steps of an image, newest first.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--no-trunc", action="store_true", help="do not cut long lines or ids")
    _format_option(p)
    p.set_defaults(handler=cmd_history)

    p = sub.add_parser(
        "inspect",
        help="show images as JSON",
        description="Show images as JSON: config, layers, history.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser(
        "tag",
        help="add a name to an image",
        description="Make TARGET refer to the image SOURCE names.",
    )
    p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
    p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")
    p.set_defaults(handler=cmd_tag)

    p = sub.add_parser(
        "rmi",
        help="remove images",
        description=(
            "Remove images: by tag, the tag (and the image with its last tag); by id, the "
            "image (-f when it has several tags). Layers are freed by `prune`."
        ),
    )
    p.add_argument("-f", "--force", action="store_true", help="remove an image with several tags")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(handler=cmd_rmi)

    p = sub.add_parser(
        "import",
        help="make an image from a root filesystem tarball",
        description=(
            "Make a single-layer image from a root filesystem tarball (tar, or compressed "
            "with gzip, xz, zstd or bzip2), e.g. one made by `mmdebstrap`. Prints the image id."
        ),
    )
    add_change_options(p)
    p.add_argument("file", metavar="ROOTFS.tar")
    p.add_argument("reference", nargs="?", metavar="NAME[:TAG]")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser(
        "prune",
        help="remove unused data from the store",
        description=(
            "Remove unfinished work of dead processes, layers no image or cache entry uses, and "
            "dangling cache entries. --max-size/--max-age evict build cache layers, least "
            "recently used first. --all also removes every image and the whole build cache."
        ),
    )
    p.add_argument("-a", "--all", action="store_true", help="also remove all images and cache")
    p.add_argument(
        "--max-size", type=_size, default=None, metavar="SIZE", help="e.g. 10G (binary units)"
    )
    p.add_argument(
        "--max-age", type=_duration, default=None, metavar="AGE", help="unused for, e.g. 7d"
    )
    p.add_argument("-f", "--force", action="store_true", help="accepted for docker habits")
    _format_option(p)
    p.set_defaults(handler=cmd_prune)

    p = sub.add_parser(
        "check",
        help="verify the store's digests",
        description="Verify every blob, layer, image and tag in the store; exit 1 on problems.",
    )
    _format_option(p)
    p.set_defaults(handler=cmd_check)


def open_store() -> Store:
    """The user's store (``$PYTEST_ISOLATE_STORE`` and friends)."""
    return Store.open(os.environ)
