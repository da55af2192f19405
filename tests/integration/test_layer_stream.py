"""Reading layer streams: gzip members read by zlib, and the read-ahead thread of the unpacker.

The unpacker reads its input on a thread of its own (``runtime/image/layer.py``); these tests
pin what that must not change: errors from the source arrive in the caller unchanged, the
thread is gone when ``unpack_layer`` returns or raises, it never reads far ahead, and a caller
that drains the source after a refusal reads on from where the thread stopped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
import threading
from pathlib import Path

import pytest

from runtime.errors import LayerError, RegistryError, UnsafePathError
from runtime.image import layer


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Source:
    """A stream that counts what was read, and can fail after ``fail_after`` bytes."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self._data = io.BytesIO(data)
        self.fail_after = fail_after
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        if self.fail_after is not None and self.read_bytes >= self.fail_after:
            raise RegistryError("the registry hung up")
        chunk = self._data.read(size)
        self.read_bytes += len(chunk)
        return chunk


def no_read_ahead_thread() -> bool:
    return not any(t.name == "layer-read-ahead" for t in threading.enumerate())


def test_several_gzip_members_with_zero_padding_read_as_one_tar(tmp_path: Path) -> None:
    data = tar_of({"a": b"1" * 5000, "b": b"2" * 70000, "c": b"3"})
    cut = [data[:1000], data[1000:50000], b"", data[50000:]]
    blob = b"\0\0".join(gzip.compress(piece, mtime=0) for piece in cut) + bytes(100)
    stats = layer.unpack_layer(io.BytesIO(blob), tmp_path / "l", rootless=True)
    assert stats.diff_id == sha(data) and stats.size == len(data)
    assert (tmp_path / "l" / "b").read_bytes() == b"2" * 70000
    assert layer.gunzip(io.BytesIO(blob)).read() == data


def test_garbage_after_a_gzip_member_is_refused(tmp_path: Path) -> None:
    data = tar_of({"a": b"1"})
    with pytest.raises(LayerError, match="corrupt gzip"):
        layer.unpack_layer(io.BytesIO(gzip.compress(data) + b"junk"), tmp_path / "l", rootless=True)


def test_a_gzip_bomb_comes_out_in_bounded_pieces() -> None:
    blob = gzip.compress(bytes(40 << 20), compresslevel=9)  # 40 MiB of zeros in ~40 KiB
    pieces = list(layer._gunzip_chunks(io.BytesIO(blob)))
    assert max(len(p) for p in pieces) <= layer.CHUNK
    assert sum(len(p) for p in pieces) == 40 << 20


def test_truncated_and_corrupt_gzip_name_the_problem() -> None:
    blob = gzip.compress(b"x" * 100000)
    with pytest.raises(EOFError, match="end-of-stream"):
        layer.gunzip(io.BytesIO(blob[:-3])).read()
    broken = bytearray(blob)
    broken[-6] ^= 0xFF  # the CRC
    with pytest.raises(OSError, match="CRC"):
        layer.gunzip(io.BytesIO(bytes(broken))).read()
    with pytest.raises(OSError, match="corrupt gzip"):
        layer.gunzip(io.BytesIO(blob[:10] + b"\xff" * 50)).read()


def test_an_error_of_the_source_reaches_the_caller_unchanged(tmp_path: Path) -> None:
    rng = random.Random(1)
    data = tar_of({f"f{i}": rng.randbytes(300000) for i in range(20)})  # incompressible
    source = Source(gzip.compress(data, compresslevel=1), fail_after=3 << 20)
    with pytest.raises(RegistryError, match="hung up"):
        layer.unpack_layer(source, tmp_path / "l", rootless=True)  # type: ignore[arg-type]
    assert no_read_ahead_thread()


def test_a_refused_tar_stops_the_thread_and_leaves_the_rest_to_the_caller(
    tmp_path: Path,
) -> None:
    evil = tar_of({"../evil": b"x"})[:-1024]  # no end-of-archive: more entries follow
    data = evil + tar_of({f"f{i}": bytes([i]) * (1 << 20) for i in range(40)})
    source = Source(data)
    with pytest.raises(UnsafePathError):
        layer.unpack_layer(source, tmp_path / "l", rootless=True)  # type: ignore[arg-type]
    assert no_read_ahead_thread()
    # The thread stopped a few chunks ahead, not at the end; what it did not read is still there.
    assert source.read_bytes <= (layer.READ_AHEAD + 3) * layer.CHUNK < len(data)
    rest = len(source.read(-1))
    assert source.read_bytes == len(data) and rest > 0
    assert not (tmp_path / "evil").exists()


def test_plain_tar_through_the_thread_keeps_the_diff_id(tmp_path: Path) -> None:
    data = tar_of({"a": b"1" * (3 << 20), "b": b"2"}) + bytes(10240)  # trailing zero blocks
    stats = layer.unpack_layer(io.BytesIO(data), tmp_path / "l", rootless=True)
    assert stats.diff_id == sha(data) and stats.size == len(data)
    assert no_read_ahead_thread()


def test_reading_after_close_is_an_error_not_a_hang() -> None:
    stream = layer._ReadAhead(iter([b"a" * 10, b"b" * 10, b"c" * 10]))
    assert stream.read(5) == b"aaaaa"
    stream.close()
    assert no_read_ahead_thread()
    assert stream.read(100) == b"aaaaa"  # what was handed over already
    with pytest.raises(ValueError, match="after close"):
        stream.read(100)
