"""The bridge between the store and blobs: what push, pull, save and load have in common.

The store keeps layers *unpacked* under their diff id; registries and archives move
*blobs*: compressed layer tars, the config, a manifest naming them. This module turns one into
the other, in both directions, and keeps the store's record of which blob holds which layer.

Exporting (:func:`export_image`, for push and save). A layer the store built, imported or
committed keeps the invariant that packing its directory again gives the exact tar of its diff
id, so it is packed, gzip-compressed once, and the blob recorded: a second export or push does
no work. The packed tar is hashed on the way and must equal the diff id; otherwise the export
stops with :class:`StoreCorruptError` rather than publish a layer under a wrong digest. A layer
that came from a registry or an archive keeps the diff id of the foreign tar, which a re-pack
would not reproduce, so the blob it came in is kept and used. A manifest recorded for the image
(pulled, or made by an earlier export) is sent again as it is, so a pulled image pushed back
keeps its digests.

Importing (:func:`import_layer`, :func:`import_image`, for pull and load). The compressed
stream is read once: each chunk goes into the blob's temp file while the safe unpacker reads the
same bytes (:func:`runtime.image.layer.unpack_layer`, which finds gzip, zstd or plain tar by
content). The unpacker pulls its input on a thread of its own, so the download, the blob's copy
and digest and the inflating run on one core while the other creates the files
(``bench/bench_registry.py``: the pull of a 126 MB image went from 2.19 s to 1.33 s). At the
end, the size and digest of the compressed bytes are checked against the descriptor, and the
digest of the uncompressed tar against the diff id; any mismatch raises
:class:`StoreCorruptError` naming both digests, and nothing is stored (no blob, no layer). The
unpack runs under :meth:`Store.ensure_layer`, keyed by the diff id, so N threads or processes
pulling one layer unpack it once.

gzip: level 1, cut into 4 MiB members compressed on all cores (:class:`_ParallelGzip`).
Measured on a 114 MB layer of ``/usr/lib`` (binaries, libraries) on 2 cores, pack + compress:
level 1 gives 33% of the size at 113 MB/s (67 MB/s on one core); level 6, gzip's default, 30%
at 44 MB/s (16 MB/s on one core); level 9 is five times slower than 6 for 0.2% less. Three
times the speed for 10% more bytes, once per layer: a push to a registry nearby is faster at 1.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from runtime.errors import ImageError, LayerError, SpecError, StoreCorruptError
from runtime.image.config import ImageConfig, image_id
from runtime.image.layer import decompressed, layer_digest, pack_layer, unpack_layer
from runtime.image.manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    layer_compression,
    make_manifest,
    parse_manifest,
)
from runtime.image.reference import check_digest, parse
from runtime.image.store import BlobRecord, BlobWriter, LayerRecord, Store

__all__ = [
    "GZIP_LEVEL",
    "ExportedImage",
    "LayerBlob",
    "export_image",
    "import_image",
    "import_layer",
    "layer_descriptor",
    "layer_key",
    "layer_needed",
    "uncompressed",
]

GZIP_LEVEL = 1
"""zlib level of the layers we compress (see the module docstring for the measurement)."""

GZIP_CHUNK = 4 << 20
"""Bytes of tar per gzip member; fixed, so a layer's blob does not depend on the machine."""

KEY_VERSION = "v1"
"""Part of the store key of imported layers: bump it when the unpacked form of a tar changes."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class LayerBlob:
    """One layer of an exported image: the blob to send, and the layer's diff id."""

    descriptor: Descriptor
    diff_id: str


@dataclass(frozen=True)
class ExportedImage:
    """An image as blobs: ``manifest`` (the bytes to send, whose sha256 is
    ``manifest_digest``), the config (not a blob of the store: send ``config_bytes``), and the
    layers, each blob in the store (:meth:`Store.open_blob`)."""

    image_id: str
    manifest: bytes
    manifest_digest: str
    media_type: str
    config: Descriptor
    config_bytes: bytes
    layers: tuple[LayerBlob, ...]


def layer_key(diff_id: str) -> str:
    """The store key under which the layer with this diff id is imported (pure)."""
    check_digest(diff_id)
    return f"layer-{KEY_VERSION}-{diff_id}"


# --- importing ------------------------------------------------------------------------------


class _Tee:
    """Reads the compressed stream for the unpacker, copying every byte into the blob.

    Stops the moment more bytes arrive than the descriptor's size: an endless body is refused
    after ``size + 1`` bytes, not after filling the disk.
    """

    def __init__(self, raw: IO[bytes], sink: BlobWriter, descriptor: Descriptor) -> None:
        self._raw = raw
        self._sink = sink
        self._descriptor = descriptor

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        data = self._raw.read(min(size, _CHUNK))
        if data:
            self._sink.write(data)
            if self._sink.size > self._descriptor.size:
                raise StoreCorruptError(
                    f"{_describe(self._descriptor)}: more than the {self._descriptor.size} bytes "
                    "its descriptor says were sent"
                )
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _describe(descriptor: Descriptor) -> str:
    return f"blob {descriptor.digest} ({descriptor.media_type}, {descriptor.size} bytes)"


def _check_blob(blob: BlobWriter, descriptor: Descriptor) -> None:
    if blob.size != descriptor.size:
        raise StoreCorruptError(
            f"{_describe(descriptor)}: received {blob.size} bytes, expected {descriptor.size}"
        )
    if blob.digest != descriptor.digest:
        raise StoreCorruptError(
            f"{_describe(descriptor)}: content has digest {blob.digest}, expected "
            f"{descriptor.digest}"
        )


@contextmanager
def _read_through(tee: _Tee, blob: BlobWriter, descriptor: Descriptor) -> Iterator[None]:
    """The body reads the blob through ``tee``; then the rest is drained and the blob checked.

    A :class:`LayerError` from the body is often wrong bytes (truncated, corrupted): the
    digest check says that first; else the error names the blob.
    """
    try:
        yield
        tee.drain()
    except LayerError as e:
        tee.drain()
        _check_blob(blob, descriptor)
        raise type(e)(f"{_describe(descriptor)}: {e}") from e
    _check_blob(blob, descriptor)


def _check_diff_id(found: str, diff_id: str, descriptor: Descriptor) -> None:
    if found != diff_id:
        raise StoreCorruptError(
            f"{_describe(descriptor)}: its uncompressed tar has digest {found}, but the image "
            f"config says {diff_id}"
        )


def layer_needed(store: Store, descriptor: Descriptor, diff_id: str) -> bool:
    """Does :func:`import_layer` need this blob? False when the store has the layer and this
    blob recorded for it, or has the layer and the blob is an uncompressed tar (nothing to
    keep: see :func:`import_layer`); then a pull can skip the download."""
    if not store.has_layer(diff_id):
        return True
    if layer_compression(descriptor.media_type) == "none":
        return False
    return all(b.digest != descriptor.digest for b in store.layer_blobs(diff_id))


def import_layer(
    store: Store,
    descriptor: Descriptor,
    diff_id: str,
    stream: BinaryIO,
    *,
    rootless: bool | None = None,
) -> LayerRecord:
    """Store the layer whose compressed bytes ``stream`` gives; return the unpacked layer.

    ``stream`` is read once, to its end, and never beyond ``descriptor.size + 1`` bytes. Its
    size and digest must match ``descriptor`` and its uncompressed tar's digest ``diff_id``, or
    :class:`StoreCorruptError` names both digests and nothing is stored. The blob is kept and
    recorded as the layer's, except an uncompressed tar that the unpacked layer packs back to
    exactly (our own ``save``, loaded again): that layer needs no blob, as a built one. When
    the store already has the layer and this blob (or the blob is an uncompressed tar), the
    stream is not read at all; when it has the layer only, the stream is verified and kept as a
    blob without unpacking. ``rootless`` (default: unless root) is how the unpacker writes.
    Raises :class:`LayerError` (:class:`UnsafePathError`) for a hostile tar, naming the blob.

    Thread- and process-safe. Hold :meth:`Store.guard` from the first layer of an image to
    :func:`import_image`, so a prune cannot take layers no image refers to yet.
    """
    check_digest(diff_id)
    plain = layer_compression(descriptor.media_type) == "none"  # SpecError: not a layer
    unprivileged = os.geteuid() != 0 if rootless is None else rootless
    diff_size: list[int] = []

    def produce(directory: Path) -> str:
        with store.blob_writer() as blob:
            tee = _Tee(cast(IO[bytes], stream), blob, descriptor)
            with _read_through(tee, blob, descriptor):
                stats = unpack_layer(cast(IO[bytes], tee), directory, rootless=unprivileged)
            _check_diff_id(stats.diff_id, diff_id, descriptor)
            if plain and layer_digest(directory, rootless=unprivileged)[0] == diff_id:
                return diff_id  # packs to the same tar: no blob needed, as for built layers
            blob.commit(expected=descriptor.digest, size=descriptor.size)
        diff_size.append(stats.size)
        return diff_id

    # One import of a diff id at a time, check to record: a second puller of the same layer
    # waits, then finds layer and blob recorded and does not read its stream at all.
    with store.guard(), store.key_lock(f"import-{diff_id}"):
        if not layer_needed(store, descriptor, diff_id):
            return store.get_layer(diff_id)
        if store.has_layer(diff_id):
            record = store.get_layer(diff_id)
        else:
            record = store.ensure_layer(layer_key(diff_id), produce)
        if plain and not diff_size:
            return record
        if not diff_size:
            # The layer was there (built, or pulled in another compression): keep this blob
            # too, verified, so the manifest that names it can be sent again.
            diff_size.append(_store_verified_blob(store, descriptor, diff_id, stream))
        store.record_layer_blob(
            diff_id,
            BlobRecord(descriptor.digest, descriptor.media_type, descriptor.size, diff_size[0]),
        )
    return record


def _store_verified_blob(
    store: Store, descriptor: Descriptor, diff_id: str, stream: BinaryIO
) -> int:
    """Keep ``stream`` as a blob after checking it, without unpacking; return the tar size."""
    with store.blob_writer() as blob:
        tee = _Tee(cast(IO[bytes], stream), blob, descriptor)
        sha = hashlib.sha256()
        size = 0
        with _read_through(tee, blob, descriptor):
            reader = uncompressed(cast(IO[bytes], tee))
            while chunk := reader.read(_CHUNK):
                sha.update(chunk)
                size += len(chunk)
        _check_diff_id("sha256:" + sha.hexdigest(), diff_id, descriptor)
        blob.commit(expected=descriptor.digest, size=descriptor.size)
    return size


def import_image(
    store: Store,
    config_bytes: bytes,
    manifest: Manifest,
    *,
    manifest_bytes: bytes | None = None,
    ref: str | None = None,
) -> str:
    """Store an image whose layers are in the store already; return its id.

    ``config_bytes`` are kept as they are (the id is their digest) and must match
    ``manifest.config`` in digest and size; ``manifest`` must have one layer per diff id.
    ``manifest_bytes``, when given, must parse to ``manifest``: they are kept and recorded, so
    ``name@<their digest>`` resolves to the image and :func:`export_image` sends them again.
    ``ref`` (a tag or a digest reference) is tagged. Raises :class:`StoreCorruptError` for a
    config that does not match, :class:`ImageError` for a missing layer, :class:`SpecError`
    for a bad ``ref`` or config.
    """
    canonical = parse(ref).canonical if ref is not None else None
    found = image_id(config_bytes)
    if found != manifest.config.digest or len(config_bytes) != manifest.config.size:
        raise StoreCorruptError(
            f"image config: {len(config_bytes)} bytes with digest {found}, but the manifest "
            f"says {manifest.config.size} bytes with digest {manifest.config.digest}"
        )
    config = ImageConfig.from_json(config_bytes)
    if len(config.diff_ids) != len(manifest.layers):
        raise ImageError(
            f"image {found}: the manifest has {len(manifest.layers)} layers, the config "
            f"{len(config.diff_ids)} diff ids"
        )
    if manifest_bytes is not None and parse_manifest(manifest_bytes, manifest.media_type) != (
        manifest
    ):
        raise SpecError(f"image {found}: the manifest bytes do not say what the manifest does")
    with store.guard():
        for diff_id, layer in zip(config.diff_ids, manifest.layers, strict=True):
            if not store.has_layer(diff_id):
                raise ImageError(
                    f"image {found}: layer {diff_id} (blob {layer.digest}) is not in the store "
                    f"{store.root}; import it first"
                )
        iid = store.put_image(config_bytes)
        if manifest_bytes is not None:
            digest = store.put_blob(io.BytesIO(manifest_bytes))
            store.record_manifest(digest, manifest.media_type, iid)
        if canonical is not None:
            store.tag(canonical, iid)
    return iid


# --- exporting ------------------------------------------------------------------------------


def export_image(
    store: Store, ref_or_id: str, *, docker: bool | None = None, rootless: bool | None = None
) -> ExportedImage:
    """The image as a manifest, a config and layer blobs, every blob in the store after this.

    ``docker=None`` sends the manifest recorded for the image if there is a complete one (the
    first recorded: a pulled image keeps its digests), else makes an OCI manifest;
    ``docker=True`` / ``False`` want a Docker v2 schema 2 / OCI manifest. A made manifest is
    recorded too. Layers without a usable blob are packed (``rootless``: default unless root,
    as the layer was stored) and gzip-compressed once. Raises :class:`ImageNotFound`, and
    :class:`StoreCorruptError` when a layer does not pack to its diff id.
    """
    unprivileged = os.geteuid() != 0 if rootless is None else rootless
    with store.guard():
        iid = store.resolve(ref_or_id)
        config_bytes = store.config_bytes(iid)
        diff_ids = ImageConfig.from_json(config_bytes).diff_ids
        recorded = _recorded_export(store, iid, config_bytes, diff_ids, docker)
        if recorded is not None:
            return recorded
        layers = tuple(
            LayerBlob(_layer_descriptor(store, d, bool(docker), unprivileged), d) for d in diff_ids
        )
        config = Descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, iid, len(config_bytes))
        data = make_manifest(config, [layer.descriptor for layer in layers], docker=bool(docker))
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        digest = store.put_blob(io.BytesIO(data))
        store.record_manifest(digest, media_type, iid)
    return ExportedImage(iid, data, digest, media_type, config, config_bytes, layers)


def _recorded_export(
    store: Store,
    iid: str,
    config_bytes: bytes,
    diff_ids: tuple[str, ...],
    docker: bool | None,
) -> ExportedImage | None:
    """A recorded manifest of the wanted kind whose blobs are all there, or None."""
    for record in store.manifest_records(iid):
        if docker is not None and (record.media_type == DOCKER_MANIFEST) != docker:
            continue
        try:
            with store.open_blob(record.digest) as f:
                data = f.read()
            manifest = parse_manifest(data, record.media_type)
        except (ImageError, SpecError, OSError):
            continue  # fsck reports it; a fresh manifest will do
        if (
            isinstance(manifest, Index)
            or manifest.config.digest != iid
            or manifest.config.size != len(config_bytes)
            or len(manifest.layers) != len(diff_ids)
        ):
            continue
        kept = [{b.digest for b in store.layer_blobs(d)} for d in diff_ids]
        if any(layer.digest not in k for layer, k in zip(manifest.layers, kept, strict=True)):
            continue
        layers = tuple(
            LayerBlob(blob, d) for blob, d in zip(manifest.layers, diff_ids, strict=True)
        )
        return ExportedImage(
            iid, data, record.digest, manifest.media_type, manifest.config, config_bytes, layers
        )
    return None


def layer_descriptor(
    store: Store, diff_id: str, *, docker: bool = False, rootless: bool | None = None
) -> Descriptor:
    """The blob to send for one layer, without an image (a build cache pushes layers by
    themselves): as :func:`export_image` chooses it for each layer, so a recorded blob, else
    the layer packed and gzip-compressed once and recorded. The blob is in the store after."""
    unprivileged = os.geteuid() != 0 if rootless is None else rootless
    with store.guard():
        return _layer_descriptor(store, diff_id, docker, unprivileged)


def _layer_descriptor(store: Store, diff_id: str, docker: bool, rootless: bool) -> Descriptor:
    """The blob to send for a layer: a recorded gzip blob, a recorded zstd blob (OCI only),
    else a gzip blob made now from a recorded blob or from the layer's directory."""
    blobs = store.layer_blobs(diff_id)
    kinds: dict[str, BlobRecord] = {}
    for blob in blobs:
        try:
            kinds.setdefault(layer_compression(blob.media_type), blob)
        except SpecError:
            continue
    made = kinds.get("gzip")
    if made is None and not docker and "zstd" in kinds:
        zstd = kinds["zstd"]
        return Descriptor(OCI_LAYER_ZSTD, zstd.digest, zstd.size)
    if made is None:
        source = kinds.get("none") or kinds.get("zstd")
        if source is not None:
            made = _gzip_layer(store, diff_id, _copy_blob(store, source.digest))
        else:
            layer = store.get_layer(diff_id)
            owner = (0, 0) if rootless else None
            made = _gzip_layer(
                store,
                diff_id,
                lambda out: pack_layer(layer.path, out, rootless=rootless, owner=owner),
            )
    return Descriptor(DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP, made.digest, made.size)


def _copy_blob(store: Store, digest: str) -> Callable[[IO[bytes]], tuple[str, int]]:
    """A tar writer that copies the uncompressed tar of a recorded blob."""

    def write(out: IO[bytes]) -> tuple[str, int]:
        sha = hashlib.sha256()
        size = 0
        with store.open_blob(digest) as raw:
            reader = uncompressed(cast(IO[bytes], raw))
            while chunk := reader.read(_CHUNK):
                sha.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return "sha256:" + sha.hexdigest(), size

    return write


class _ParallelGzip:
    """A gzip compressor that uses every core: the tar is cut into :data:`GZIP_CHUNK` pieces,
    each compressed on a thread as a gzip member of its own, written out in order.

    A file of several gzip members is one valid gzip stream (RFC 1952; Go's, zlib's and
    Python's readers all read on across members). The pieces depend only on the input, never
    on the number of threads, so the same layer always gives the same blob. zlib releases the
    GIL while it compresses, so threads run in parallel. At most two pieces per thread are in
    flight: memory stays bounded however big the layer.
    """

    def __init__(self, out: BlobWriter, workers: int) -> None:
        self._out = out
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gzip")
        self._pending: deque[Future[bytes]] = deque()
        self._limit = 2 * workers
        self._buffer = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        while len(self._buffer) >= GZIP_CHUNK:
            self._submit(bytes(self._buffer[:GZIP_CHUNK]))
            del self._buffer[:GZIP_CHUNK]
        return len(memoryview(data).cast("B"))

    def _submit(self, piece: bytes) -> None:
        self._pending.append(self._pool.submit(_gzip_member, piece))
        while len(self._pending) >= self._limit:
            self._out.write(self._pending.popleft().result())

    def finish(self) -> None:
        """Compress what is buffered and write every piece; an empty input gives one empty
        member (a valid gzip file)."""
        if self._buffer or not self._pending:
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        while self._pending:
            self._out.write(self._pending.popleft().result())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _gzip_member(piece: bytes) -> bytes:
    return gzip.compress(piece, compresslevel=GZIP_LEVEL, mtime=0)


def _gzip_layer(
    store: Store, diff_id: str, write_tar: Callable[[IO[bytes]], tuple[str, int]]
) -> BlobRecord:
    """Compress the tar ``write_tar`` writes into a new blob, check that the tar's digest is
    ``diff_id``, and record the blob as the layer's."""
    with store.blob_writer() as blob:
        compressor = _ParallelGzip(blob, max(1, min(8, os.cpu_count() or 1)))
        try:
            found, size = write_tar(cast(IO[bytes], compressor))
            compressor.finish()
        finally:
            compressor.close()
        if found != diff_id:
            raise StoreCorruptError(
                f"layer {diff_id} does not pack to its diff id: the tar has digest {found} "
                "(its files changed in the store? run fsck); not exporting it"
            )
        digest = blob.commit()
        record = BlobRecord(digest, OCI_LAYER_GZIP, blob.size, size)
    store.record_layer_blob(diff_id, record)
    return record


# --- reading layer blobs --------------------------------------------------------------------


class _Checked:
    """A decompressing reader whose failures are :class:`LayerError`, whatever the codec."""

    def __init__(self, inner: Any, errors: tuple[type[BaseException], ...]) -> None:
        self._inner = inner
        self._errors = errors

    def read(self, size: int = -1) -> bytes:
        try:
            data: bytes = self._inner.read(size)
        except self._errors as e:
            raise LayerError(f"the layer blob is unreadable: {e}") from e
        return data


def uncompressed(raw: IO[bytes]) -> IO[bytes]:
    """The uncompressed tar of a layer blob (gzip, zstd or plain, found by content), whose
    read errors are :class:`LayerError`."""
    return cast(IO[bytes], _Checked(decompressed(raw), (OSError, EOFError, zlib.error)))
