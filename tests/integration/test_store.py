"""The image store on a real filesystem, with real processes racing and being killed."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.errors import ImageError, ImageNotFound, SpecError, StoreCorruptError
from runtime.image.config import ImageConfig
from runtime.image.store import (
    BlobRecord,
    CacheRecord,
    LayerUse,
    Store,
    chain_id,
    plan_blob_prune,
    plan_prune,
    store_root,
)

pytestmark = pytest.mark.rootless

FORK = multiprocessing.get_context("fork")
NOBODY = 65534


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def producer(files: dict[str, bytes], log: Path | None = None) -> Callable[[Path], str]:
    """A producer writing ``files``; its diff id stands for a tar of them (any stable digest)."""

    def produce(directory: Path) -> str:
        if log is not None:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        for name, data in files.items():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return digest(json.dumps(sorted((k, v.hex()) for k, v in files.items())).encode())

    return produce


def image_on(store: Store, *diff_ids: str, note: str = "") -> str:
    config = ImageConfig.empty(architecture="amd64")
    for d in diff_ids:
        config = config.add_layer(d, created_by=f"layer {d[7:15]}")
    return store.put_image(config.add_history(created_by=note or "test"))


def run_in_child(target: Callable[[], None], timeout: float = 10) -> int:
    proc = FORK.Process(target=target)
    proc.start()
    proc.join(timeout)
    assert proc.exitcode is not None, "child did not finish"
    return proc.exitcode


# --- where the store lives (pure) ---


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PYTEST_ISOLATE_STORE": "/s", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/s"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/pytest-isolate"),
        ({"XDG_CACHE_HOME": "relative", "HOME": "/h"}, "/h/.cache/pytest-isolate"),
        ({"PYTEST_ISOLATE_STORE": "", "HOME": "/h"}, "/h/.cache/pytest-isolate"),
    ],
)
def test_store_root(env: dict[str, str], expected: str) -> None:
    assert store_root(env) == Path(expected)


@pytest.mark.parametrize("env", [{}, {"HOME": "rel"}, {"PYTEST_ISOLATE_STORE": "rel/x"}])
def test_store_root_needs_an_absolute_place(env: dict[str, str]) -> None:
    with pytest.raises(SpecError, match="absolute"):
        store_root(env)


def test_open_uses_the_environment(tmp_path: Path) -> None:
    store = Store.open({"PYTEST_ISOLATE_STORE": str(tmp_path / "s")})
    assert store.root == tmp_path / "s"
    assert (tmp_path / "s" / "version").read_text() == "1\n"


def test_a_store_of_another_layout_version_is_refused(tmp_path: Path) -> None:
    Store(tmp_path)
    (tmp_path / "version").write_text("2\n")
    with pytest.raises(ImageError, match="layout version '2'"):
        Store(tmp_path)


# --- layers ---


def test_ensure_layer_produces_then_reuses(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "log"
    parent = "sha256:" + "e" * 64
    first = store.ensure_layer("step-1", producer({"a/b": b"hello"}, log), parent=parent)
    again = store.ensure_layer("step-1", producer({"other": b"x"}, log))
    assert again == first
    assert log.read_text().count("\n") == 1
    assert (first.path / "a" / "b").read_bytes() == b"hello"
    assert first.path == store.root / "layers" / "sha256" / first.diff_id[7:] / "diff"
    assert first.parent == parent
    assert first.chain_id == chain_id(parent, first.diff_id) != first.diff_id
    assert first.size > 0
    assert store.get_layer(first.diff_id) == first
    cached = store.get_cache("step-1")
    assert cached is not None
    assert (cached.kind, cached.digest) == ("layer", first.diff_id)
    assert os.listdir(store.root / "tmp") == []


def test_one_layer_for_the_same_content_under_two_keys(store: Store) -> None:
    a = store.ensure_layer("key-a", producer({"f": b"same"}))
    b = store.ensure_layer("key-b", producer({"f": b"same"}))
    assert a == b
    assert len(os.listdir(store.root / "layers" / "sha256")) == 1
    assert os.listdir(store.root / "tmp") == []


def _concurrent_worker(root: Path, log: Path, barrier: object, results: object) -> None:
    store = Store(root)
    barrier.wait()  # type: ignore[attr-defined]

    def slow(directory: Path) -> str:
        result = producer({"file": b"content"}, log)(directory)
        time.sleep(0.2)  # wide enough that all eight are waiting on the key lock
        return result

    record = store.ensure_layer("shared-key", slow)
    results.put((record.diff_id, str(record.path), (record.path / "file").read_bytes()))  # type: ignore[attr-defined]


def test_concurrent_ensure_layer_produces_once(tmp_path: Path) -> None:
    root, log = tmp_path / "store", tmp_path / "productions"
    Store(root)
    barrier, results = FORK.Barrier(8), FORK.Queue()
    procs = [
        FORK.Process(target=_concurrent_worker, args=(root, log, barrier, results))
        for _ in range(8)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=10) for _ in procs]
    for p in procs:
        p.join(5)
        assert p.exitcode == 0
    assert log.read_text().count("\n") == 1, "produced more than once"
    assert len(set(got)) == 1
    assert got[0][2] == b"content"


def test_producer_killed_midway_then_retry(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    started = FORK.Event()

    def stuck(directory: Path) -> str:
        (directory / "partial").write_bytes(b"x" * 4096)
        started.set()
        time.sleep(60)
        raise AssertionError("not killed")

    proc = FORK.Process(target=lambda: Store(root).ensure_layer("k", stuck))
    proc.start()
    assert started.wait(10)
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
    proc.join(5)
    assert proc.exitcode == -signal.SIGKILL

    assert store.get_cache("k") is None
    assert os.listdir(root / "layers" / "sha256") == []
    assert len(os.listdir(root / "tmp")) == 2  # the dead owner's work and its lock file

    log = tmp_path / "log"
    started_at = time.monotonic()
    record = store.ensure_layer("k", producer({"good": b"yes"}, log))
    assert time.monotonic() - started_at < 2, "the dead producer's lock was not released"
    assert (record.path / "good").read_bytes() == b"yes"
    assert not (record.path / "partial").exists()
    assert log.read_text().count("\n") == 1

    report = store.prune()
    assert len(report.tmp) == 1
    assert os.listdir(root / "tmp") == []
    assert store.fsck() == []
    assert store.ensure_layer("k", producer({"again": b""}, log)) == record
    assert log.read_text().count("\n") == 1


def test_a_failing_producer_stores_nothing(store: Store) -> None:
    def broken(directory: Path) -> str:
        (directory / "f").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.ensure_layer("k", broken)
    assert store.get_cache("k") is None
    assert os.listdir(store.root / "tmp") == []
    with pytest.raises(SpecError, match="not a diff id"):
        store.ensure_layer("k", lambda d: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(SpecError, match="invalid digest"):
        store.ensure_layer("k", lambda d: "sha256:short")
    assert os.listdir(store.root / "layers" / "sha256") == []
    record = store.ensure_layer("k", producer({"f": b"ok"}))  # the key lock is free again
    assert record.path.is_dir()


@pytest.mark.parametrize("key", ["", "a/b", "../x", ".hidden", "x" * 201, "a b"])
def test_cache_keys_are_checked(store: Store, key: str) -> None:
    with pytest.raises(SpecError, match="invalid cache key"):
        store.ensure_layer(key, producer({}))


def test_kills_at_random_moments_leave_a_valid_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root)

    def churn() -> None:
        store = Store(root)
        for i in range(10_000):
            tag = f"{os.getpid()}-{i}"
            layer = store.ensure_layer(
                f"churn-{tag}",
                producer({f"d{j}/f": b"x" * j for j in range(20)} | {"id": tag.encode()}),
            )
            store.put_blob(io.BytesIO(os.urandom(50_000)))
            store.tag(f"churn:{tag}", image_on(store, layer.diff_id, note=tag))
            if i % 3 == 0:
                store.remove_image(f"churn:{tag}")
                store.prune()

    rng = random.Random(20240601)
    for _ in range(10):
        proc = FORK.Process(target=churn)
        proc.start()
        time.sleep(rng.uniform(0.005, 0.12))
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(5)
        assert proc.exitcode == -signal.SIGKILL

    store = Store(root)
    assert store.fsck() == []
    store.prune()
    assert os.listdir(root / "tmp") == []
    assert store.fsck() == []
    for image in store.list_images():
        assert all(layer.path.is_dir() for layer in store.image_layers(image.id))


# --- blobs ---


def test_blobs(store: Store) -> None:
    data = os.urandom(3 << 20)
    d = store.put_blob(io.BytesIO(data))
    assert d == digest(data)
    assert store.has_blob(d)
    with store.open_blob(d) as f:
        assert f.read() == data
    assert store.put_blob(io.BytesIO(data), expected=d) == d
    with pytest.raises(StoreCorruptError, match="expected"):
        store.put_blob(io.BytesIO(b"other"), expected=digest(b"something else"))
    assert not store.has_blob(digest(b"other"))
    with pytest.raises(ImageNotFound, match="blob"):
        store.open_blob(digest(b"absent"))
    with pytest.raises(SpecError, match="only holds sha256"):
        store.has_blob("sha512:" + "a" * 128)
    assert os.listdir(store.root / "tmp") == []


def test_a_live_owners_work_is_not_swept(store: Store) -> None:
    reading, release = FORK.Event(), FORK.Event()

    class Slow(io.RawIOBase):
        sent = False

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            if self.sent:
                return 0
            reading.set()
            assert release.wait(10)
            buffer[:4] = b"data"
            self.sent = True
            return 4

    proc = FORK.Process(target=lambda: store.put_blob(Slow()))  # type: ignore[arg-type]
    proc.start()
    assert reading.wait(10)
    report = store.prune()
    assert report.tmp == ()
    release.set()
    proc.join(10)
    assert proc.exitcode == 0
    assert store.has_blob(digest(b"data"))
    assert os.listdir(store.root / "tmp") == []


# --- images and tags ---


def test_images_by_tag_id_prefix_and_digest(store: Store) -> None:
    layer = store.ensure_layer("l", producer({"f": b"1"}))
    iid = image_on(store, layer.diff_id)
    assert store.tag("busybox", iid) == "docker.io/library/busybox:latest"
    store.tag(f"localhost:5000/app@{digest(b'manifest')}", iid)

    image = store.get_image("busybox")
    assert image.id == iid
    assert image.tags == (
        "docker.io/library/busybox:latest",
        f"localhost:5000/app@{digest(b'manifest')}",
    )
    assert image.config.diff_ids == (layer.diff_id,)
    for name in (
        iid,
        iid[7:],
        iid[:19],
        iid[7:15],
        "docker.io/library/busybox:latest",
        f"localhost:5000/app@{digest(b'manifest')}",
        f"localhost:5000/app:v1@{digest(b'manifest')}",
        f"anything@{iid}",  # a config digest names the image itself
    ):
        assert store.resolve(name) == iid, name
    assert [i.id for i in store.list_images()] == [iid]
    assert store.image_layers("busybox") == [layer]

    with pytest.raises(ImageNotFound, match="'busybox:2'"):
        store.get_image("busybox:2")
    with pytest.raises(ImageNotFound):
        store.get_image("sha256:" + "f" * 64)
    with pytest.raises(SpecError, match="reserved name"):
        store.get_image("scratch")
    with pytest.raises(SpecError, match="reserved name"):
        store.tag("host", iid)


def test_an_ambiguous_id_prefix_is_refused(store: Store) -> None:
    by_first: dict[str, str] = {}
    for n in range(40):
        iid = image_on(store, note=str(n))
        if iid[7] in by_first:
            break
        by_first[iid[7]] = iid
    else:
        pytest.fail("no two ids share a first digit")
    with pytest.raises(ImageError, match="ambiguous"):
        store.resolve(iid[7])


def test_put_image_needs_its_layers(store: Store) -> None:
    missing = digest(b"not here")
    with pytest.raises(ImageError, match=f"layer {missing} is not in the store"):
        image_on(store, missing)


def test_registry_config_bytes_are_kept_as_they_are(store: Store) -> None:
    raw = b'{\n  "architecture": "amd64", "os": "linux",\n  "rootfs": {"type": "layers", "diff_ids": []}\n}'
    iid = store.put_image(raw)
    assert iid == digest(raw)
    assert (store.root / "images" / "sha256" / f"{iid[7:]}.json").read_bytes() == raw
    assert store.get_image(iid).config.os == "linux"


def test_untag_and_remove(tmp_path: Path) -> None:
    used: set[str] = set()
    store = Store(tmp_path, in_use=used.__contains__)
    layer = store.ensure_layer("k", producer({"f": b"1"}))
    iid = image_on(store, layer.diff_id)
    store.tag("a", iid)
    store.tag("b:2", iid)
    assert store.untag("b:2") == iid
    with pytest.raises(ImageNotFound, match="no tag"):
        store.untag("b:2")

    used.add(iid)
    with pytest.raises(ImageError, match=r"cannot be forced.*used by a container"):
        store.remove_image("a")
    assert store.get_image("a").id == iid
    used.clear()
    assert store.remove_image("a") == ["docker.io/library/a:latest"]
    with pytest.raises(ImageNotFound):
        store.get_image(iid)
    assert store.has_layer(layer.diff_id)  # layers go with prune, not with the image


def test_layer_users_are_derived_from_images(store: Store) -> None:
    base = store.ensure_layer("base", producer({"base": b""}))
    top = store.ensure_layer("top", producer({"top": b""}))
    one = image_on(store, base.diff_id)
    two = image_on(store, base.diff_id, top.diff_id)
    assert store.layer_users() == {base.diff_id: tuple(sorted((one, two))), top.diff_id: (two,)}
    store.remove_image(two)
    assert store.layer_users() == {base.diff_id: (one,)}


TAGS = 5


def _tag_writer(root: Path, n: int, iid: str, barrier: object) -> None:
    store = Store(root)
    barrier.wait()  # type: ignore[attr-defined]
    for j in range(TAGS):
        store.tag(f"writer{n}:t{j}", iid)
        store.tag("contested", iid)


def test_concurrent_tagging_loses_no_update(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root)
    ids = [image_on(store, note=f"image {n}") for n in range(8)]
    barrier, done = FORK.Barrier(9), FORK.Event()
    reads, torn = FORK.Value("i", 0), FORK.Value("i", 0)

    def reader() -> None:
        barrier.wait()
        while not done.is_set():
            try:
                json.loads((root / "tags.json").read_bytes())
            except FileNotFoundError:
                pass
            except ValueError:
                torn.value += 1
            reads.value += 1

    procs = [FORK.Process(target=_tag_writer, args=(root, n, ids[n], barrier)) for n in range(8)]
    watcher = FORK.Process(target=reader)
    for p in [*procs, watcher]:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    done.set()
    watcher.join(5)

    tags = json.loads((root / "tags.json").read_bytes())
    assert len(tags) == 8 * TAGS + 1
    for n, iid in enumerate(ids):
        for j in range(TAGS):
            assert tags[f"docker.io/library/writer{n}:t{j}"] == iid
    assert tags["docker.io/library/contested:latest"] in ids
    assert torn.value == 0 and reads.value > 0


# --- build cache ---


def test_cache_records(store: Store) -> None:
    layer = store.ensure_layer("l", producer({"f": b""}))
    iid = image_on(store, layer.diff_id)
    store.put_cache("step:abc", CacheRecord("image", iid))
    record = store.get_cache("step:abc")
    assert record is not None and record.kind == "image" and record.digest == iid
    assert record.created
    assert store.get_cache("absent") is None
    with pytest.raises(ImageError, match="not in the store"):
        store.put_cache("x", CacheRecord("layer", digest(b"nothing")))
    with pytest.raises(SpecError, match="kind"):
        CacheRecord("blob", iid)  # type: ignore[arg-type]
    store.remove_image(iid)
    assert store.get_cache("step:abc") is None  # dangling reads as absent


def test_a_cache_hit_marks_the_layer_used(store: Store) -> None:
    layer = store.ensure_layer("k", producer({"f": b""}))
    stamp = layer.path.parent / "used"
    os.utime(stamp, (1000, 1000))
    store.ensure_layer("k", producer({}))
    assert stamp.stat().st_mtime > time.time() - 60
    os.utime(stamp, (1000, 1000))
    store.get_cache("k")
    assert stamp.stat().st_mtime > time.time() - 60


# --- prune ---


def test_prune_plan_is_pure_and_lru() -> None:
    a, b, c, d = (digest(x.encode()) for x in "abcd")
    plan = plan_prune(
        images={"img": (a,)},
        removable_images=set(),
        layers={
            a: LayerUse(100, 1.0),
            b: LayerUse(10, 2.0),
            c: LayerUse(10, 3.0),
            d: LayerUse(5, 9.0),
        },
        cache={
            "kb": CacheRecord("layer", b),
            "kc": CacheRecord("layer", c),
            "gone": CacheRecord("layer", digest(b"x")),
        },
        now=10.0,
        max_size=115,
    )
    # d is an orphan; a belongs to an image although it is the oldest; b is the LRU cache layer
    assert plan.layers == {d, b}
    assert plan.cache == {"kb", "gone"}
    assert plan.images == frozenset()
    aged = plan_prune(
        images={},
        removable_images=set(),
        layers={b: LayerUse(10, 2.0), c: LayerUse(10, 8.0)},
        cache={"kb": CacheRecord("layer", b), "kc": CacheRecord("layer", c)},
        now=10.0,
        max_age=5,
    )
    assert aged.layers == {b} and aged.cache == {"kb"}


def test_prune_removes_orphans_and_dangling_cache(store: Store) -> None:
    kept = store.ensure_layer("kept", producer({"k": b"1"}))
    orphan = store.ensure_layer("orphan", producer({"o": b"2"}))
    os.unlink(store.root / "cache" / "orphan.json")  # as if killed before recording the key
    iid = image_on(store, kept.diff_id)
    store.put_cache("img-step", CacheRecord("image", iid))
    store.remove_image(iid)

    report = store.prune()
    assert report.layers == (orphan.diff_id,)
    assert report.cache == ("img-step",)
    assert report.freed == orphan.size
    assert report.kept == kept.size
    assert store.has_layer(kept.diff_id) and not store.has_layer(orphan.diff_id)
    assert os.listdir(store.root / "tmp") == []
    assert os.listdir(store.root / "locks" / "keys") == []
    assert store.prune().layers == ()


def test_prune_evicts_least_recently_used_cache_layers(store: Store) -> None:
    now = time.time()
    layers = {}
    for age, key in [(300, "old"), (200, "mid"), (100, "new"), (400, "image")]:
        layers[key] = store.ensure_layer(key, producer({key: os.urandom(8192)}))
        os.utime(layers[key].path.parent / "used", (now - age, now - age))
    image_on(store, layers["image"].diff_id)
    total = sum(layer.size for layer in layers.values())

    report = store.prune(max_size=total - 1)
    assert report.layers == (layers["old"].diff_id,)
    assert report.cache == ("old",)
    assert store.get_cache("old") is None
    assert (store.root / "cache" / "mid.json").is_file()  # (get_cache would mark it used)

    report = store.prune(max_age=150)
    assert report.layers == (layers["mid"].diff_id,)
    assert store.has_layer(layers["image"].diff_id)  # images keep their layers, however old
    assert store.has_layer(layers["new"].diff_id)


def test_prune_without_keeping_images(tmp_path: Path) -> None:
    busy: set[str] = set()
    store = Store(tmp_path, in_use=busy.__contains__)
    a = store.ensure_layer("a", producer({"a": b""}))
    b = store.ensure_layer("b", producer({"b": b""}))
    running, idle = image_on(store, a.diff_id), image_on(store, b.diff_id)
    store.tag("running", running)
    store.tag("idle", idle)
    busy.add(running)
    report = store.prune(keep_images=False, max_age=0)
    assert report.images == (idle,)
    assert report.layers == (b.diff_id,)
    assert [i.id for i in store.list_images()] == [running]
    with pytest.raises(ImageNotFound):
        store.get_image("idle")


def test_prune_waits_for_a_build_holding_the_guard(store: Store, tmp_path: Path) -> None:
    holding = FORK.Event()
    released = tmp_path / "released"

    def build() -> None:
        with store.guard():
            holding.set()
            time.sleep(0.3)
            released.write_text(repr(time.time()))

    proc = FORK.Process(target=build)
    proc.start()
    assert holding.wait(10)
    store.prune()
    finished = time.time()
    proc.join(5)
    assert finished >= float(released.read_text())


def test_prune_inside_the_guard_raises_instead_of_hanging(store: Store) -> None:
    with store.guard(), pytest.raises(ImageError, match="wait for itself"):
        store.prune()
    assert store.prune() == store.prune()  # and works again once released


def test_prune_rejects_negative_limits(store: Store) -> None:
    with pytest.raises(SpecError, match="max_size"):
        store.prune(max_size=-1)
    with pytest.raises(SpecError, match="max_age"):
        store.prune(max_age=-1)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    victim = tmp_path / "outside"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    return victim


def _hostile_tree(outside: Path) -> Callable[[Path], str]:
    def produce(directory: Path) -> str:
        (directory / "to-dir").symlink_to(outside)
        (directory / "to-file").symlink_to(outside / "precious")
        (directory / "etc").symlink_to("/etc")
        ro = directory / "usr" / "lib"
        ro.mkdir(parents=True)
        (ro / "lib.so").write_bytes(b"\x7fELF")
        (ro / "sub").mkdir()
        (ro / "sub" / "deep").write_text("x")
        os.chmod(ro / "sub", 0o500)
        os.chmod(ro, 0o555)
        os.chmod(directory / "usr", 0o555)
        closed = directory / "closed"
        closed.mkdir()
        (closed / "secret").write_text("s")
        os.chmod(closed / "secret", 0)
        os.chmod(closed, 0)
        return digest(b"hostile")

    return produce


def _remove_hostile_layer(root: Path, outside: Path) -> None:
    store = Store(root)
    layer = store.ensure_layer("hostile", _hostile_tree(outside))
    assert store.fsck() == []
    report = store.prune(max_age=0)
    assert report.layers == (layer.diff_id,)
    assert not layer.path.parent.exists()
    assert os.listdir(root / "tmp") == []
    assert (outside / "precious").read_text() == "keep me"


def test_removal_never_follows_symlinks_and_handles_read_only_dirs(
    tmp_path: Path, outside: Path
) -> None:
    _remove_hostile_layer(tmp_path / "store", outside)
    assert os.path.exists("/etc/passwd")


@pytest.mark.needs_root
def test_removal_as_an_unprivileged_owner() -> None:
    # A store owned by an unprivileged user, used by that user: read-only and unreadable
    # directories must be opened up (by their owner) to be removed.
    base = Path(tempfile.mkdtemp(prefix="isolate-store-"))
    try:
        os.chown(base, NOBODY, NOBODY)

        def as_nobody() -> None:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outside = base / "outside"
            outside.mkdir()
            (outside / "precious").write_text("keep me")
            _remove_hostile_layer(base / "store", outside)

        assert run_in_child(as_nobody) == 0
    finally:
        shutil.rmtree(base)


# --- fsck ---


@pytest.fixture
def populated(store: Store) -> Iterator[tuple[Store, str, str, str]]:
    layer = store.ensure_layer("k", producer({"bin/tool": b"#!/bin/sh\n"}))
    iid = image_on(store, layer.diff_id)
    store.tag("app", iid)
    blob = store.put_blob(io.BytesIO(b"layer tar bytes"))
    assert store.fsck() == []
    yield store, layer.diff_id, iid, blob


def test_fsck_finds_a_corrupted_blob(populated: tuple[Store, str, str, str]) -> None:
    store, _, _, blob = populated
    path = store.root / "blobs" / "sha256" / blob[7:]
    path.write_bytes(b"layer tar bytez")
    [problem] = store.fsck()
    assert (problem.kind, problem.subject) == ("blob", blob)
    assert digest(b"layer tar bytez") in problem.detail
    store.put_blob(io.BytesIO(b"layer tar bytes"))  # storing it again repairs it
    assert store.fsck() == []


def test_fsck_finds_a_missing_layer(populated: tuple[Store, str, str, str]) -> None:
    store, diff_id, iid, _ = populated
    shutil.rmtree(store.root / "layers" / "sha256" / diff_id[7:])
    problems = store.fsck()
    assert [(p.kind, p.subject) for p in problems] == [("image", iid)]
    assert f"layer {diff_id} is missing" in str(problems[0])
    with pytest.raises(StoreCorruptError, match="missing"):
        store.image_layers("app")


def test_fsck_finds_changed_layer_content(populated: tuple[Store, str, str, str]) -> None:
    store, diff_id, _, _ = populated
    layer = store.get_layer(diff_id)
    (layer.path / "bin" / "tool").write_bytes(b"#!/bin/sh\nevil\n")
    [problem] = store.fsck()
    assert (problem.kind, problem.subject) == ("layer", diff_id)
    assert "content changed" in problem.detail
    (layer.path / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(layer.path / "bin" / "tool", 0o4755)  # a mode change is a change too
    assert [p.subject for p in store.fsck()] == [diff_id]


def test_fsck_finds_bad_configs_and_dangling_tags(populated: tuple[Store, str, str, str]) -> None:
    store, _, iid, _ = populated
    config = store.root / "images" / "sha256" / f"{iid[7:]}.json"
    config.write_bytes(config.read_bytes().replace(b"amd64", b"arm64"))
    problems = store.fsck()
    assert [(p.kind, p.subject) for p in problems] == [("image", iid)]
    assert "content has digest" in problems[0].detail
    with pytest.raises(StoreCorruptError):
        store.get_image("app")
    config.unlink()
    assert [(p.kind, p.subject) for p in store.fsck()] == [("tag", "docker.io/library/app:latest")]


def test_mode_bits_survive_in_the_store(store: Store) -> None:
    def produce(directory: Path) -> str:
        (directory / "run").write_text("#!/bin/sh\n")
        os.chmod(directory / "run", 0o755)
        return digest(b"run")

    layer = store.ensure_layer("mode", produce)
    assert stat.S_IMODE((layer.path / "run").stat().st_mode) == 0o755


# --- blob records: which blob holds which layer, which manifest describes which image ---


def test_plan_blob_prune_is_pure() -> None:
    b1, b2, b3, b4, m1, m2 = (digest(x.encode()) for x in ("b1", "b2", "b3", "b4", "m1", "m2"))
    la, lb = digest(b"la"), digest(b"lb")
    plan = plan_blob_prune(
        blobs={b1, b2, b3, b4, m1},
        dist={(la, b1), (lb, b2), (la, digest(b"gone"))},
        manifests={m1: "sha256:" + "1" * 64, m2: "sha256:" + "1" * 64},
        layers={la},
        images={"sha256:" + "1" * 64},
    )
    assert plan.dist == {(lb, b2), (la, digest(b"gone"))}  # layer gone; blob gone
    assert plan.manifests == {m2}  # its blob is gone
    assert plan.blobs == {b2, b3, b4}  # b1 and m1 stay: live records name them


def test_blob_writer_commits_or_drops(store: Store) -> None:
    with store.blob_writer() as w:
        w.write(b"part one, ")
        w.write(memoryview(b"part two"))
        assert w.size == 18 and w.digest == digest(b"part one, part two")
        assert w.commit(expected=digest(b"part one, part two"), size=18) == w.digest
    assert store.has_blob(digest(b"part one, part two"))
    with store.blob_writer() as w:
        w.write(b"abandoned")
    assert not store.has_blob(digest(b"abandoned"))
    with store.blob_writer() as w:
        w.write(b"short")
        with pytest.raises(StoreCorruptError, match="has 5 bytes, expected 6"):
            w.commit(size=6)
    with pytest.raises(RuntimeError), store.blob_writer() as w:
        w.write(b"failed")
        raise RuntimeError
    assert not store.has_blob(digest(b"short")) and not store.has_blob(digest(b"failed"))
    assert os.listdir(store.root / "tmp") == []


def test_layer_blob_records(store: Store) -> None:
    layer = store.ensure_layer("k", producer({"f": b"1"}))
    blob = store.put_blob(io.BytesIO(b"compressed tar"))
    record = BlobRecord(blob, "application/vnd.oci.image.layer.v1.tar+gzip", 14, 2048)
    with pytest.raises(ImageError, match="no such layer"):
        store.record_layer_blob(digest(b"nope"), record)
    with pytest.raises(StoreCorruptError, match="has 14 bytes, not 15"):
        store.record_layer_blob(layer.diff_id, BlobRecord(blob, "x", 15))
    with pytest.raises(ImageNotFound, match="not in the store"):
        store.record_layer_blob(layer.diff_id, BlobRecord(digest(b"absent"), "x", 1))
    assert store.layer_blobs(layer.diff_id) == []
    store.record_layer_blob(layer.diff_id, record)
    assert store.layer_blobs(layer.diff_id) == [record]
    os.unlink(store.root / "blobs" / "sha256" / blob[7:])
    assert store.layer_blobs(layer.diff_id) == []  # a record without its blob is no use


def test_a_recorded_manifest_digest_resolves(store: Store) -> None:
    layer = store.ensure_layer("k", producer({"f": b"1"}))
    iid = image_on(store, layer.diff_id)
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": iid}}).encode()
    mdigest = digest(manifest)
    with pytest.raises(ImageNotFound, match="the blob is missing"):
        store.record_manifest(mdigest, "application/vnd.oci.image.manifest.v1+json", iid)
    store.put_blob(io.BytesIO(manifest))
    with pytest.raises(ImageNotFound, match="no image"):
        store.record_manifest(mdigest, "m", digest(b"no such config"))
    with pytest.raises(ImageNotFound):
        store.resolve(f"registry.example/app@{mdigest}")
    store.record_manifest(mdigest, "application/vnd.oci.image.manifest.v1+json", iid)
    assert store.resolve(f"registry.example/app@{mdigest}") == iid
    assert store.get_image(f"app:v1@{mdigest}").id == iid
    assert store.manifest_image(mdigest) == iid
    [record] = store.manifest_records(iid)
    assert (record.digest, record.image_id) == (mdigest, iid)
    assert (
        store.config_bytes(f"app@{mdigest}")
        == (store.root / "images" / "sha256" / f"{iid[7:]}.json").read_bytes()
    )
    store.remove_image(iid)
    with pytest.raises(ImageNotFound):
        store.resolve(f"registry.example/app@{mdigest}")


def test_prune_drops_records_and_blobs_nothing_refers_to(store: Store) -> None:
    kept_layer = store.ensure_layer("kept", producer({"k": b"1"}))
    gone_layer = store.ensure_layer("gone", producer({"g": b"2"}))
    os.unlink(store.root / "cache" / "gone.json")  # an orphan layer: prune removes it
    kept_blob = store.put_blob(io.BytesIO(b"kept layer tar"))
    gone_blob = store.put_blob(io.BytesIO(b"gone layer tar"))
    stray = store.put_blob(io.BytesIO(b"nobody's"))
    store.record_layer_blob(kept_layer.diff_id, BlobRecord(kept_blob, "t", 14))
    store.record_layer_blob(gone_layer.diff_id, BlobRecord(gone_blob, "t", 14))
    kept_image = image_on(store, kept_layer.diff_id, note="kept")
    gone_image = image_on(store, kept_layer.diff_id, note="gone")
    manifests = {}
    for iid in (kept_image, gone_image):
        data = json.dumps({"config": {"digest": iid}}).encode()
        manifests[iid] = store.put_blob(io.BytesIO(data))
        store.record_manifest(manifests[iid], "m", iid)
    store.remove_image(gone_image)
    (store.root / "manifests" / "sha256" / "junk.json").write_text("{")  # ignored, not valid

    report = store.prune()
    assert report.layers == (gone_layer.diff_id,)
    assert set(report.blobs) == {gone_blob, stray, manifests[gone_image]}
    assert report.blob_bytes == 14 + 8 + len(json.dumps({"config": {"digest": gone_image}}))
    assert sorted(os.listdir(store.root / "blobs" / "sha256")) == sorted(
        [kept_blob[7:], manifests[kept_image][7:]]
    )
    assert os.listdir(store.root / "dist" / "sha256") == [kept_layer.diff_id[7:]]
    assert store.manifest_records(kept_image)[0].digest == manifests[kept_image]
    assert store.manifest_image(manifests[gone_image]) is None
    assert store.fsck() == []
    assert store.prune().blobs == ()


def test_fsck_checks_blob_records(store: Store) -> None:
    layer = store.ensure_layer("k", producer({"k": b"1"}))
    iid = image_on(store, layer.diff_id)
    blob = store.put_blob(io.BytesIO(b"layer blob"))
    store.record_layer_blob(layer.diff_id, BlobRecord(blob, "t", 10))
    manifest = store.put_blob(io.BytesIO(json.dumps({"config": {"digest": iid}}).encode()))
    store.record_manifest(manifest, "m", iid)
    wrong = store.put_blob(io.BytesIO(json.dumps({"config": {"digest": digest(b"x")}}).encode()))
    store.record_manifest(wrong, "m", iid)
    problems = {(p.kind, p.subject): p.detail for p in store.fsck()}
    assert problems == {
        ("manifest", wrong): f"names config {digest(b'x')}, recorded for image {iid}"
    }
    os.unlink(store.root / "blobs" / "sha256" / blob[7:])
    os.unlink(store.root / "blobs" / "sha256" / manifest[7:])
    problems = {(p.kind, p.subject): p.detail for p in store.fsck()}
    assert "is not in the store" in problems["blob", blob]
    assert problems["manifest", manifest] == "its blob is missing"
