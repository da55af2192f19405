"""``save`` and ``load``: images to and from files, in the formats docker, podman and skopeo use.

Formats written by :func:`save`:

``docker-archive``
    A tar as ``docker save`` writes it: ``manifest.json`` (``Config``, ``RepoTags``,
    ``Layers``), the config as ``<config-hex>.json`` and each layer as an uncompressed
    ``<diff-id-hex>/layer.tar``.
``oci-archive`` / ``oci-dir``
    An OCI image layout, as a tar or as a directory: ``oci-layout``, ``index.json`` whose
    entries carry the reference in ``org.opencontainers.image.ref.name`` (and containerd's
    ``io.containerd.image.name``), and ``blobs/sha256/<hex>``: the manifest, the config and the
    gzip-compressed layers (:func:`runtime.image.exchange.export_image`).

:func:`load` reads all of them, finding the format by content: a tar (plain or gzip-compressed)
or a directory, holding ``manifest.json`` (docker, old layout ``<id>/layer.tar`` and the newer
``blobs/sha256/<hex>`` one) or an OCI layout (nested indexes: this host's platform).

An archive is untrusted input, so loading is careful:

* Nothing is extracted to disk. Entries are read by name from the tar (or opened inside the
  directory with :mod:`runtime.image.safepath`), and a name resolves inside the archive as if it
  were a root: a symlink entry (``docker save`` links repeated layers) is followed *inside* the
  archive; a name that climbs out with ``..`` or is absolute is refused, as are tar entries
  named so.
* It is planned before anything is stored: the structure is parsed, every entry the images
  need is found, hashed and checked against its digest, size and diff id, and every layer tar's
  entry names are checked by the unpacker's rules. Only then are layers unpacked
  (:func:`runtime.image.exchange.import_layer`, which verifies again as it reads) and images
  stored. A refusal names the archive and the entry, and leaves nothing of the archive behind.

Writing is atomic: the archive is made next to ``out`` under a temporary name and renamed at
the end, so a failure (a layer that does not pack to its diff id) leaves no half archive.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, cast

from runtime.errors import (
    ImageError,
    ImageNotFound,
    LayerError,
    SpecError,
    StoreCorruptError,
    UnsafePathError,
)
from runtime.image import safepath
from runtime.image.config import FrozenDict, ImageConfig, image_id
from runtime.image.exchange import export_image, import_image, import_layer, uncompressed
from runtime.image.layer import clean_name, layer_digest, pack_layer, plan_entry
from runtime.image.manifest import (
    ANNOTATION_REF_NAME,
    INDEX_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Descriptor,
    Index,
    Manifest,
    layer_compression,
    make_index,
    parse_manifest,
    select_platform,
)
from runtime.image.reference import parse
from runtime.image.store import Store

__all__ = ["FORMATS", "Format", "load", "save"]

Format = Literal["docker-archive", "oci-archive", "oci-dir"]
FORMATS: tuple[Format, ...] = ("docker-archive", "oci-archive", "oci-dir")

CONTAINERD_NAME = "io.containerd.image.name"
"""The full reference docker (25+) and containerd write next to the OCI ``ref.name``."""

_CHUNK = 1 << 20
_MAX_JSON = 64 << 20
"""The biggest ``manifest.json``, ``index.json`` or config we read into memory."""
_LAYOUT_VERSION = "1.0.0"


# --- saving ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Named:
    """An image to save and the tags it goes under (canonical; none for an id)."""

    image_id: str
    refs: tuple[str, ...]


def _plan_names(store: Store, refs: Sequence[str]) -> list[_Named]:
    """Resolve the references; a tag (not an id or a digest) names the image in the archive."""
    if not refs:
        raise SpecError("save: name at least one image")
    order: dict[str, list[str]] = {}
    for text in refs:
        image = store.get_image(text)
        names = order.setdefault(image.id, [])
        try:
            ref = parse(text)
        except SpecError:
            continue  # an id or id prefix
        # Only a tag the image has: "sha256:<id>" parses as a reference too.
        if ref.digest is None and ref.canonical in image.tags and ref.canonical not in names:
            names.append(ref.canonical)
    return [_Named(iid, tuple(names)) for iid, names in order.items()]


def save(
    store: Store,
    refs: Sequence[str],
    out: str | os.PathLike[str],
    *,
    format: Format = "docker-archive",
    rootless: bool | None = None,
) -> None:
    """Write the images ``refs`` name (tags, ids, ``name@digest``) to ``out`` in ``format``.

    ``out`` must not exist (``oci-dir``: or be an empty directory). Raises
    :class:`ImageNotFound` for an unknown reference and :class:`StoreCorruptError` for a layer
    that does not pack to its diff id; ``out`` is then left as it was.
    """
    if format not in FORMATS:
        raise SpecError(f"save: unknown format {format!r}; use one of {', '.join(FORMATS)}")
    target = Path(out)
    unprivileged = os.geteuid() != 0 if rootless is None else rootless
    with store.guard():
        images = _plan_names(store, refs)
        if format == "oci-dir":
            _save_oci_dir(store, images, target, unprivileged)
        else:
            _refuse_existing(target)
            part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
            try:
                with open(part, "xb") as f:
                    tar = _TarWriter(f)
                    if format == "docker-archive":
                        _write_docker(store, images, tar, unprivileged)
                    else:
                        # Directory entries first: a rootless reader that unpacks the tar
                        # (skopeo) would make missing parents owned by root, and fail.
                        tar.add_dir("blobs/")
                        tar.add_dir("blobs/sha256/")
                        _write_oci(store, images, tar.add_file, unprivileged)
                    tar.close()
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(part, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part)
                raise


def _refuse_existing(target: Path) -> None:
    if os.path.lexists(target):
        raise SpecError(f"save: {target} exists; choose a new file name")


def _save_oci_dir(store: Store, images: list[_Named], target: Path, rootless: bool) -> None:
    if os.path.lexists(target) and (
        not target.is_dir() or target.is_symlink() or any(target.iterdir())
    ):
        raise SpecError(f"save: {target} exists and is not an empty directory")
    part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
    part.mkdir()
    try:

        def add(name: str, size: int, write: Callable[[BinaryIO], None]) -> None:
            path = part / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                exact = _Exact(f, size, name)
                write(cast(BinaryIO, exact))
                exact.check()
                f.flush()
                os.fsync(f.fileno())

        _write_oci(store, images, add, rootless)
        if target.is_dir():
            target.rmdir()
        os.rename(part, target)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


AddFile = Callable[[str, int, Callable[[BinaryIO], None]], None]
"""Adds a file ``name`` of ``size`` bytes whose content ``write(out)`` writes."""


def _write_oci(store: Store, images: list[_Named], add: AddFile, rootless: bool) -> None:
    """An OCI image layout: blobs once each, then ``index.json`` with one entry per name."""
    written: set[str] = set()

    def blob(digest: str, size: int, write: Callable[[BinaryIO], None]) -> None:
        if digest not in written:
            written.add(digest)
            add(f"blobs/sha256/{digest[7:]}", size, write)

    entries = []
    for image in images:
        exported = export_image(store, image.image_id, docker=False, rootless=rootless)
        for layer in exported.layers:
            d = layer.descriptor
            blob(d.digest, d.size, _blob_copier(store, d.digest))
        blob(exported.config.digest, exported.config.size, _bytes_writer(exported.config_bytes))
        blob(exported.manifest_digest, len(exported.manifest), _bytes_writer(exported.manifest))
        base = Descriptor(exported.media_type, exported.manifest_digest, len(exported.manifest))
        for ref in image.refs or (None,):
            notes = {} if ref is None else {ANNOTATION_REF_NAME: ref, CONTAINERD_NAME: ref}
            entries.append(
                Descriptor(base.media_type, base.digest, base.size, None, FrozenDict(notes))
            )
    layout = json.dumps({"imageLayoutVersion": _LAYOUT_VERSION}).encode()
    add("oci-layout", len(layout), _bytes_writer(layout))
    index = make_index(entries)
    add("index.json", len(index), _bytes_writer(index))


def _write_docker(store: Store, images: list[_Named], tar: _TarWriter, rootless: bool) -> None:
    """``docker save``'s layout: ``<config>.json``, ``<diff-id>/layer.tar``, ``manifest.json``."""
    entries = []
    written: set[str] = set()
    for image in images:
        config_bytes = store.config_bytes(image.image_id)
        config_name = f"{image.image_id[7:]}.json"
        if config_name not in written:
            written.add(config_name)
            tar.add_file(config_name, len(config_bytes), _bytes_writer(config_bytes))
        layers = []
        for diff_id in ImageConfig.from_json(config_bytes).diff_ids:
            name = f"{diff_id[7:]}/layer.tar"
            layers.append(name)
            if name not in written:
                written.add(name)
                size, write = _layer_tar(store, diff_id, rootless)
                tar.add_dir(f"{diff_id[7:]}/")
                tar.add_file(name, size, write)
        entries.append({"Config": config_name, "RepoTags": list(image.refs), "Layers": layers})
    data = json.dumps(entries, separators=(",", ":")).encode()
    tar.add_file("manifest.json", len(data), _bytes_writer(data))


def _layer_tar(
    store: Store, diff_id: str, rootless: bool
) -> tuple[int, Callable[[BinaryIO], None]]:
    """The size of a layer's uncompressed tar and a writer of it that checks its digest.

    From a recorded blob when there is one (a pulled layer has no other faithful form), else
    packed from the layer's directory (the store's invariant for built layers).
    """
    for blob in store.layer_blobs(diff_id):
        size = blob.diff_size
        if size is None:
            size = _measure(store, blob.digest)
        return size, _uncompressing_copier(store, blob.digest, diff_id)
    layer = store.get_layer(diff_id)
    owner = (0, 0) if rootless else None
    found, size = layer_digest(layer.path, rootless=rootless)
    if found != diff_id:
        raise _wrong_pack(diff_id, found)

    def write(out: BinaryIO) -> None:
        written, _ = pack_layer(layer.path, out, rootless=rootless, owner=owner)
        if written != diff_id:
            raise _wrong_pack(diff_id, written)

    return size, write


def _wrong_pack(diff_id: str, found: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"layer {diff_id} does not pack to its diff id: the tar has digest {found} (its files "
        "changed in the store? run fsck); not saving it"
    )


def _measure(store: Store, digest: str) -> int:
    size = 0
    with store.open_blob(digest) as raw:
        reader = uncompressed(cast(IO[bytes], raw))
        while chunk := reader.read(_CHUNK):
            size += len(chunk)
    return size


def _uncompressing_copier(store: Store, digest: str, diff_id: str) -> Callable[[BinaryIO], None]:
    def write(out: BinaryIO) -> None:
        sha = hashlib.sha256()
        with store.open_blob(digest) as raw:
            reader = uncompressed(cast(IO[bytes], raw))
            while chunk := reader.read(_CHUNK):
                sha.update(chunk)
                out.write(chunk)
        if "sha256:" + sha.hexdigest() != diff_id:
            raise StoreCorruptError(
                f"blob {digest} of layer {diff_id} holds a tar with digest "
                f"sha256:{sha.hexdigest()}; not saving it (run fsck)"
            )

    return write


def _blob_copier(store: Store, digest: str) -> Callable[[BinaryIO], None]:
    def write(out: BinaryIO) -> None:
        with store.open_blob(digest) as f:
            shutil.copyfileobj(f, out, _CHUNK)

    return write


def _bytes_writer(data: bytes) -> Callable[[BinaryIO], None]:
    def write(out: BinaryIO) -> None:
        out.write(data)

    return write


class _Exact:
    """Passes writes on, refusing to write more or fewer than the announced size."""

    def __init__(self, out: IO[bytes], size: int, name: str) -> None:
        self._out = out
        self._left = size
        self._size = size
        self._name = name

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._left:
            raise ImageError(f"save: {self._name} is longer than the {self._size} bytes announced")
        self._left -= n
        self._out.write(data)
        return n

    def check(self) -> None:
        if self._left:
            raise ImageError(
                f"save: {self._name} is {self._left} bytes shorter than the {self._size} announced"
            )


class _TarWriter:
    """Writes a tar stream whose members' contents are pushed (a packer, a decompressor), which
    ``tarfile`` cannot take: the header goes first with the size announced, then the data."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._offset = 0

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)

    def _header(self, info: tarfile.TarInfo) -> None:
        info.mtime = 0
        # The archive's own files belong to whoever saves it: a rootless reader that unpacks
        # it (skopeo, for an oci-archive) chowns to these ids, and may only choose its own.
        info.uid, info.gid = os.geteuid(), os.getegid()
        info.uname = info.gname = ""
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add_dir(self, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        self._header(info)

    def add_file(self, name: str, size: int, write: Callable[[BinaryIO], None]) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        self._header(info)
        exact = _Exact(self._out, size, name)
        write(cast(BinaryIO, exact))
        exact.check()
        self._offset += size
        pad = -size % tarfile.BLOCKSIZE
        self._write(b"\0" * pad)

    def close(self) -> None:
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._write(b"\0" * (-self._offset % tarfile.RECORDSIZE))


# --- reading archives -----------------------------------------------------------------------


def _entry_name(archive: str, name: Any, what: str) -> str:
    """A name found in the archive's JSON, as a clean path inside it; escapes refused."""
    if not isinstance(name, str) or not name:
        raise ImageError(f"{archive}: {what}: expected a file name, got {json.dumps(name)[:80]}")
    if name.startswith("/") or ".." in name.split("/"):
        raise UnsafePathError(
            f"{archive}: {what} names {name!r}, outside the archive (absolute or '..')"
        )
    return clean_name(name)


class _Source:
    """An archive's files by name: a tar read in place, or a directory."""

    label: str

    def open(self, name: str) -> BinaryIO:  # pragma: no cover - interface
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        try:
            with self.open(name):
                return True
        except ImageNotFound:
            return False

    def read_json(self, name: str, what: str) -> tuple[bytes, Any]:
        with self.open(name) as f:
            data = f.read(_MAX_JSON + 1)
        if len(data) > _MAX_JSON:
            raise ImageError(f"{self.label}: entry {name!r} ({what}) is too big to be one")
        try:
            return data, json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageError(f"{self.label}: entry {name!r} ({what}) is not JSON: {e}") from e

    def close(self) -> None:
        pass


class _TarSource(_Source):
    """A tar file read in place: an index of its members by clean name, data by seeking."""

    def __init__(self, label: str, fileobj: IO[bytes]) -> None:
        self.label = label
        try:
            self._tar = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115 - see close()
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ImageError(f"{label}: not a readable tar archive: {e}") from e
        self._files: dict[str, tarfile.TarInfo] = {}
        self._links: dict[str, str] = {}
        for member in members:
            try:
                name = clean_name(member.name)
                target = clean_name(member.linkname) if member.islnk() else ""
            except UnsafePathError as e:
                raise UnsafePathError(
                    f"{label}: entry {member.name!r} climbs out of the archive with '..'"
                ) from e
            if member.isdir() or not name:
                continue
            if name in self._files or name in self._links:
                raise ImageError(f"{label}: entry {name!r} appears twice")
            if member.issym():
                self._links[name] = member.linkname
            elif member.islnk():
                self._links[name] = "/" + target
            elif member.isreg():
                self._files[name] = member
            # other kinds (devices, fifos) are no content of an image archive: ignored

    def _resolve(self, name: str) -> str:
        try:
            return safepath.resolve(name, self._links.get)
        except OSError as e:
            raise ImageError(f"{self.label}: entry {name!r}: {e.strerror}") from e

    def open(self, name: str) -> BinaryIO:
        member = self._files.get(self._resolve(name))
        if member is None:
            raise ImageNotFound(f"{self.label}: entry {name!r} is missing")
        data = self._tar.extractfile(member)
        if data is None:  # pragma: no cover - a regular member always has data
            raise ImageNotFound(f"{self.label}: entry {name!r} has no data")
        return cast(BinaryIO, data)

    def close(self) -> None:
        self._tar.close()


class _DirSource(_Source):
    """A directory: every name opened inside it, symlinks resolved as if it were the root."""

    def __init__(self, label: str, path: Path) -> None:
        self.label = label
        try:
            self._root = safepath.open_root(path)
        except OSError as e:
            raise ImageError(f"{label}: cannot open the directory: {e.strerror}") from e

    def open(self, name: str) -> BinaryIO:
        try:
            fd = safepath.open_in_root(self._root, name, os.O_RDONLY)
        except FileNotFoundError as e:
            raise ImageNotFound(
                f"{self.label}: entry {name!r} is missing (names and symlinks resolve inside "
                "the archive)"
            ) from e
        except OSError as e:
            raise ImageError(f"{self.label}: entry {name!r}: {e.strerror}") from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageError(f"{self.label}: entry {name!r} is not a regular file")
        return open(fd, "rb")

    def close(self) -> None:
        os.close(self._root)


@contextlib.contextmanager
def _open_source(path: Path, scratch: Path) -> Iterator[_Source]:
    """The archive at ``path``; a gzip-compressed tar is decompressed into an anonymous file
    in ``scratch`` first."""
    label = str(path)
    if path.is_dir():
        source: _Source = _DirSource(label, path)
        try:
            yield source
        finally:
            source.close()
        return
    with contextlib.ExitStack() as stack:
        try:
            raw = stack.enter_context(open(path, "rb"))
        except OSError as e:
            raise ImageError(f"cannot read {label}: {e.strerror or e}") from e
        head = raw.read(6)
        raw.seek(0)
        fileobj: IO[bytes] = raw
        if head.startswith(b"\x1f\x8b"):
            # tar needs to seek; a gzip stream cannot, so it is decompressed to a temp file.
            plain = stack.enter_context(tempfile.TemporaryFile(dir=scratch))
            try:
                with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                    shutil.copyfileobj(unzipped, plain, _CHUNK)
            except (OSError, EOFError, zlib.error) as e:
                raise ImageError(f"{label}: corrupt gzip data: {e}") from e
            plain.seek(0)
            fileobj = plain
        elif head.startswith((b"\x28\xb5\x2f\xfd", b"\xfd7zXZ", b"BZh")):
            raise ImageError(f"{label}: compressed other than with gzip; decompress it first")
        source = _TarSource(label, fileobj)
        try:
            yield source
        finally:
            source.close()


# --- loading: plan, verify, then store ------------------------------------------------------


@dataclass(frozen=True)
class _LayerPlan:
    """A layer to load: ``descriptor`` is ``None`` in a docker archive, which names layers by
    file only (the blob is measured when it is verified)."""

    entry: str
    descriptor: Descriptor | None
    diff_id: str


@dataclass(frozen=True)
class _ImagePlan:
    """An image to load; ``manifest`` is ``None`` in a docker archive (made once its layers
    are measured, and not recorded: it is ours, not the archive's)."""

    config_bytes: bytes
    manifest: Manifest | None
    manifest_bytes: bytes | None
    layers: tuple[_LayerPlan, ...]
    refs: tuple[str, ...]


def load(store: Store, path: str | os.PathLike[str], *, rootless: bool | None = None) -> list[str]:
    """Load every image of the archive at ``path`` into the store.

    Returns the references tagged (canonical), and the id of each image that had none.
    Raises :class:`ImageError` (:class:`UnsafePathError` for names that escape,
    :class:`StoreCorruptError` for content that does not match its digest or diff id,
    :class:`LayerError` for a layer tar the unpacker refuses) naming the archive and the entry.
    """
    archive = Path(path)
    # The store's tmp/ is on the store's (big) filesystem; the file has no name, so the
    # sweeper of tmp/ never sees it.
    with _open_source(archive, store.root / "tmp") as source:
        if source.exists("manifest.json"):
            plans = _plan_docker(source)
        elif source.exists("index.json") and source.exists("oci-layout"):
            plans = _plan_oci(source)
        else:
            raise ImageError(
                f"{source.label}: neither a docker archive (no manifest.json) nor an OCI image "
                "layout (no oci-layout and index.json)"
            )
        verified: dict[tuple[str, str], Descriptor] = {}
        for plan in plans:
            for layer in plan.layers:
                if (layer.entry, layer.diff_id) not in verified:
                    verified[layer.entry, layer.diff_id] = _verify_layer(source, layer)
        with store.guard():
            for (entry, diff_id), descriptor in verified.items():
                with source.open(entry) as f:
                    try:
                        import_layer(store, descriptor, diff_id, f, rootless=rootless)
                    except ImageError as e:
                        raise type(e)(f"{source.label}: entry {entry!r}: {e}") from e
            loaded: list[str] = []
            for plan in plans:
                first = plan.refs[0] if plan.refs else None
                manifest = plan.manifest or Manifest(
                    Descriptor(OCI_CONFIG, image_id(plan.config_bytes), len(plan.config_bytes)),
                    tuple(verified[layer.entry, layer.diff_id] for layer in plan.layers),
                )
                iid = import_image(
                    store,
                    plan.config_bytes,
                    manifest,
                    manifest_bytes=plan.manifest_bytes,
                    ref=first,
                )
                for ref in plan.refs[1:]:
                    store.tag(ref, iid)
                loaded += plan.refs or (iid,)
    return loaded


def _canonical_refs(label: str, names: Sequence[Any], what: str) -> tuple[str, ...]:
    refs = []
    for name in names:
        if not isinstance(name, str):
            raise ImageError(f"{label}: {what}: expected a reference, got {json.dumps(name)[:80]}")
        try:
            refs.append(parse(name).canonical)
        except SpecError as e:
            raise ImageError(f"{label}: {what}: {e}") from e
    return tuple(dict.fromkeys(refs))


def _read_config(source: _Source, entry: str, expected: str | None) -> tuple[bytes, ImageConfig]:
    data, _ = source.read_json(entry, "image config")
    found = image_id(data)
    if expected is not None and found != expected:
        raise StoreCorruptError(
            f"{source.label}: entry {entry!r}: content has digest {found}, expected {expected}"
        )
    try:
        return data, ImageConfig.from_json(data)
    except SpecError as e:
        raise ImageError(f"{source.label}: entry {entry!r}: {e}") from e


def _named_digest(name: str) -> str | None:
    """The digest a file name claims (``blobs/sha256/<hex>``, ``<hex>.json``), if any."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".json")
    hexadecimal = len(stem) == 64 and all(c in "0123456789abcdef" for c in stem)
    if hexadecimal and (name.startswith("blobs/sha256/") or name.endswith(".json")):
        return "sha256:" + stem
    return None


def _plan_docker(source: _Source) -> list[_ImagePlan]:
    _, body = source.read_json("manifest.json", "docker archive manifest")
    if not isinstance(body, list) or not body:
        raise ImageError(f"{source.label}: manifest.json: expected a non-empty list of images")
    plans = []
    for i, item in enumerate(body):
        where = f"manifest.json[{i}]"
        if not isinstance(item, dict):
            raise ImageError(f"{source.label}: {where}: expected an object")
        config_entry = _entry_name(source.label, item.get("Config"), f"{where}.Config")
        config_bytes, config = _read_config(source, config_entry, _named_digest(config_entry))
        layer_names = item.get("Layers")
        if not isinstance(layer_names, list):
            raise ImageError(f"{source.label}: {where}.Layers: expected a list of file names")
        if len(layer_names) != len(config.diff_ids):
            raise ImageError(
                f"{source.label}: {where}: {len(layer_names)} layers, but the config "
                f"{config_entry!r} has {len(config.diff_ids)} diff ids"
            )
        layers = []
        for j, (name, diff_id) in enumerate(zip(layer_names, config.diff_ids, strict=True)):
            entry = _entry_name(source.label, name, f"{where}.Layers[{j}]")
            layers.append(_LayerPlan(entry, None, diff_id))
        tags = item.get("RepoTags") or []
        if not isinstance(tags, list):
            raise ImageError(f"{source.label}: {where}.RepoTags: expected a list")
        refs = _canonical_refs(source.label, tags, f"{where}.RepoTags")
        plans.append(_ImagePlan(config_bytes, None, None, tuple(layers), refs))
    return plans


def _blob_entry(source: _Source, digest: str, what: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256":
        raise ImageError(f"{source.label}: {what} {digest}: only sha256 blobs are supported")
    return f"blobs/sha256/{encoded}"


def _read_blob(source: _Source, descriptor: Descriptor, what: str) -> bytes:
    entry = _blob_entry(source, descriptor.digest, what)
    if descriptor.size > _MAX_JSON:
        raise ImageError(f"{source.label}: entry {entry!r} ({what}) is too big to be one")
    with source.open(entry) as f:
        data = f.read(descriptor.size + 1)
    found = "sha256:" + hashlib.sha256(data).hexdigest()
    if len(data) != descriptor.size or found != descriptor.digest:
        raise StoreCorruptError(
            f"{source.label}: entry {entry!r} ({what}): {len(data)} bytes with digest {found}, "
            f"expected {descriptor.size} bytes with digest {descriptor.digest}"
        )
    return data


def _oci_refs(source: _Source, entry: Descriptor, where: str) -> tuple[str, ...]:
    """The name an index entry gives its image: containerd's full reference, else
    ``ref.name`` when it is a reference (has ``/`` or ``:``), not a bare tag (``latest``)."""
    name = entry.annotations.get(CONTAINERD_NAME)
    if name is None:
        ref_name = entry.annotations.get(ANNOTATION_REF_NAME)
        if ref_name is not None and ("/" in ref_name or ":" in ref_name):
            name = ref_name
    return () if name is None else _canonical_refs(source.label, [name], where)


def _plan_oci(source: _Source) -> list[_ImagePlan]:
    _, layout = source.read_json("oci-layout", "OCI layout marker")
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        raise ImageError(f"{source.label}: oci-layout: expected an imageLayoutVersion")
    data, _ = source.read_json("index.json", "OCI index")
    index = _parse(source, data, OCI_INDEX, "index.json")
    if not isinstance(index, Index):
        raise ImageError(f"{source.label}: index.json: expected an image index")
    plans = []
    for i, entry in enumerate(index.manifests):
        where = f"index.json manifests[{i}]"
        refs = _oci_refs(source, entry, where)
        chosen, seen = entry, 0
        while chosen.media_type in INDEX_TYPES:  # a multi-platform image: this host's
            seen += 1
            if seen > 4:
                raise ImageError(f"{source.label}: {where}: indexes nested too deep")
            nested = _parse(source, _read_blob(source, chosen, "index"), chosen.media_type, where)
            if not isinstance(nested, Index):
                raise ImageError(f"{source.label}: {where}: {chosen.digest} is not an index")
            try:
                chosen = select_platform(nested)
            except SpecError as e:
                raise ImageError(f"{source.label}: {where}: {e}") from e
        manifest_bytes = _read_blob(source, chosen, "manifest")
        manifest = _parse(source, manifest_bytes, chosen.media_type, where)
        if not isinstance(manifest, Manifest):
            raise ImageError(f"{source.label}: {where}: {chosen.digest} is not a manifest")
        config_entry = _blob_entry(source, manifest.config.digest, "config")
        config_bytes = _read_blob(source, manifest.config, "image config")
        try:
            config = ImageConfig.from_json(config_bytes)
        except SpecError as e:
            raise ImageError(f"{source.label}: entry {config_entry!r}: {e}") from e
        if len(config.diff_ids) != len(manifest.layers):
            raise ImageError(
                f"{source.label}: manifest {chosen.digest}: {len(manifest.layers)} layers, but "
                f"the config has {len(config.diff_ids)} diff ids"
            )
        layers = []
        for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            try:
                layer_compression(layer.media_type)
            except SpecError as e:
                raise ImageError(f"{source.label}: manifest {chosen.digest}: {e}") from e
            layers.append(_LayerPlan(_blob_entry(source, layer.digest, "layer"), layer, diff_id))
        plans.append(_ImagePlan(config_bytes, manifest, manifest_bytes, tuple(layers), refs))
    return plans


def _parse(source: _Source, data: bytes, media_type: str, where: str) -> Manifest | Index:
    try:
        return parse_manifest(data, media_type)
    except SpecError as e:
        raise ImageError(f"{source.label}: {where}: {e}") from e


class _Hashing:
    """Hashes and counts what is read through it, and keeps the first bytes (the magic)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if len(self.head) < 4:
            self.head += data[: 4 - len(self.head)]
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass


def _verify_layer(source: _Source, layer: _LayerPlan) -> Descriptor:
    """Read a layer entry once before anything is stored: its bytes must match the
    descriptor (if the archive has one), its tar the diff id, and every entry name the
    unpacker's rules. Returns the descriptor of the bytes read."""
    where = f"{source.label}: entry {layer.entry!r}"
    with source.open(layer.entry) as f:
        raw = _Hashing(cast(IO[bytes], f))
        tar_bytes = _Hashing(uncompressed(cast(IO[bytes], raw)))
        try:
            with tarfile.open(fileobj=cast(IO[bytes], tar_bytes), mode="r|") as tar:
                for member in tar:
                    plan_entry(member.name, oci_whiteouts=True)
                    if member.islnk():
                        clean_name(member.linkname, what="hard link target")
            tar_bytes.drain()
            raw.drain()
        except UnsafePathError as e:
            raise UnsafePathError(f"{where}: {e}") from e
        except (LayerError, tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raw.drain()
            _check_bytes(where, raw, layer.descriptor)
            raise LayerError(f"{where}: the layer tar is unreadable: {e}") from e
    _check_bytes(where, raw, layer.descriptor)
    found = "sha256:" + tar_bytes.sha.hexdigest()
    if found != layer.diff_id:
        raise StoreCorruptError(
            f"{where}: its uncompressed tar has digest {found}, but the image config says "
            f"{layer.diff_id}"
        )
    if layer.descriptor is not None:
        return layer.descriptor
    media_type = (
        OCI_LAYER_GZIP
        if raw.head.startswith(b"\x1f\x8b")
        else OCI_LAYER_ZSTD
        if raw.head.startswith(b"\x28\xb5\x2f\xfd")
        else OCI_LAYER
    )
    return Descriptor(media_type, "sha256:" + raw.sha.hexdigest(), raw.size)


def _check_bytes(where: str, raw: _Hashing, descriptor: Descriptor | None) -> None:
    if descriptor is None:
        return
    found = "sha256:" + raw.sha.hexdigest()
    if raw.size != descriptor.size or found != descriptor.digest:
        raise StoreCorruptError(
            f"{where}: {raw.size} bytes with digest {found}, expected {descriptor.size} bytes "
            f"with digest {descriptor.digest}"
        )
