"""``pytest-isolate import``: a root filesystem tarball becomes a single-layer image.

This is how a real distribution gets into the store before registries exist: CI makes
``mmdebstrap --variant=minbase bookworm debian.tar`` and imports it, as ``docker import`` would.

The tarball is untrusted input and goes through the same safe unpacker as every layer
(:func:`runtime.image.layer.unpack_layer`). Compression is found from the content, not the file
name: plain tar, gzip and zstd are read by the unpacker itself; xz and bzip2 (common for rootfs
tarballs, not allowed in OCI layers) are decompressed here first.

The layer's diff id is that of the layer *as stored*: :func:`runtime.image.layer.layer_digest`
of the unpacked directory, the sha256 of the tar the store would write for it. ``docker import``
uses the digest of the input instead, but the store keeps layers unpacked, and the input's order,
headers and padding are lost on the way; with the stored form's digest an export can recreate
the exact tar of every layer (the builder keeps the same invariant), and two tarballs with the
same files in another order are one layer.

The store's cache key of the layer is the sha256 of the file as given: the same tarball imported
twice, or by N processes at once, is unpacked once (the store's key lock); a differently
compressed copy of the same tar is unpacked again but lands on the same layer.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

from runtime.build.dockerfile import Cmd
from runtime.errors import LayerError
from runtime.image.config import ImageConfig
from runtime.image.images import apply_metadata, parse_change
from runtime.image.layer import LayerStats, layer_digest, unpack_layer
from runtime.image.reference import parse
from runtime.image.store import Store

__all__ = ["ImportResult", "compression_of", "import_config", "import_key", "import_rootfs"]

_CHUNK = 1 << 20
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
}
KEY_VERSION = "v1"
"""Part of the cache key: bump it when the unpacked form of the same tar changes."""


@dataclass(frozen=True)
class ImportResult:
    """What an import made: the image, its only layer, and the tag set (canonical form)."""

    image_id: str
    diff_id: str
    tag: str | None
    stats: LayerStats | None
    """What the unpack did (its ``diff_id`` is the input's); ``None`` when the layer was
    already in the store."""


def compression_of(head: bytes) -> str:
    """``gzip``, ``zstd``, ``xz``, ``bzip2`` or ``none``, from the first bytes of a file (pure)."""
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return "none"


def import_key(file_sha256: str) -> str:
    """The store's cache key for the layer of a tarball with this sha256 (hex) (pure)."""
    return f"import-{KEY_VERSION}-sha256:{file_sha256}"


def import_config(
    diff_id: str,
    *,
    source_name: str,
    created: str,
    message: str | None = None,
    changes: Sequence[str] = (),
) -> ImageConfig:
    """The config of an imported image (pure): one layer, like ``docker import``.

    A tarball says nothing about how to run it: no ``Env``, ``Cmd`` or ``WorkingDir`` unless
    ``changes`` (Dockerfile lines such as ``CMD ["/bin/bash"]``, as ``docker import --change``)
    set them; ``run`` supplies docker's defaults (``PATH``, ``/``) for an image that has none.
    """
    config = ImageConfig.empty()
    cmd_set = False
    for text in changes:
        instr = parse_change(text, config)
        config = apply_metadata(config, instr, cmd_set=cmd_set)
        cmd_set = cmd_set or isinstance(instr, Cmd)
    return config.add_layer(
        diff_id, created=created, created_by="", comment=message or f"imported from {source_name}"
    )


def import_rootfs(
    store: Store,
    source: str | os.PathLike[str],
    ref: str | None = None,
    *,
    message: str | None = None,
    changes: Sequence[str] = (),
    rootless: bool | None = None,
    created: str | None = None,
) -> ImportResult:
    """Import the root filesystem tarball ``source`` as a new image, tagged ``ref`` if given.

    ``message`` is the history comment (default: ``imported from <file name>``); ``changes``
    are Dockerfile lines applied to the config (see :func:`import_config`).
    ``rootless`` (default: unless this process is root) selects how the layer is unpacked (see
    :func:`unpack_layer`). Raises :class:`LayerError` naming the file or the entry, and
    :class:`SpecError` for a bad ``ref`` or change before any work is done.
    """
    path = Path(source)
    canonical = parse(ref).canonical if ref is not None else None
    # The changes are checked now, so a typo fails before a long unpack, not after it.
    import_config("sha256:" + "0" * 64, source_name=path.name, created="", changes=changes)
    unprivileged = os.geteuid() != 0 if rootless is None else rootless
    file_hash, compression = _hash_file(path)
    stats: list[LayerStats] = []

    def produce(directory: Path) -> str:
        try:
            with _tar_source(path, compression) as stream:
                result = unpack_layer(stream, directory, rootless=unprivileged)
            diff_id, _ = layer_digest(directory, rootless=unprivileged)
        except LayerError as e:
            raise type(e)(f"cannot import {str(path)!r}: {e}") from e
        stats.append(result)
        return diff_id

    when = created or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # Under the guard throughout: a concurrent prune cannot take the layer, or the untagged
    # image, before the image and its tag refer to them.
    with store.guard():
        layer = store.ensure_layer(import_key(file_hash), produce)
        config = import_config(
            layer.diff_id, source_name=path.name, created=when, message=message, changes=changes
        )
        image_id = store.put_image(config)
        if canonical is not None:
            store.tag(canonical, image_id)
    return ImportResult(image_id, layer.diff_id, canonical, stats[0] if stats else None)


def _hash_file(path: Path) -> tuple[str, str]:
    """The sha256 (hex) of the file and its compression, in one read."""
    digest = hashlib.sha256()
    head = b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                if not head:
                    head = chunk[:8]
                digest.update(chunk)
    except IsADirectoryError as e:
        raise LayerError(
            f"cannot import {str(path)!r}: it is a directory; import takes a tarball "
            "(tar, tar.gz, tar.xz, tar.zst, tar.bz2); to run a directory use `run DIR COMMAND`"
        ) from e
    except OSError as e:
        raise LayerError(f"cannot read {str(path)!r}: {e.strerror or e}") from e
    return digest.hexdigest(), compression_of(head)


@contextmanager
def _tar_source(path: Path, compression: str) -> Iterator[IO[bytes]]:
    """The file as a stream the unpacker reads: xz and bzip2 decompressed here."""
    opener: Any = {"xz": lzma.open, "bzip2": bz2.open}.get(compression, open)
    try:
        stream = opener(path, "rb")
    except OSError as e:
        raise LayerError(f"cannot read {str(path)!r}: {e.strerror or e}") from e
    with stream:
        yield cast(IO[bytes], _ErrorsAsOSError(stream))


class _ErrorsAsOSError:
    """Turns a corrupt xz/bzip2 stream's errors into ``OSError``, which the unpacker reports
    as an unreadable tar at the entry where it happened."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner

    def read(self, size: int = -1) -> bytes:
        try:
            return self._inner.read(size)
        except (lzma.LZMAError, EOFError, ValueError) as e:
            raise OSError(f"corrupt compressed data: {e}") from e
