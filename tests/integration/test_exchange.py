"""The store <-> blobs bridge on a real store: export (pack + gzip once), import (one pass,
verified, nothing stored on a mismatch), records that make push-back keep digests."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime.errors import ImageError, LayerError, SpecError, StoreCorruptError, UnsafePathError
from runtime.image import exchange, layer
from runtime.image import manifest as m
from runtime.image.config import ImageConfig
from runtime.image.manifest import Descriptor, Manifest
from runtime.image.store import LayerRecord, Store

pytestmark = pytest.mark.rootless

ROOTLESS = os.geteuid() != 0
BUSYBOX = Path("/bin/busybox")
T0 = 1_700_000_000


# --- making images the way the builder does (real files, diff id = the packed tar) ------------


def make_layer(store: Store, key: str, files: dict[str, bytes]) -> LayerRecord:
    """A layer holding ``files`` (``name -> bytes``; ``name@`` -> symlink to the bytes)."""

    def produce(directory: Path) -> str:
        for name, data in files.items():
            if name.endswith("@"):
                path = directory / name[:-1]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.symlink_to(data.decode())
                continue
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            path.chmod(0o755 if data.startswith(b"\x7fELF") else 0o644)
        # Fixed times, as a reproducible build sets them: the same files, the same diff id.
        for dirpath, dirnames, filenames in os.walk(directory, topdown=False):
            for name in dirnames + filenames:
                os.utime(Path(dirpath, name), (T0, T0), follow_symlinks=False)
        return layer.layer_digest(directory, rootless=ROOTLESS)[0]

    return store.ensure_layer(key, produce)


def make_image(store: Store, *layers: LayerRecord, ref: str | None = None, note: str = "") -> str:
    config = ImageConfig.empty(architecture="amd64")
    for record in layers:
        config = config.add_layer(record.diff_id, created_by=f"layer {record.diff_id[7:15]}")
    config = config.with_config(cmd=("/bin/sh",))
    if note:
        config = config.add_history(created_by=note)
    iid = store.put_image(config)
    if ref is not None:
        store.tag(ref, iid)
    return iid


def busybox_image(store: Store, ref: str = "tools:1") -> str:
    """Two layers: a static busybox with a shell link, then a small config file."""
    base = make_layer(
        store,
        "base",
        {"bin/busybox": BUSYBOX.read_bytes(), "bin/sh@": b"busybox", "etc/motd": b"hello\n"},
    )
    top = make_layer(store, "top", {"etc/app.conf": b"debug = true\n", "srv/data/x": b"1"})
    return make_image(store, base, top, ref=ref)


def gz(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def stored(store: Store) -> dict[str, list[str]]:
    """What the store holds, by area (work in progress and lock files aside)."""
    root = store.root
    return {
        "blobs": sorted(os.listdir(root / "blobs" / "sha256")),
        "layers": sorted(os.listdir(root / "layers" / "sha256")),
        "images": sorted(os.listdir(root / "images" / "sha256")),
        "dist": sorted(os.listdir(root / "dist" / "sha256")),
        "manifests": sorted(os.listdir(root / "manifests" / "sha256")),
        "tmp": sorted(os.listdir(root / "tmp")),
    }


EMPTY = {"blobs": [], "layers": [], "images": [], "dist": [], "manifests": [], "tmp": []}


class Counting(io.RawIOBase):
    """A stream that counts what is read from it (to prove a stream was not read)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        n = self._data.readinto(buffer)
        self.read_bytes += n
        return n


def copy_image(source: Store, dest: Store, ref: str | None = None) -> exchange.ExportedImage:
    """What a push then a pull does: export from one store, import into the other."""
    exported = exchange.export_image(source, ref or "tools:1")
    parsed = m.parse_manifest(exported.manifest, exported.media_type)
    assert isinstance(parsed, Manifest)
    with dest.guard():
        for blob in exported.layers:
            with source.open_blob(blob.descriptor.digest) as f:
                exchange.import_layer(dest, blob.descriptor, blob.diff_id, f)
        exchange.import_image(
            dest, exported.config_bytes, parsed, manifest_bytes=exported.manifest, ref="tools:1"
        )
    return exported


# --- export ------------------------------------------------------------------------------------


def test_export_packs_and_compresses_each_layer_once(store: Store) -> None:
    iid = busybox_image(store)
    exported = exchange.export_image(store, "tools:1")
    assert exported.image_id == iid and exported.media_type == m.OCI_MANIFEST
    assert exported.manifest_digest == sha(exported.manifest)
    assert exported.config == Descriptor(m.OCI_CONFIG, iid, len(exported.config_bytes))
    assert sha(exported.config_bytes) == iid
    config = store.get_image(iid).config
    assert [b.diff_id for b in exported.layers] == list(config.diff_ids)
    for blob in exported.layers:
        assert blob.descriptor.media_type == m.OCI_LAYER_GZIP
        with store.open_blob(blob.descriptor.digest) as f:
            data = f.read()
        assert (sha(data), len(data)) == (blob.descriptor.digest, blob.descriptor.size)
        assert sha(gzip.decompress(data)) == blob.diff_id  # the blob holds the exact tar
    with store.open_blob(exported.manifest_digest) as f:
        assert f.read() == exported.manifest

    blob_files = {
        name: os.stat(store.root / "blobs" / "sha256" / name).st_ino
        for name in os.listdir(store.root / "blobs" / "sha256")
    }
    again = exchange.export_image(store, iid)
    assert again == exported
    assert {
        name: os.stat(store.root / "blobs" / "sha256" / name).st_ino
        for name in os.listdir(store.root / "blobs" / "sha256")
    } == blob_files  # nothing packed or written again


def test_export_is_reproducible_across_stores(store: Store, other: Store) -> None:
    busybox_image(store)
    busybox_image(other)
    assert exchange.export_image(store, "tools:1") == exchange.export_image(other, "tools:1")


def test_docker_media_types_on_request(store: Store) -> None:
    busybox_image(store)
    oci = exchange.export_image(store, "tools:1")
    docker = exchange.export_image(store, "tools:1", docker=True)
    assert docker.media_type == m.DOCKER_MANIFEST
    assert docker.config.media_type == m.DOCKER_CONFIG
    assert {b.descriptor.media_type for b in docker.layers} == {m.DOCKER_LAYER_GZIP}
    # The same compressed bytes under both names: nothing compressed twice.
    assert [b.descriptor.digest for b in docker.layers] == [b.descriptor.digest for b in oci.layers]
    assert exchange.export_image(store, "tools:1") == oci  # the first manifest stays first
    assert exchange.export_image(store, "tools:1", docker=True) == docker


def test_export_refuses_a_layer_that_no_longer_packs_to_its_diff_id(store: Store) -> None:
    busybox_image(store)
    base = store.image_layers("tools:1")[0]
    (base.path / "etc" / "motd").write_bytes(b"tampered\n")
    before = stored(store)
    with pytest.raises(StoreCorruptError, match=f"layer {base.diff_id} does not pack"):
        exchange.export_image(store, "tools:1")
    after = stored(store)
    assert after["manifests"] == before["manifests"] == []
    assert base.diff_id[7:] not in after["dist"]


def test_an_unknown_image(store: Store) -> None:
    with pytest.raises(ImageError, match="no image"):
        exchange.export_image(store, "nothing:here")


# --- import: the happy path ----------------------------------------------------------------------


def test_push_then_pull_keeps_every_digest(store: Store, other: Store) -> None:
    iid = busybox_image(store)
    exported = copy_image(store, other)
    assert other.resolve("tools:1") == iid
    assert other.resolve(f"example.com/any/name@{exported.manifest_digest}") == iid
    assert other.get_image(f"tools@{exported.manifest_digest}").id == iid
    # The layers are unpacked and runnable: the busybox binary and its link are there.
    base = other.image_layers(iid)[0]
    assert (base.path / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.readlink(base.path / "bin" / "sh") == "busybox"
    assert os.access(base.path / "bin" / "busybox", os.X_OK)
    # Pushed back: the very same manifest and blobs.
    back = exchange.export_image(other, "tools:1")
    assert back == exported
    assert exchange.export_image(other, "tools:1", docker=False) == exported
    assert other.fsck() == []


def test_a_pulled_docker_manifest_is_sent_back_as_it_came(store: Store, other: Store) -> None:
    busybox_image(store)
    docker = exchange.export_image(store, "tools:1", docker=True)
    parsed = m.parse_manifest(docker.manifest, m.DOCKER_MANIFEST)
    assert isinstance(parsed, Manifest)
    with other.guard():
        for blob in docker.layers:
            with store.open_blob(blob.descriptor.digest) as f:
                exchange.import_layer(other, blob.descriptor, blob.diff_id, f)
        exchange.import_image(other, docker.config_bytes, parsed, manifest_bytes=docker.manifest)
    assert exchange.export_image(other, docker.image_id) == docker
    assert exchange.export_image(other, docker.image_id, docker=False).media_type == m.OCI_MANIFEST


def test_a_foreign_layer_is_kept_as_its_blob(store: Store) -> None:
    """A layer packed by another tool (other order, owners, gzip level) keeps its diff id, and
    export sends the blob it came in, since re-packing would give another tar."""
    tar = tar_of({"z-last": b"z", "a-first": b"a"})
    blob = gz(tar, level=9)
    descriptor = Descriptor(m.DOCKER_LAYER_GZIP, sha(blob), len(blob))
    with store.guard():
        record = exchange.import_layer(store, descriptor, sha(tar), io.BytesIO(blob))
        assert layer.layer_digest(record.path, rootless=ROOTLESS)[0] != sha(tar)
        iid = make_image(store, record, ref="foreign:1")
    exported = exchange.export_image(store, iid)
    [sent] = exported.layers
    assert sent.descriptor == Descriptor(m.OCI_LAYER_GZIP, sha(blob), len(blob))
    assert store.layer_blobs(sha(tar))[0].diff_size == len(tar)


def test_a_plain_tar_that_packs_back_needs_no_blob(store: Store, other: Store) -> None:
    record = make_layer(store, "k", {"etc/x": b"x\n"})
    with store.guard():
        tar = io.BytesIO()
        layer.pack_layer(record.path, tar, rootless=ROOTLESS, owner=(0, 0) if ROOTLESS else None)
    data = tar.getvalue()
    assert sha(data) == record.diff_id
    descriptor = Descriptor(m.OCI_LAYER, sha(data), len(data))
    with other.guard():
        exchange.import_layer(other, descriptor, record.diff_id, io.BytesIO(data))
    assert stored(other)["blobs"] == [] and stored(other)["dist"] == []
    assert not exchange.layer_needed(other, descriptor, record.diff_id)
    # A plain tar that does not pack back (another tool's) is kept as a blob.
    foreign = tar_of({"b": b"2", "a": b"1"})
    with other.guard():
        exchange.import_layer(
            other, Descriptor(m.OCI_LAYER, sha(foreign), len(foreign)), sha(foreign),
            io.BytesIO(foreign),
        )  # fmt: skip
    assert [b.digest for b in other.layer_blobs(sha(foreign))] == [sha(foreign)]


def test_a_known_layer_in_another_compression_is_verified_not_unpacked(
    store: Store, other: Store
) -> None:
    busybox_image(store)
    exported = copy_image(store, other)
    top = exported.layers[1]
    layer_dir = other.get_layer(top.diff_id).path
    inode = os.stat(layer_dir).st_ino
    with store.open_blob(top.descriptor.digest) as f:
        tar = gzip.decompress(f.read())
    again = gz(tar, level=9)
    descriptor = Descriptor(m.OCI_LAYER_GZIP, sha(again), len(again))
    assert exchange.layer_needed(other, descriptor, top.diff_id)
    with pytest.raises(StoreCorruptError, match="uncompressed tar has digest"):
        exchange.import_layer(other, descriptor, exported.layers[0].diff_id, io.BytesIO(again))
    assert not other.has_blob(descriptor.digest)
    exchange.import_layer(other, descriptor, top.diff_id, io.BytesIO(again))
    assert os.stat(layer_dir).st_ino == inode
    assert {b.digest for b in other.layer_blobs(top.diff_id)} == {
        top.descriptor.digest,
        descriptor.digest,
    }
    assert not exchange.layer_needed(other, descriptor, top.diff_id)


def test_concurrent_imports_of_one_layer_read_one_stream(store: Store, other: Store) -> None:
    busybox_image(store)
    exported = exchange.export_image(store, "tools:1")
    blob = exported.layers[0]
    with store.open_blob(blob.descriptor.digest) as f:
        data = f.read()
    streams = [Counting(data) for _ in range(6)]
    barrier = threading.Barrier(len(streams))
    results: list[LayerRecord | BaseException] = []

    def pull(stream: Counting) -> None:
        barrier.wait()
        try:
            results.append(exchange.import_layer(other, blob.descriptor, blob.diff_id, stream))
        except BaseException as e:  # pragma: no cover - reported below
            results.append(e)

    threads = [threading.Thread(target=pull, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, LayerRecord) and r.diff_id == blob.diff_id for r in results), results
    assert sorted(s.read_bytes for s in streams) == [0] * 5 + [len(data)]
    assert stored(other)["layers"] == [blob.diff_id[7:]]


# --- import: refusals store nothing --------------------------------------------------------------


def hostile_cases() -> dict[str, Callable[[bytes, str], tuple[Descriptor, str, io.BytesIO, str]]]:
    """Each takes a good gzip blob and its diff id; gives what to import and the error text."""

    def flipped(blob: bytes, diff_id: str) -> tuple[Descriptor, str, io.BytesIO, str]:
        bad = bytearray(blob)
        bad[len(bad) // 2] ^= 0xFF
        return (
            Descriptor(m.OCI_LAYER_GZIP, sha(blob), len(blob)),
            diff_id,
            io.BytesIO(bad),
            (f"content has digest {sha(bytes(bad))}, expected {sha(blob)}"),
        )

    def truncated(blob: bytes, diff_id: str) -> tuple[Descriptor, str, io.BytesIO, str]:
        short = blob[: len(blob) // 2]
        return (
            Descriptor(m.OCI_LAYER_GZIP, sha(blob), len(blob)),
            diff_id,
            io.BytesIO(short),
            (f"received {len(short)} bytes, expected {len(blob)}"),
        )

    def wrong_diff_id(blob: bytes, diff_id: str) -> tuple[Descriptor, str, io.BytesIO, str]:
        claimed = sha(b"another tar")
        return (
            Descriptor(m.OCI_LAYER_GZIP, sha(blob), len(blob)),
            claimed,
            io.BytesIO(blob),
            (f"uncompressed tar has digest {diff_id}, but the image config says {claimed}"),
        )

    def endless(blob: bytes, diff_id: str) -> tuple[Descriptor, str, io.BytesIO, str]:
        return (
            Descriptor(m.OCI_LAYER_GZIP, sha(blob), len(blob) - 10),
            diff_id,
            io.BytesIO(blob),
            f"more than the {len(blob) - 10} bytes",
        )

    return {"flipped": flipped, "truncated": truncated, "wrong-diff-id": wrong_diff_id,
            "endless": endless}  # fmt: skip


@pytest.mark.parametrize("case", sorted(hostile_cases()))
def test_a_mismatch_stores_nothing(store: Store, other: Store, case: str) -> None:
    busybox_image(store)
    good = exchange.export_image(store, "tools:1").layers[0]
    with store.open_blob(good.descriptor.digest) as f:
        blob = f.read()
    descriptor, diff_id, stream, message = hostile_cases()[case](blob, good.diff_id)
    with pytest.raises(StoreCorruptError) as caught:
        exchange.import_layer(other, descriptor, diff_id, stream)
    assert message in str(caught.value)
    assert descriptor.digest in str(caught.value)
    assert stored(other) == EMPTY


def test_an_endless_body_is_not_read_to_its_end(other: Store) -> None:
    class Endless(io.RawIOBase):
        sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            buffer[:] = b"\0" * len(buffer)
            self.sent += len(buffer)
            return len(buffer)

    stream = Endless()
    descriptor = Descriptor(m.OCI_LAYER, sha(b"x"), 5 << 20)
    with pytest.raises(StoreCorruptError, match="more than the 5242880 bytes"):
        exchange.import_layer(other, descriptor, sha(b"y"), stream)
    assert stream.sent <= (5 << 20) + (2 << 20)
    assert stored(other) == EMPTY


def test_a_layer_with_dotdot_entries_is_refused(other: Store, tmp_path: Path) -> None:
    tar = tar_of({"ok": b"fine", "../../escaped": b"evil"})
    blob = gz(tar)
    descriptor = Descriptor(m.OCI_LAYER_GZIP, sha(blob), len(blob))
    with pytest.raises(UnsafePathError, match=rf"{descriptor.digest}.*'\.\./\.\./escaped'"):
        exchange.import_layer(other, descriptor, sha(tar), io.BytesIO(blob))
    assert stored(other) == EMPTY
    assert not (tmp_path / "escaped").exists()


def test_a_corrupt_gzip_with_the_right_digest_is_a_layer_error(other: Store) -> None:
    blob = b"\x1f\x8b" + b"not really gzip" * 10
    descriptor = Descriptor(m.OCI_LAYER_GZIP, sha(blob), len(blob))
    with pytest.raises(LayerError, match=descriptor.digest):
        exchange.import_layer(other, descriptor, sha(b"t"), io.BytesIO(blob))
    assert stored(other) == EMPTY


def test_zstd_layers_unpack_when_the_module_is_there(other: Store) -> None:
    tar = tar_of({"hello": b"zstd\n"})
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        blob = b"\x28\xb5\x2f\xfd" + b"\0" * 16  # a frame header is all the check needs
        descriptor = Descriptor(m.OCI_LAYER_ZSTD, sha(blob), len(blob))
        with pytest.raises(LayerError, match="zstandard"):
            exchange.import_layer(other, descriptor, sha(tar), io.BytesIO(blob))
        assert stored(other) == EMPTY
        return
    blob = zstandard.ZstdCompressor().compress(tar)
    descriptor = Descriptor(m.OCI_LAYER_ZSTD, sha(blob), len(blob))
    record = exchange.import_layer(other, descriptor, sha(tar), io.BytesIO(blob))
    assert (record.path / "hello").read_bytes() == b"zstd\n"


def test_a_config_is_not_a_layer(other: Store) -> None:
    descriptor = Descriptor(m.OCI_CONFIG, sha(b"{}"), 2)
    with pytest.raises(SpecError, match="not a layer media type"):
        exchange.import_layer(other, descriptor, sha(b"{}"), io.BytesIO(b"{}"))


# --- import_image checks -------------------------------------------------------------------------


def test_import_image_checks_what_it_is_given(store: Store, other: Store) -> None:
    busybox_image(store)
    exported = exchange.export_image(store, "tools:1")
    parsed = m.parse_manifest(exported.manifest)
    assert isinstance(parsed, Manifest)
    with pytest.raises(StoreCorruptError, match=f"says {exported.config.size} bytes"):
        exchange.import_image(other, exported.config_bytes + b" ", parsed)
    with pytest.raises(ImageError, match=f"layer {exported.layers[0].diff_id}.*import it first"):
        exchange.import_image(other, exported.config_bytes, parsed)
    short = Manifest(parsed.config, parsed.layers[:1])
    with pytest.raises(ImageError, match="1 layers, the config 2 diff ids"):
        exchange.import_image(other, exported.config_bytes, short)
    for blob in exported.layers:
        with store.open_blob(blob.descriptor.digest) as f:
            exchange.import_layer(other, blob.descriptor, blob.diff_id, f)
    other_bytes = m.make_manifest(parsed.config, parsed.layers, annotations={"a": "b"})
    with pytest.raises(SpecError, match="do not say what the manifest does"):
        exchange.import_image(other, exported.config_bytes, parsed, manifest_bytes=other_bytes)
    with pytest.raises(SpecError, match="invalid image reference"):
        exchange.import_image(other, exported.config_bytes, parsed, ref="Bad Ref")
    assert stored(other)["images"] == []
    iid = exchange.import_image(
        other, exported.config_bytes, parsed, ref=f"r.example/tools@{exported.manifest_digest}"
    )
    assert other.resolve(f"r.example/tools@{exported.manifest_digest}") == iid


def test_layer_key_is_a_valid_store_key() -> None:
    key = exchange.layer_key(sha(b"x"))
    assert key.startswith("layer-v1-sha256:")
    with pytest.raises(SpecError):
        exchange.layer_key("nope")


def test_uncompressed_reads_all_three_forms() -> None:
    tar = tar_of({"a": b"1"})
    for blob in (tar, gz(tar)):
        assert exchange.uncompressed(io.BytesIO(blob)).read() == tar
    with pytest.raises(LayerError, match="unreadable"):
        exchange.uncompressed(io.BytesIO(gz(tar)[:-20])).read()


def test_an_exported_layer_is_a_plain_gzip_tar(store: Store) -> None:
    """The gzip blob of an export reads with the standard library's tar to the same files."""
    busybox_image(store)
    exported = exchange.export_image(store, "tools:1")
    with (
        store.open_blob(exported.layers[0].descriptor.digest) as f,
        tarfile.open(fileobj=f, mode="r:gz") as tar,
    ):
        names = {member.name: member for member in tar}
        data = tar.extractfile(names["bin/busybox"])
        assert data is not None and data.read() == BUSYBOX.read_bytes()
        assert names["bin/sh"].issym() and names["bin/sh"].linkname == "busybox"
        assert {(member.uid, member.gid) for member in names.values()} == (
            {(0, 0)} if ROOTLESS else {(os.getuid(), os.getgid())}
        )


@pytest.mark.parametrize("size", [0, 1000, exchange.GZIP_CHUNK, 2 * exchange.GZIP_CHUNK + 5])
def test_parallel_gzip_is_one_gzip_stream_whatever_the_threads(store: Store, size: int) -> None:
    data = os.urandom(size // 2) + bytes(size - size // 2)
    blobs = []
    for workers in (1, 3):
        with store.blob_writer() as blob:
            compressor = exchange._ParallelGzip(blob, workers)
            for start in range(0, size, 300_000):  # writes of any size, as tar makes them
                compressor.write(data[start : start + 300_000])
            compressor.finish()
            compressor.close()
            blobs.append(blob.commit())
    assert blobs[0] == blobs[1]
    with store.open_blob(blobs[0]) as f:
        assert gzip.decompress(f.read()) == data


def test_layer_descriptor_for_a_layer_of_no_image(store: Store) -> None:
    record = make_layer(store, "cache-only", {"out/artifact": b"built\n"})
    descriptor = exchange.layer_descriptor(store, record.diff_id)
    assert descriptor.media_type == m.OCI_LAYER_GZIP
    with store.open_blob(descriptor.digest) as f:
        assert sha(gzip.decompress(f.read())) == record.diff_id
    assert exchange.layer_descriptor(store, record.diff_id) == descriptor
    assert exchange.layer_descriptor(store, record.diff_id, docker=True).media_type == (
        m.DOCKER_LAYER_GZIP
    )
