"""The image store: one directory shared by every process of the user, safe to use concurrently.

Where: :func:`store_root` (``$PYTEST_ISOLATE_STORE``, else ``$XDG_CACHE_HOME/pytest-isolate``,
else ``~/.cache/pytest-isolate``). Layout::

    version                         layout version ("1"); a store we do not understand is refused
    blobs/sha256/<hex>              content by digest (layer tars, configs, manifests) for registry
                                    exchange; written to tmp/ while hashing, fsynced, renamed
    dist/sha256/<diff-id-hex>/<blob-hex>.json
                                    a blob holding that layer's tar, compressed or not (a layer
                                    may have several): {"mediaType", "size", "diffSize"}
    manifests/sha256/<hex>.json     a manifest whose bytes are blobs/sha256/<hex>, and the image
                                    (config digest) it describes: {"image", "mediaType", "created"}
    layers/sha256/<diff-id-hex>/    one unpacked layer, an overlay lower:
        diff/                         the directory the producer filled
        meta.json                     size, parent chain id, created, content digest (for fsck)
        used                          empty stamp; its mtime is the last use (for LRU pruning)
    images/sha256/<id-hex>.json     image configs; the file name is the sha256 of the bytes
    tags.json                       {"docker.io/library/busybox:latest": "sha256:<id>"}
    cache/<key>.json                build cache: key -> {"kind": "layer"|"image", "digest": ...}
    tmp/<token>/, tmp/<token>.lock  work in progress; the owner holds a flock on the .lock file
    locks/gc.lock                   shared by users of layers (guard), exclusive for prune
    locks/tags.lock                 serializes read-modify-write of tags.json
    locks/keys/<key>.lock           serializes producers of one cache key

Why it is safe to share and to kill:

* Everything appears by ``rename(2)`` of a finished, fsynced file or directory from ``tmp/``
  (same filesystem), so readers never see half of anything and a process killed at any moment
  leaves either nothing or a whole entry behind. Removal goes the other way: a layer is first
  renamed into ``tmp/``, then deleted there.
* Check-then-act happens under a lock: :meth:`Store.ensure_layer` looks for the key, takes
  ``locks/keys/<key>.lock``, looks again, and only then produces. N processes asking for one key
  produce it once; the others wait on the lock and reuse the result.
* Work in ``tmp/`` belongs to whoever holds the flock on its ``.lock`` file. The kernel drops a
  flock when its holder dies, so a sweeper that can take the lock knows the owner is gone; no
  pid files, no guessing from ages.
* Layer reference counts are derived from the image configs each time, never stored, so they
  cannot go stale. Blobs are referenced only by ``dist/`` records of layers that exist and by
  ``manifests/`` records of images that exist; :meth:`Store.prune` drops the records whose
  layer or image is gone, then the blobs nothing refers to (records first, so a kill in between
  never leaves a record naming a missing blob). A blob written before its record exists is
  unreferenced: writers hold :meth:`Store.guard` from the blob to its record. A build holds :meth:`Store.guard` while it uses layers that no image refers
  to yet; :meth:`Store.prune` takes the same lock exclusively and waits for it.
* Layers may hold read-only directories and symlinks to anywhere: removal works with directory
  file descriptors and ``O_NOFOLLOW``, adds owner permissions where needed, and never follows a
  symlink.

The store never unpacks or packs tars itself: callers pass a *producer* that fills a directory,
and optionally a :class:`TreeDigest` (how to fingerprint an unpacked layer) so ``fsck`` can check
layers without knowing the tar format.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Set
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from runtime.errors import ImageError, ImageNotFound, SpecError, StoreCorruptError
from runtime.image.config import ImageConfig, canonical_json, image_id
from runtime.image.layer import layer_digest
from runtime.image.reference import check_digest, parse
from runtime.image.storefs import (
    _CHUNK,
    _disk_usage,
    _file_sha256,
    _flock,
    _flush_to_disk,
    _fsync_dir,
    _remove_tree,
    _same_file,
    _write_synced,
    tree_digest,
)

__all__ = [
    "DEFAULT_TREE_DIGEST",
    "PACKED_AGAIN",
    "BlobPrunePlan",
    "BlobRecord",
    "BlobWriter",
    "CacheRecord",
    "Image",
    "LayerRecord",
    "LayerUse",
    "ManifestRecord",
    "Problem",
    "PrunePlan",
    "PruneReport",
    "Store",
    "TreeDigest",
    "chain_id",
    "plan_blob_prune",
    "plan_prune",
    "store_root",
    "tree_digest",
]

LAYOUT_VERSION = "1"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=-]{0,199}", re.ASCII)
_HEX64 = re.compile(r"[a-f0-9]{64}", re.ASCII)
_ID_PREFIX = re.compile(r"(?:sha256:)?([a-f0-9]{1,64})", re.ASCII)
_GUARDS_HELD: dict[str, int] = {}
_GUARDS_LOCK = threading.Lock()  # pull imports layers from several threads, each guarded
"""Store roots whose guard this process holds (inherited by forks, as the flock is)."""

Producer = Callable[[Path], str]
"""Fills the empty directory it is given with a layer's files and returns the layer's diff id."""


def store_root(env: Mapping[str, str]) -> Path:
    """The store directory for this environment (pure: reads only ``env``)."""
    explicit = env.get("PYTEST_ISOLATE_STORE")
    if explicit:
        path = Path(explicit)
        if not path.is_absolute():
            raise SpecError(f"PYTEST_ISOLATE_STORE must be an absolute path, not {explicit!r}")
        return path
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "pytest-isolate"
    home = env.get("HOME")
    if not home or not Path(home).is_absolute():
        raise SpecError(
            "cannot place the image store: set PYTEST_ISOLATE_STORE, XDG_CACHE_HOME or HOME "
            "to an absolute path"
        )
    return Path(home) / ".cache" / "pytest-isolate"


def chain_id(parent: str | None, diff_id: str) -> str:
    """The OCI chain id of a layer on top of ``parent`` (itself a chain id, or None)."""
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


@dataclass(frozen=True)
class TreeDigest:
    """How to fingerprint an unpacked layer directory; ``name`` is recorded with the digest."""

    name: str
    compute: Callable[[Path], str]


DEFAULT_TREE_DIGEST = TreeDigest("store-tree-v1", tree_digest)


def _packed_again(rootless: bool) -> TreeDigest:
    def compute(path: Path) -> str:
        return layer_digest(path, rootless=rootless)[0]

    return TreeDigest("layer-tar-v1" + ("-rootless" if rootless else ""), compute)


PACKED_AGAIN = {False: _packed_again(False), True: _packed_again(True)}
"""Fingerprints of layers whose diff id is the digest of their own directory packed again
(every layer the builder and ``commit`` make, see :func:`runtime.image.layer.layer_digest`):
the diff id itself is the fingerprint, so recording it costs no pass over the files (a third
one, after the copy and the diff id's); :meth:`Store.fsck` packs the directory again."""


@dataclass(frozen=True)
class LayerRecord:
    """An unpacked layer in the store; ``path`` is the directory to use as an overlay lower."""

    diff_id: str
    path: Path
    size: int
    parent: str | None
    created: str
    content_digest: str | None = None
    content_algorithm: str | None = None

    @property
    def chain_id(self) -> str:
        return chain_id(self.parent, self.diff_id)


@dataclass(frozen=True)
class CacheRecord:
    """What a build-cache key produced: a layer (by diff id) or an image (by id)."""

    kind: Literal["layer", "image"]
    digest: str
    created: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "image"):
            raise SpecError(f"cache record kind must be 'layer' or 'image', not {self.kind!r}")
        check_digest(self.digest)


@dataclass(frozen=True)
class Image:
    """An image in the store with the tags that point to it."""

    id: str
    config: ImageConfig
    tags: tuple[str, ...] = ()

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]


@dataclass(frozen=True)
class Problem:
    """One thing ``fsck`` found wrong: what kind of entry, which one, and what is wrong."""

    kind: Literal["blob", "layer", "image", "tag", "cache", "manifest"]
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.subject}: {self.detail}"


@dataclass(frozen=True)
class LayerUse:
    """What pruning needs to know about a layer: its size and when it was last used."""

    size: int
    last_used: float


@dataclass(frozen=True)
class PrunePlan:
    """What to remove, decided by :func:`plan_prune`."""

    images: frozenset[str] = frozenset()
    layers: frozenset[str] = frozenset()
    cache: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PruneReport:
    """What :meth:`Store.prune` removed, and the bytes of layers freed and kept."""

    tmp: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    cache: tuple[str, ...] = ()
    freed: int = 0
    kept: int = 0
    blobs: tuple[str, ...] = ()
    blob_bytes: int = 0
    """Bytes of the blobs removed (not counted in ``freed``, which is layers only)."""


def plan_prune(
    *,
    images: Mapping[str, tuple[str, ...]],
    removable_images: Set[str],
    layers: Mapping[str, LayerUse],
    cache: Mapping[str, CacheRecord],
    now: float,
    max_size: int | None = None,
    max_age: float | None = None,
) -> PrunePlan:
    """Decide what to remove (pure).

    Kept images keep their layers. Cache records whose target is gone are dangling. A layer
    neither an image nor a cache record refers to is an orphan. Layers only the cache refers to
    are evicted, least recently used first, when older than ``max_age`` seconds or while the
    layers' total size is above ``max_size`` bytes; their cache records go with them.
    """
    drop_images = frozenset(removable_images) & images.keys()
    kept_images = images.keys() - drop_images
    image_layers = {d for i in kept_images for d in images[i]}

    def alive(record: CacheRecord) -> bool:
        if record.kind == "layer":
            return record.digest in layers
        return record.digest in kept_images

    live_cache = {k: r for k, r in cache.items() if alive(r)}
    cache_layers = {r.digest for r in live_cache.values() if r.kind == "layer"}
    drop_layers = set(layers.keys() - image_layers - cache_layers)

    candidates = sorted(cache_layers - image_layers, key=lambda d: (layers[d].last_used, d))
    if max_age is not None:
        drop_layers |= {d for d in candidates if layers[d].last_used < now - max_age}
    if max_size is not None:
        total = sum(use.size for d, use in layers.items() if d not in drop_layers)
        for d in candidates:
            if total <= max_size:
                break
            if d not in drop_layers:
                drop_layers.add(d)
                total -= layers[d].size
    drop_cache = {
        k
        for k, r in cache.items()
        if k not in live_cache or (r.kind == "layer" and r.digest in drop_layers)
    }
    return PrunePlan(drop_images, frozenset(drop_layers), frozenset(drop_cache))


@dataclass(frozen=True)
class BlobRecord:
    """A blob that holds a layer's tar: ``media_type`` says how it is compressed.

    ``diff_size`` is the size of the uncompressed tar (what a ``docker save`` archive needs
    before it can write the tar's header), ``None`` when not known.
    """

    digest: str
    media_type: str
    size: int
    diff_size: int | None = None


@dataclass(frozen=True)
class ManifestRecord:
    """A manifest kept as the blob ``digest``, describing the image ``image_id``."""

    digest: str
    media_type: str
    image_id: str
    created: str = ""


@dataclass(frozen=True)
class BlobPrunePlan:
    """The blob records and blobs to remove, decided by :func:`plan_blob_prune`."""

    dist: frozenset[tuple[str, str]] = frozenset()
    manifests: frozenset[str] = frozenset()
    blobs: frozenset[str] = frozenset()


def plan_blob_prune(
    *,
    blobs: Set[str],
    dist: Set[tuple[str, str]],
    manifests: Mapping[str, str],
    layers: Set[str],
    images: Set[str],
) -> BlobPrunePlan:
    """Decide which blob records and blobs go (pure), once ``layers`` and ``images`` are known
    to stay.

    ``dist`` holds ``(diff id, blob digest)`` records, ``manifests`` maps a manifest digest to
    its image id. A record lives while both what it describes and its blob exist; a blob lives
    while a live record names it. Everything else is garbage.
    """
    live_dist = {(d, b) for d, b in dist if d in layers and b in blobs}
    live_manifests = {m for m, i in manifests.items() if i in images and m in blobs}
    referenced = {b for _, b in live_dist} | live_manifests
    return BlobPrunePlan(
        frozenset(set(dist) - live_dist),
        frozenset(manifests.keys() - live_manifests),
        frozenset(set(blobs) - referenced),
    )


class BlobWriter:
    """A blob being written (from :meth:`Store.blob_writer`): :meth:`write` the bytes, then
    :meth:`commit`. ``digest`` and ``size`` describe what was written so far."""

    def __init__(self, part: Path, blobs: Path) -> None:
        self._part = part
        self._blobs = blobs
        self._file: BinaryIO | None = open(part, "wb")  # noqa: SIM115 - closed by close()
        self._sha = hashlib.sha256()
        self.size = 0

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._file is None:
            raise ValueError("write to a blob that is committed or dropped")
        self._file.write(data)
        self._sha.update(data)
        n = len(memoryview(data).cast("B"))
        self.size += n
        return n

    def flush(self) -> None:
        """Nothing to do (:meth:`commit` syncs); present because compressors call it."""

    def commit(self, *, expected: str | None = None, size: int | None = None) -> str:
        """Store the blob (fsynced, then renamed into ``blobs/``); return its digest.

        With ``expected`` or ``size``, a mismatch raises :class:`StoreCorruptError` naming
        both values and stores nothing.
        """
        if self._file is None:
            raise ValueError("commit of a blob that is committed or dropped")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        found = self.digest
        if size is not None and self.size != size:
            raise StoreCorruptError(
                f"blob {expected or found} has {self.size} bytes, expected {size}"
            )
        if expected is not None and found != expected:
            raise StoreCorruptError(f"blob content has digest {found}, expected {expected}")
        os.rename(self._part, self._blobs / found[7:])
        _fsync_dir(self._blobs)
        return found

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Store:
    """The content-addressed image store at ``root`` (created if missing).

    ``in_use(image_id)`` says whether a container uses an image (removal then needs ``force``);
    ``tree_digest`` fingerprints unpacked layers at creation so :meth:`fsck` can recheck them.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        in_use: Callable[[str], bool] | None = None,
        tree_digest: TreeDigest | None = None,
    ) -> None:
        self.root = Path(root)
        self._in_use = in_use or _never
        self._tree = tree_digest if tree_digest is not None else DEFAULT_TREE_DIGEST
        self._blobs = self.root / "blobs" / "sha256"
        self._dist = self.root / "dist" / "sha256"
        self._manifests = self.root / "manifests" / "sha256"
        self._layers = self.root / "layers" / "sha256"
        self._images = self.root / "images" / "sha256"
        self._tags = self.root / "tags.json"
        self._cache = self.root / "cache"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        self._key_locks = self._locks / "keys"
        self._init_layout()

    @classmethod
    def open(cls, env: Mapping[str, str] | None = None, **options: Any) -> Store:
        """The store of this user (see :func:`store_root`)."""
        return cls(store_root(os.environ if env is None else env), **options)

    def _init_layout(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in (
                self._blobs,
                self._dist,
                self._manifests,
                self._layers,
                self._images,
                self._cache,
                self._tmp,
            ):
                d.mkdir(parents=True, exist_ok=True)
            self._key_locks.mkdir(parents=True, exist_ok=True)
            version_file = self.root / "version"
            if not version_file.exists():
                self._atomic_write(version_file, f"{LAYOUT_VERSION}\n".encode())
            version = version_file.read_text().strip()
        except OSError as e:
            raise ImageError(f"cannot open the image store {self.root}: {e}") from e
        if version != LAYOUT_VERSION:
            raise ImageError(
                f"the image store {self.root} has layout version {version!r}; this version of "
                f"pytest-isolate understands {LAYOUT_VERSION!r} (use another PYTEST_ISOLATE_STORE)"
            )

    # --- locks and work directories ---

    @staticmethod
    @contextmanager
    def writeback() -> Iterator[None]:
        """Start writing dirty data to disk in a thread while the body runs.

        For a layer producer between writing its files and hashing them: the disk works while
        the CPU hashes, and the ``sync`` that makes the layer durable before it appears finds
        little left to do (a 20 MB COPY: 19 ms of sync, most of it overlapped).
        """
        thread = threading.Thread(target=os.sync, name="writeback", daemon=True)
        thread.start()
        try:
            yield
        finally:
            thread.join()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Hold while using layers that no image refers to yet (a build): prune waits.

        Shared between any number of holders. The lock belongs to the open file, so a child
        forked meanwhile holds it too, until it exits or execs. :meth:`prune` in a process that
        holds the guard raises instead of waiting for itself.
        """
        key = str(self.root)
        with _flock(self._locks / "gc.lock", shared=True):
            with _GUARDS_LOCK:
                _GUARDS_HELD[key] = _GUARDS_HELD.get(key, 0) + 1
            try:
                yield
            finally:
                with _GUARDS_LOCK:
                    _GUARDS_HELD[key] -= 1

    @contextmanager
    def key_lock(self, key: str) -> Iterator[None]:
        """Hold the lock of ``key`` for a check-then-act of your own (take :meth:`guard` first).

        The same lock files as :meth:`ensure_layer`'s, so use a key of your own: a thread that
        holds a key's lock and calls :meth:`ensure_layer` with that key waits for itself.
        """
        with _flock(self._key_locks / f"{_check_key(key)}.lock"):
            yield

    @contextmanager
    def _work(self) -> Iterator[Path]:
        """A fresh directory under ``tmp/`` owned by this process (flock held) until exit."""
        fd, token = self._claim_token()
        path = self._tmp / token
        try:
            yield path
        finally:
            try:
                _remove_tree(path)
                with suppress(FileNotFoundError):
                    os.unlink(self._tmp / f"{token}.lock")
            finally:
                os.close(fd)

    def _claim_token(self) -> tuple[int, str]:
        # The lock file exists, locked, before the directory does, and is verified to still be
        # ours after: a sweeper that took the lock in the instant between open and flock may
        # have unlinked it, and then we start over with a new token.
        while True:
            token = uuid.uuid4().hex
            lock = self._tmp / f"{token}.lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, f"{os.getpid()}\n".encode())  # for people; never read back
                os.mkdir(self._tmp / token, 0o700)
                if _same_file(fd, lock):
                    return fd, token
                _remove_tree(self._tmp / token)
            except BaseException:
                with suppress(OSError):
                    if _same_file(fd, lock):
                        os.unlink(lock)
                os.close(fd)
                raise
            os.close(fd)

    def _sweep_tmp(self) -> list[str]:
        """Remove work left in ``tmp/`` by dead owners; return the tokens removed."""
        removed: list[str] = []
        names = os.listdir(self._tmp)
        tokens = {n.removesuffix(".lock") for n in names if n.endswith(".lock")}
        for token in sorted(tokens):
            lock = self._tmp / f"{token}.lock"
            try:
                fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # the owner is alive
                if not _same_file(fd, lock):
                    continue
                if os.path.lexists(self._tmp / token):
                    _remove_tree(self._tmp / token)
                    removed.append(token)
                os.unlink(lock)
            finally:
                os.close(fd)
        for name in sorted(set(names) - {f"{t}.lock" for t in tokens} - tokens):
            # A directory without its lock file: the owner creates the lock first and deletes it
            # last, so this has no owner -- unless the listing missed a lock created meanwhile.
            if os.path.lexists(self._tmp / f"{name}.lock"):
                continue
            _remove_tree(self._tmp / name)
            removed.append(name)
        return removed

    def _atomic_write(self, path: Path, data: bytes) -> None:
        with self._work() as work:
            part = work / "part"
            _write_synced(part, data)
            os.rename(part, path)
            _fsync_dir(path.parent)

    # --- blobs ---

    def put_blob(self, stream: BinaryIO, *, expected: str | None = None) -> str:
        """Store the bytes of ``stream``; return their digest.

        With ``expected``, a mismatch raises :class:`StoreCorruptError` and stores nothing.
        """
        if expected is not None:
            _check_sha256(expected)
        with self._work() as work:
            part = work / "blob"
            digest = hashlib.sha256()
            with open(part, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            found = "sha256:" + digest.hexdigest()
            if expected is not None and found != expected:
                raise StoreCorruptError(f"blob content has digest {found}, expected {expected}")
            # Replacing an existing blob is harmless (same bytes) and repairs a corrupted one.
            os.rename(part, self._blobs / digest.hexdigest())
            _fsync_dir(self._blobs)
        return found

    def has_blob(self, digest: str) -> bool:
        return (self._blobs / _check_sha256(digest)).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a blob for reading; :class:`ImageNotFound` if the store does not have it."""
        path = self._blobs / _check_sha256(digest)
        try:
            return open(path, "rb")
        except FileNotFoundError as e:
            raise ImageNotFound(f"blob {digest} is not in the store {self.root}") from e

    @contextmanager
    def blob_writer(self) -> Iterator[BlobWriter]:
        """A blob to write piece by piece (a stream that is pushed, not pulled: a tar packer, a
        compressor); it is stored by :meth:`BlobWriter.commit`, and dropped on leaving the
        ``with`` without a commit, or on an exception. Hold :meth:`guard` until a record
        refers to the blob, or :meth:`prune` may take it.
        """
        with self._work() as work:
            writer = BlobWriter(work / "blob", self._blobs)
            try:
                yield writer
            finally:
                writer.close()

    def record_layer_blob(self, diff_id: str, blob: BlobRecord) -> None:
        """Record that ``blob`` (in ``blobs/``) holds the tar of the layer ``diff_id``.

        Both must be in the store; its size must match. An export then uses the blob instead of
        packing and compressing the layer again, and a pulled layer (whose diff id a re-pack
        would not reproduce) can be sent on at all.
        """
        diff_hex = _check_sha256(diff_id)
        blob_hex = _check_sha256(blob.digest)
        with self.guard():
            if not self.has_layer(diff_id):
                raise ImageError(f"cannot record a blob of layer {diff_id}: no such layer")
            self._check_blob_size(blob.digest, blob.size)
            data: dict[str, Any] = {"mediaType": blob.media_type, "size": blob.size}
            if blob.diff_size is not None:
                data["diffSize"] = blob.diff_size
            directory = self._dist / diff_hex
            directory.mkdir(exist_ok=True)
            self._atomic_write(directory / f"{blob_hex}.json", canonical_json(data))

    def layer_blobs(self, diff_id: str) -> list[BlobRecord]:
        """The recorded blobs of a layer whose blob is present, by digest.

        A record that cannot be read is left out (``fsck`` reports it; ``prune`` keeps it only
        while it is readable and its blob and layer exist).
        """
        directory = self._dist / _check_sha256(diff_id)
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            record = self._read_dist(directory / name)
            if record is not None and (self._blobs / record.digest[7:]).is_file():
                found.append(record)
        return found

    def _read_dist(self, path: Path) -> BlobRecord | None:
        hexname = path.name.removesuffix(".json")
        if not (path.name.endswith(".json") and _HEX64.fullmatch(hexname)):
            return None
        try:
            data = json.loads(path.read_bytes())
            size, diff_size = data["size"], data.get("diffSize")
            if not isinstance(size, int) or not (diff_size is None or isinstance(diff_size, int)):
                return None
            return BlobRecord("sha256:" + hexname, str(data["mediaType"]), size, diff_size)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _check_blob_size(self, digest: str, size: int) -> None:
        try:
            found = os.stat(self._blobs / _check_sha256(digest)).st_size
        except FileNotFoundError as e:
            raise ImageNotFound(f"blob {digest} is not in the store {self.root}") from e
        if found != size:
            raise StoreCorruptError(f"blob {digest} has {found} bytes, not {size}")

    def record_manifest(self, digest: str, media_type: str, image_id: str) -> None:
        """Record that the blob ``digest`` is a manifest of the image ``image_id``.

        Then ``name@<digest>`` resolves to the image, and an export can send the same manifest
        (same digest) again. The blob and the image must be in the store.
        """
        manifest_hex = _check_sha256(digest)
        with self.guard():
            if not self._image_path(image_id).is_file():
                raise ImageNotFound(f"cannot record manifest {digest}: no image {image_id}")
            if not self.has_blob(digest):
                raise ImageNotFound(f"cannot record manifest {digest}: the blob is missing")
            path = self._manifests / f"{manifest_hex}.json"
            old = self._read_manifest_record(path)
            if old is not None and old.image_id == image_id and old.media_type == media_type:
                return  # keep its creation time: the first manifest of an image stays first
            data = {"image": image_id, "mediaType": media_type, "created": _now()}
            self._atomic_write(path, canonical_json(data))

    def manifest_records(self, image_id: str) -> list[ManifestRecord]:
        """The manifests recorded for an image whose blob is present, oldest first."""
        _check_sha256(image_id)
        found = []
        for name in os.listdir(self._manifests):
            record = self._read_manifest_record(self._manifests / name)
            if record is not None and record.image_id == image_id and self.has_blob(record.digest):
                found.append(record)
        return sorted(found, key=lambda r: (r.created, r.digest))

    def manifest_image(self, digest: str) -> str | None:
        """The image a recorded manifest describes, or None when it is not recorded."""
        path = self._manifests / f"{_check_sha256(digest)}.json"
        record = self._read_manifest_record(path)
        return None if record is None else record.image_id

    def _read_manifest_record(self, path: Path) -> ManifestRecord | None:
        hexname = path.name.removesuffix(".json")
        if not (path.name.endswith(".json") and _HEX64.fullmatch(hexname)):
            return None
        try:
            data = json.loads(path.read_bytes())
            image = data["image"]
            check_digest(image)
            return ManifestRecord(
                "sha256:" + hexname, str(data["mediaType"]), image, str(data.get("created", ""))
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # --- layers ---

    def ensure_layer(
        self,
        key: str,
        produce: Producer,
        *,
        parent: str | None = None,
        force: bool = False,
        fingerprint: TreeDigest | None = None,
    ) -> LayerRecord:
        """The layer recorded under cache ``key``, produced by ``produce`` if there is none.

        ``produce(directory)`` fills the empty ``directory`` and returns the layer's diff id; it
        runs at most once at a time per key across all processes, and not at all when another
        process has produced the key meanwhile. ``parent`` is the chain id of the layer below,
        kept in the metadata. An exception from ``produce`` propagates and stores nothing.
        ``force`` produces even when the key has a layer, and points the key at the new one
        (a build with ``--no-cache``; a commit). ``fingerprint`` (one of :data:`PACKED_AGAIN`)
        says that the diff id is also the layer's fingerprint for :meth:`fsck`; by default the
        store computes its own tree digest of the new directory.
        """
        _check_key(key)
        if parent is not None:
            check_digest(parent)
        with self.guard():
            found = None if force else self._cached_layer(key)
            if found is not None:
                return found
            with _flock(self._key_locks / f"{key}.lock"):
                found = None if force else self._cached_layer(key)
                if found is not None:
                    return found
                record = self._produce_layer(produce, parent, fingerprint)
                self._write_cache(key, CacheRecord("layer", record.diff_id, _now()))
                return record

    def _cached_layer(self, key: str) -> LayerRecord | None:
        record = self._read_cache(key)
        if record is None or record.kind != "layer":
            return None
        layer = self._read_layer(record.digest)
        if layer is not None:
            self._touch(record.digest)
        return layer

    def _produce_layer(
        self, produce: Producer, parent: str | None, fingerprint: TreeDigest | None
    ) -> LayerRecord:
        with self._work() as work:
            staging = work / "layer"
            diff = staging / "diff"
            diff.mkdir(parents=True)
            diff_id = produce(diff)
            if not isinstance(diff_id, str):
                raise SpecError(f"a layer producer returned {diff_id!r}, not a diff id")
            target = self._layer_dir(diff_id)  # checks the digest
            existing = self._read_layer(diff_id)
            if existing is not None:  # another key produced the same content
                return existing
            if fingerprint is None:
                content = {"algorithm": self._tree.name, "digest": self._tree.compute(diff)}
            else:
                content = {"algorithm": fingerprint.name, "digest": diff_id}
            meta = {
                "diff_id": diff_id,
                "size": _disk_usage(diff),
                "parent": parent,
                "created": _now(),
                "content": content,
            }
            (staging / "meta.json").write_bytes(canonical_json(meta))
            (staging / "used").touch()
            _flush_to_disk()
            try:
                os.rename(staging, target)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            else:
                _fsync_dir(self._layers)
        layer = self._read_layer(diff_id)
        if layer is None:  # pragma: no cover - we hold the gc guard, nobody removes it
            raise StoreCorruptError(f"layer {diff_id} vanished from {self.root} after creation")
        return layer

    def has_layer(self, diff_id: str) -> bool:
        return (self._layer_dir(diff_id) / "meta.json").is_file()

    def get_layer(self, diff_id: str) -> LayerRecord:
        """The unpacked layer with this diff id; :class:`ImageNotFound` if absent."""
        layer = self._read_layer(diff_id)
        if layer is None:
            raise ImageNotFound(f"layer {diff_id} is not in the store {self.root}")
        return layer

    def layer_users(self) -> dict[str, tuple[str, ...]]:
        """Which images use each layer (derived from the configs, never stored)."""
        users: dict[str, list[str]] = {}
        for iid, config in self._all_configs().items():
            for diff_id in dict.fromkeys(config.diff_ids):
                users.setdefault(diff_id, []).append(iid)
        return {d: tuple(sorted(ids)) for d, ids in users.items()}

    def image_layers(self, ref_or_id: str) -> list[LayerRecord]:
        """An image's unpacked layers, bottom first (overlay wants them top first)."""
        image = self.get_image(ref_or_id)
        layers = []
        for diff_id in image.config.diff_ids:
            layer = self._read_layer(diff_id)
            if layer is None:
                raise StoreCorruptError(
                    f"image {image.short_id} needs layer {diff_id}, which is missing from "
                    f"{self.root} (run fsck)"
                )
            layers.append(layer)
        return layers

    def _layer_dir(self, diff_id: str) -> Path:
        return self._layers / _check_sha256(diff_id)

    def _read_layer(self, diff_id: str) -> LayerRecord | None:
        base = self._layer_dir(diff_id)
        try:
            meta = json.loads((base / "meta.json").read_bytes())
            content = meta.get("content") or {}
            return LayerRecord(
                diff_id=meta["diff_id"],
                path=base / "diff",
                size=int(meta["size"]),
                parent=meta.get("parent"),
                created=meta["created"],
                content_digest=content.get("digest"),
                content_algorithm=content.get("algorithm"),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise StoreCorruptError(f"unreadable layer metadata {base / 'meta.json'}: {e}") from e

    def _touch(self, diff_id: str) -> None:
        with suppress(OSError):  # best effort: a missed stamp only makes pruning less precise
            os.utime(self._layer_dir(diff_id) / "used")

    # --- images and tags ---

    def put_image(self, config: ImageConfig | bytes) -> str:
        """Store an image config; return its id. Bytes are kept as they are (registry configs).

        Every layer of the image must already be in the store.
        """
        if isinstance(config, bytes):
            data, parsed = config, ImageConfig.from_json(config)
        else:
            data, parsed = config.to_json(), config
        iid = image_id(data)
        with self.guard():
            for diff_id in parsed.diff_ids:
                if not self.has_layer(diff_id):
                    raise ImageError(
                        f"cannot store image {iid}: its layer {diff_id} is not in the store "
                        f"{self.root}"
                    )
            path = self._image_path(iid)
            if not path.exists():
                self._atomic_write(path, data)
        return iid

    def get_image(self, ref_or_id: str) -> Image:
        """An image by tag (``busybox``), id, unique id prefix, or ``name@digest``."""
        iid = self.resolve(ref_or_id)
        tags = tuple(sorted(t for t, i in self._read_tags().items() if i == iid))
        return Image(iid, self._load_config(iid, ref_or_id), tags)

    def resolve(self, ref_or_id: str) -> str:
        """The image id ``ref_or_id`` names; :class:`ImageNotFound` if none, ImageError if
        an id prefix is ambiguous, :class:`SpecError` if it is neither a reference nor an id."""
        text = ref_or_id
        full = text.removeprefix("sha256:")
        if _HEX64.fullmatch(full):
            if self._image_path("sha256:" + full).is_file():
                return "sha256:" + full
            raise ImageNotFound(f"no image {text!r} in the store {self.root}")
        problem: SpecError | None = None
        try:
            ref = parse(text)
        except SpecError as e:
            problem = e
        else:
            tags = self._read_tags()
            iid = tags.get(ref.canonical)
            if iid is None and ref.digest is not None and ref.tag is not None:
                iid = tags.get(f"{ref.name}@{ref.digest}")  # recorded without the tag
            if iid is not None:
                if self._image_path(iid).is_file():
                    return iid
                raise ImageNotFound(
                    f"tag {ref.familiar} points to image {iid}, which is not in the store "
                    f"{self.root} (run fsck)"
                )
            digest = ref.digest
            if digest and digest.startswith("sha256:"):
                if self._image_path(digest).is_file():
                    return digest
                described = self.manifest_image(digest)  # name@<manifest digest>
                if described is not None and self._image_path(described).is_file():
                    return described
        prefix = _ID_PREFIX.fullmatch(text)
        if prefix is not None:
            matches = sorted(
                n.removesuffix(".json")
                for n in os.listdir(self._images)
                if n.startswith(prefix.group(1)) and n.endswith(".json")
            )
            if len(matches) == 1:
                return "sha256:" + matches[0]
            if len(matches) > 1:
                raise ImageError(
                    f"image id prefix {text!r} is ambiguous: it matches {len(matches)} images"
                )
        if problem is not None and prefix is None:
            raise problem
        raise ImageNotFound(f"no image {text!r} in the store {self.root}")

    def list_images(self) -> list[Image]:
        """All images, newest first."""
        tags: dict[str, list[str]] = {}
        for ref, iid in self._read_tags().items():
            tags.setdefault(iid, []).append(ref)
        images = [
            Image(iid, config, tuple(sorted(tags.get(iid, ()))))
            for iid, config in self._all_configs().items()
        ]
        images.sort(key=lambda i: (i.config.created or "", i.id), reverse=True)
        return images

    def tag(self, ref: str, target: str) -> str:
        """Point reference ``ref`` at the image ``target`` names; return the canonical ref."""
        canonical = parse(ref).canonical
        with self._tags_locked() as tags:
            tags[canonical] = self.resolve(target)
            self._write_tags(tags)
        return canonical

    def untag(self, ref: str) -> str:
        """Remove a tag; return the image id it pointed to."""
        canonical = parse(ref).canonical
        with self._tags_locked() as tags:
            if canonical not in tags:
                raise ImageNotFound(f"no tag {ref!r} in the store {self.root}")
            iid = tags.pop(canonical)
            self._write_tags(tags)
        return iid

    def remove_image(self, ref_or_id: str) -> list[str]:
        """Remove an image and every tag pointing to it; return those tags.

        Refuses an image a container uses (the ``in_use`` hook), with no way to force it, as
        docker does for a running container: its layers are under the container's overlay, and
        a prune would take them once no image refers to them. Its layers stay until
        :meth:`prune`, which removes those no other image or cache entry needs.
        """
        with self._tags_locked() as tags:
            iid = self.resolve(ref_or_id)
            self.check_unused(iid, ref_or_id)
            removed = sorted(t for t, i in tags.items() if i == iid)
            if removed:  # tags first: a kill in between leaves an untagged image
                self._write_tags({t: i for t, i in tags.items() if i != iid})
            with suppress(FileNotFoundError):
                os.unlink(self._image_path(iid))
        return removed

    def check_unused(self, image_id: str, name: str | None = None) -> None:
        """Raise :class:`ImageError` when a container uses the image (the ``in_use`` hook)."""
        if self._in_use(image_id):
            raise ImageError(
                f"conflict: unable to delete image {name or image_id!r} ({image_id}) (cannot be "
                "forced): it is used by a container; remove the container first"
            )

    def _image_path(self, iid: str) -> Path:
        return self._images / f"{_check_sha256(iid)}.json"

    def config_bytes(self, ref_or_id: str) -> bytes:
        """The config of an image exactly as stored (its digest is the image id; verified)."""
        return self._read_config(self.resolve(ref_or_id), ref_or_id)

    def _read_config(self, iid: str, name: str | None = None) -> bytes:
        path = self._image_path(iid)
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise ImageNotFound(f"no image {name or iid!r} in the store {self.root}") from e
        if image_id(data) != iid:
            raise StoreCorruptError(f"{path}: content has digest {image_id(data)}, not {iid}")
        return data

    def _load_config(self, iid: str, name: str | None = None) -> ImageConfig:
        data = self._read_config(iid, name)
        try:
            return ImageConfig.from_json(data)
        except SpecError as e:
            raise StoreCorruptError(f"{self._image_path(iid)}: {e}") from e

    def _all_configs(self) -> dict[str, ImageConfig]:
        configs = {}
        for name in sorted(os.listdir(self._images)):
            hexid = name.removesuffix(".json")
            if name.endswith(".json") and _HEX64.fullmatch(hexid):
                with suppress(ImageNotFound):  # removed while we listed
                    configs["sha256:" + hexid] = self._load_config("sha256:" + hexid)
        return configs

    def _read_tags(self) -> dict[str, str]:
        try:
            tags = json.loads(self._tags.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StoreCorruptError(f"unreadable tag file {self._tags}: {e}") from e
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise StoreCorruptError(f"{self._tags}: expected an object of image ids")
        return tags

    def _write_tags(self, tags: Mapping[str, str]) -> None:
        self._atomic_write(self._tags, canonical_json(dict(tags)))

    @contextmanager
    def _tags_locked(self) -> Iterator[dict[str, str]]:
        """The tags, read under the lock for a read-modify-:meth:`_write_tags`."""
        with _flock(self._locks / "tags.lock"):
            yield self._read_tags()

    # --- build cache ---

    def get_cache(self, key: str) -> CacheRecord | None:
        """The record of ``key``, or None when absent or when what it names is gone."""
        record = self._read_cache(key)
        if record is None:
            return None
        if record.kind == "layer":
            if not self.has_layer(record.digest):
                return None
            self._touch(record.digest)
        elif not self._image_path(record.digest).is_file():
            return None
        return record

    def put_cache(self, key: str, record: CacheRecord) -> None:
        """Record what ``key`` produced; the layer or image must be in the store."""
        _check_key(key)
        with self.guard():
            present = (
                self.has_layer(record.digest)
                if record.kind == "layer"
                else self._image_path(record.digest).is_file()
            )
            if not present:
                raise ImageError(
                    f"cannot cache key {key!r}: {record.kind} {record.digest} is not in the "
                    f"store {self.root}"
                )
            self._write_cache(key, record)

    def _write_cache(self, key: str, record: CacheRecord) -> None:
        data = {"kind": record.kind, "digest": record.digest, "created": record.created or _now()}
        self._atomic_write(self._cache / f"{key}.json", canonical_json(data))

    def _read_cache(self, key: str) -> CacheRecord | None:
        path = self._cache / f"{_check_key(key)}.json"
        try:
            data = json.loads(path.read_bytes())
            return CacheRecord(data["kind"], data["digest"], data.get("created", ""))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreCorruptError(f"unreadable cache record {path}: {e}") from e

    def _cache_keys(self) -> list[str]:
        return sorted(
            n.removesuffix(".json")
            for n in os.listdir(self._cache)
            if n.endswith(".json") and _KEY.fullmatch(n.removesuffix(".json"))
        )

    # --- maintenance ---

    def prune(
        self,
        *,
        keep_images: bool = True,
        max_size: int | None = None,
        max_age: float | None = None,
    ) -> PruneReport:
        """Remove dead temp work, orphan layers, dangling cache entries, the blob records of
        layers and images that are gone, and the blobs no record refers to.

        ``keep_images=False`` also removes every image no container uses. ``max_size`` (disk
        bytes of unpacked layers; blobs are not counted) and ``max_age`` (seconds since last use) evict cache-only layers, least recently
        used first. Waits for holders of :meth:`guard` (builds) to finish.
        """
        if max_size is not None and max_size < 0:
            raise SpecError(f"prune: max_size must be >= 0, not {max_size}")
        if max_age is not None and max_age < 0:
            raise SpecError(f"prune: max_age must be >= 0, not {max_age}")
        if _GUARDS_HELD.get(str(self.root)):
            raise ImageError(
                f"prune of {self.root} called while this process holds Store.guard(): it would "
                "wait for itself"
            )
        with _flock(self._locks / "gc.lock"):
            swept = self._sweep_tmp()
            configs = self._all_configs()
            layers = self._layer_uses()
            cache: dict[str, CacheRecord] = {}
            for key in self._cache_keys():
                record = self._read_cache(key)
                if record is not None:
                    cache[key] = record
            plan = plan_prune(
                images={i: c.diff_ids for i, c in configs.items()},
                removable_images=set()
                if keep_images
                else {i for i in configs if not self._in_use(i)},
                layers=layers,
                cache=cache,
                now=time.time(),
                max_size=max_size,
                max_age=max_age,
            )
            # Order matters for a kill at any point: images before the layers they use.
            if plan.images:
                with self._tags_locked() as tags:
                    self._write_tags({t: i for t, i in tags.items() if i not in plan.images})
                    for iid in plan.images:
                        with suppress(FileNotFoundError):
                            os.unlink(self._image_path(iid))
            for key in sorted(plan.cache):
                with suppress(FileNotFoundError):
                    os.unlink(self._cache / f"{key}.json")
            for diff_id in sorted(plan.layers):
                self._remove_layer(diff_id)
            blob_plan = self._prune_blobs(
                layers=layers.keys() - plan.layers, images=configs.keys() - plan.images
            )
            # Nobody holds a key lock without the guard, which we exclude: safe to clear.
            for name in os.listdir(self._key_locks):
                with suppress(FileNotFoundError):
                    os.unlink(self._key_locks / name)
        freed = sum(layers[d].size for d in plan.layers)
        return PruneReport(
            tmp=tuple(swept),
            images=tuple(sorted(plan.images)),
            layers=tuple(sorted(plan.layers)),
            cache=tuple(sorted(plan.cache)),
            freed=freed,
            kept=sum(u.size for u in layers.values()) - freed,
            blobs=tuple(sorted(blob_plan[0].blobs)),
            blob_bytes=blob_plan[1],
        )

    def _prune_blobs(self, *, layers: Set[str], images: Set[str]) -> tuple[BlobPrunePlan, int]:
        """Remove records whose layer, image or blob is gone, then unreferenced blobs (under
        the exclusive gc lock). Returns the plan and the bytes of blobs removed."""
        blobs = {"sha256:" + n for n in os.listdir(self._blobs) if _HEX64.fullmatch(n)}
        dist: set[tuple[str, str]] = set()
        unreadable: list[Path] = []
        for diff_hex in os.listdir(self._dist):
            directory = self._dist / diff_hex
            if not _HEX64.fullmatch(diff_hex) or not directory.is_dir():
                continue
            for name in os.listdir(directory):
                if self._read_dist(directory / name) is None:
                    unreadable.append(directory / name)
                else:
                    dist.add(("sha256:" + diff_hex, "sha256:" + name.removesuffix(".json")))
        manifests: dict[str, str] = {}
        for name in os.listdir(self._manifests):
            record = self._read_manifest_record(self._manifests / name)
            if record is None:
                unreadable.append(self._manifests / name)
            else:
                manifests[record.digest] = record.image_id
        plan = plan_blob_prune(
            blobs=blobs, dist=dist, manifests=manifests, layers=layers, images=images
        )
        # Records before blobs: a kill in between leaves unreferenced blobs, never a record
        # naming a blob that is gone.
        for path in unreadable:
            with suppress(FileNotFoundError):
                os.unlink(path)
        for diff_id, blob in sorted(plan.dist):
            with suppress(FileNotFoundError):
                os.unlink(self._dist / diff_id[7:] / f"{blob[7:]}.json")
        for digest in sorted(plan.manifests):
            with suppress(FileNotFoundError):
                os.unlink(self._manifests / f"{digest[7:]}.json")
        for diff_hex in os.listdir(self._dist):
            with suppress(OSError):  # not empty: still has records
                os.rmdir(self._dist / diff_hex)
        freed = 0
        for digest in sorted(plan.blobs):
            path = self._blobs / digest[7:]
            with suppress(FileNotFoundError):
                freed += os.stat(path).st_size
                os.unlink(path)
        return plan, freed

    def _layer_uses(self) -> dict[str, LayerUse]:
        uses = {}
        for name in sorted(os.listdir(self._layers)):
            if not _HEX64.fullmatch(name):
                continue
            diff_id = "sha256:" + name
            layer = self._read_layer(diff_id)
            if layer is None:
                continue
            try:
                last = os.stat(self._layers / name / "used").st_mtime
            except FileNotFoundError:
                last = 0.0
            uses[diff_id] = LayerUse(layer.size, last)
        return uses

    def _remove_layer(self, diff_id: str) -> None:
        # Out of layers/ in one rename, then deleted in tmp/: a kill mid-way leaves dead work
        # for the sweeper, never a half-deleted layer.
        with self._work() as work:
            try:
                os.rename(self._layer_dir(diff_id), work / "gone")
            except FileNotFoundError:
                return
            _fsync_dir(self._layers)

    def fsck(self) -> list[Problem]:
        """Check the store: blob digests, image configs and their layers, layer contents, tags."""
        problems: list[Problem] = []
        with self.guard():
            problems += self._check_blobs()
            problems += self._check_blob_records()
            problems += self._check_layers()
            images = self._check_images(problems)
            for ref, iid in sorted(self._read_tags().items()):
                if iid not in images:
                    problems.append(Problem("tag", ref, f"points to missing image {iid}"))
            for key in self._cache_keys():
                try:
                    self._read_cache(key)
                except (StoreCorruptError, SpecError) as e:
                    problems.append(Problem("cache", key, str(e)))
        return problems

    def _check_blobs(self) -> list[Problem]:
        problems = []
        for name in sorted(os.listdir(self._blobs)):
            if not _HEX64.fullmatch(name):
                problems.append(Problem("blob", name, "not a sha256 digest name"))
                continue
            found = _file_sha256(self._blobs / name)
            if found != name:
                problems.append(
                    Problem("blob", f"sha256:{name}", f"content has digest sha256:{found}")
                )
        return problems

    def _check_blob_records(self) -> list[Problem]:
        """Records of layers and images that exist must be readable and name blobs that are
        there, of the recorded size (a manifest: of that image). Records of what is gone are
        garbage for :meth:`prune`, not problems."""
        problems = []
        for diff_hex in sorted(os.listdir(self._dist)):
            diff_id = f"sha256:{diff_hex}"
            directory = self._dist / diff_hex
            if not _HEX64.fullmatch(diff_hex) or not directory.is_dir():
                problems.append(Problem("blob", str(directory), "not a layer's record directory"))
                continue
            if not self.has_layer(diff_id):
                continue
            for name in sorted(os.listdir(directory)):
                record = self._read_dist(directory / name)
                if record is None:
                    problems.append(
                        Problem("blob", str(directory / name), f"unreadable record of {diff_id}")
                    )
                    continue
                try:
                    self._check_blob_size(record.digest, record.size)
                except (ImageNotFound, StoreCorruptError) as e:
                    problems.append(Problem("blob", record.digest, f"layer {diff_id}: {e}"))
        for name in sorted(os.listdir(self._manifests)):
            path = self._manifests / name
            manifest = self._read_manifest_record(path)
            if manifest is None:
                problems.append(Problem("manifest", str(path), "unreadable record"))
                continue
            if not self._image_path(manifest.image_id).is_file():
                continue
            try:
                with self.open_blob(manifest.digest) as f:
                    config = json.loads(f.read())["config"]["digest"]
            except ImageNotFound:
                problems.append(Problem("manifest", manifest.digest, "its blob is missing"))
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(Problem("manifest", manifest.digest, f"unreadable manifest: {e}"))
                continue
            if config != manifest.image_id:
                problems.append(
                    Problem(
                        "manifest",
                        manifest.digest,
                        f"names config {config}, recorded for image {manifest.image_id}",
                    )
                )
        return problems

    def _check_layers(self) -> list[Problem]:
        problems = []
        known = {t.name: t for t in (self._tree, *PACKED_AGAIN.values())}
        for name in sorted(os.listdir(self._layers)):
            diff_id = f"sha256:{name}"
            if not _HEX64.fullmatch(name):
                problems.append(Problem("layer", name, "not a sha256 digest name"))
                continue
            try:
                layer = self._read_layer(diff_id)
            except StoreCorruptError as e:
                problems.append(Problem("layer", diff_id, str(e)))
                continue
            if layer is None:
                problems.append(Problem("layer", diff_id, "meta.json is missing"))
            elif layer.diff_id != diff_id:
                problems.append(Problem("layer", diff_id, f"meta.json names {layer.diff_id}"))
            elif not layer.path.is_dir() or layer.path.is_symlink():
                problems.append(Problem("layer", diff_id, f"{layer.path} is not a directory"))
            elif layer.content_digest and layer.content_algorithm in known:
                algorithm = known[layer.content_algorithm]
                found = algorithm.compute(layer.path)
                if found != layer.content_digest:
                    problems.append(
                        Problem(
                            "layer",
                            diff_id,
                            f"content changed: {algorithm.name} digest is {found}, "
                            f"recorded {layer.content_digest}",
                        )
                    )
        return problems

    def _check_images(self, problems: list[Problem]) -> set[str]:
        present = set()
        for name in sorted(os.listdir(self._images)):
            hexid = name.removesuffix(".json")
            if not (name.endswith(".json") and _HEX64.fullmatch(hexid)):
                problems.append(Problem("image", name, "not a sha256 digest name"))
                continue
            iid = f"sha256:{hexid}"
            present.add(iid)
            try:
                config = self._load_config(iid)
            except (StoreCorruptError, ImageNotFound) as e:
                problems.append(Problem("image", iid, str(e)))
                continue
            for diff_id in config.diff_ids:
                if not self.has_layer(diff_id):
                    problems.append(Problem("image", iid, f"layer {diff_id} is missing"))
        return present


# --- helpers: names and times ---


def _never(_image_id: str) -> bool:
    return False


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise SpecError(
            f"invalid cache key {key!r}: use 1-200 letters, digits and '._:+=-', starting "
            "with a letter or digit"
        )
    return key


def _check_sha256(digest: str) -> str:
    """The hex part of a ``sha256:`` digest (the store names files by it)."""
    check_digest(digest)
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256":
        raise SpecError(f"the store only holds sha256 content, not {digest!r}")
    return encoded
