"""A registry that lies, breaks off, never ends or fails: every case is refused or retried with a
clear error, and (for pulls) nothing half-written is left in the store.

The hostile server is a real HTTP server on 127.0.0.1 scripted per test; where a case needs a
working registry behind the misbehaviour, it forwards to Debian's ``docker-registry``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from runtime.errors import RegistryError, UnsafePathError
from runtime.image import manifest as mf
from runtime.image.store import Store
from runtime.registry.client import MANIFEST_LIMIT, Registry
from runtime.registry.http import HttpClient, RetryPolicy
from runtime.registry.transfer import TransferEvent, pull
from tests.registry_fixtures import (
    HostileRegistry,
    RegistryServer,
    Request,
    blob,
    challenge,
    endless,
    manifest,
    nth,
    respond,
    sequence,
    slow,
    truncated,
)

FAST_RETRY = RetryPolicy(attempts=4, base=0.001, cap=0.01)


class Login:
    username, password, identity_token = "ann", "pw", None


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def nobody(_name: str) -> None:
    return None


def client(host: str, **http: object) -> Registry:
    options: dict[str, object] = {"retry": FAST_RETRY, **http}
    return Registry(host, credentials=nobody, http=HttpClient(**options))  # type: ignore[arg-type]


def a_manifest(layer: bytes = b"layer") -> bytes:
    return mf.make_manifest(
        mf.Descriptor(mf.OCI_CONFIG, digest(b"{}"), 2),
        [mf.Descriptor(mf.OCI_LAYER_GZIP, digest(layer), len(layer))],
    )


# --- retries ------------------------------------------------------------------------------------


def test_503_then_success_is_retried(hostile_registry: HostileRegistry) -> None:
    data = a_manifest()
    hostile_registry.route(
        "GET",
        r"/v2/app/manifests/v1",
        sequence(respond(503), respond(502), manifest(data, mf.OCI_MANIFEST)),
    )
    with client(hostile_registry.host) as reg:
        got = reg.get_manifest("app", "v1")
    assert got.data == data and got.digest == digest(data)
    assert hostile_registry.count("GET", r"/v2/app/manifests/v1") == 3


def test_429_waits_as_long_as_retry_after_says(hostile_registry: HostileRegistry) -> None:
    data = a_manifest()
    hostile_registry.route(
        "GET",
        r"/v2/app/manifests/v1",
        sequence(respond(429, headers={"Retry-After": "7"}), manifest(data, mf.OCI_MANIFEST)),
    )
    slept: list[float] = []
    with client(hostile_registry.host, sleep=slept.append) as reg:
        assert reg.get_manifest("app", "v1").data == data
    assert slept == [7.0]


def test_lasting_server_errors_give_up_with_the_registry_message(
    hostile_registry: HostileRegistry,
) -> None:
    body = json.dumps({"errors": [{"code": "UNKNOWN", "message": "disk on fire"}]})
    hostile_registry.route(
        "GET", r"/v2/app/manifests/v1", respond(500, body, content_type="application/json")
    )
    with client(hostile_registry.host) as reg, pytest.raises(RegistryError) as info:
        reg.get_manifest("app", "v1")
    assert str(info.value) == (
        f"cannot get manifest {hostile_registry.host}/app:v1: GET "
        f"http://{hostile_registry.host}/v2/app/manifests/v1: 500 Internal Server Error: "
        "UNKNOWN: disk on fire"
    )
    assert hostile_registry.count("GET", r"/v2/app/manifests/v1") == FAST_RETRY.attempts


def test_a_registry_that_does_not_answer_times_out(hostile_registry: HostileRegistry) -> None:
    hostile_registry.route("GET", r"/v2/app/manifests/v1", slow(5.0, respond(200)))
    started = time.monotonic()
    with (
        client(hostile_registry.host, timeout=0.1) as reg,
        pytest.raises(RegistryError, match=r"GET http://.*/v2/app/manifests/v1: timed out"),
    ):
        reg.get_manifest("app", "v1")
    assert time.monotonic() - started < 2.0
    assert hostile_registry.count("GET", r"/v2/app/manifests/v1") == FAST_RETRY.attempts


# --- manifests ----------------------------------------------------------------------------------


def test_manifest_with_another_digest_than_asked_is_refused(
    hostile_registry: HostileRegistry,
) -> None:
    real, fake = a_manifest(b"one"), a_manifest(b"two")
    hostile_registry.route(
        "GET", f"/v2/app/manifests/{digest(real)}", manifest(fake, mf.OCI_MANIFEST)
    )
    with client(hostile_registry.host) as reg, pytest.raises(RegistryError) as info:
        reg.get_manifest("app", digest(real))
    assert f"the manifest has digest {digest(fake)}, not the {digest(real)} asked for" in str(
        info.value
    )


def test_manifest_whose_digest_header_lies_is_refused(hostile_registry: HostileRegistry) -> None:
    data = a_manifest()
    lie = digest(b"something else")
    hostile_registry.route(
        "GET", r"/v2/app/manifests/v1", manifest(data, mf.OCI_MANIFEST, digest=lie)
    )
    with client(hostile_registry.host) as reg, pytest.raises(RegistryError) as info:
        reg.get_manifest("app", "v1")
    assert f"says Docker-Content-Digest {lie}; refused" in str(info.value)


def test_endless_or_huge_manifests_are_refused_without_reading_them(
    hostile_registry: HostileRegistry,
) -> None:
    hostile_registry.route("GET", r"/v2/app/manifests/endless", endless())
    hostile_registry.route("GET", r"/v2/app/manifests/huge", endless(content_length=10**12))
    with client(hostile_registry.host) as reg:
        with pytest.raises(RegistryError, match=f"longer than the {MANIFEST_LIMIT} bytes"):
            reg.get_manifest("app", "endless")
        with pytest.raises(RegistryError, match=f"is {10**12} bytes, more than the"):
            reg.get_manifest("app", "huge")


# --- blobs --------------------------------------------------------------------------------------


def test_blob_with_wrong_content_fails_at_its_last_byte(hostile_registry: HostileRegistry) -> None:
    data, evil = os.urandom(100_000), os.urandom(100_000)
    hostile_registry.route("GET", f"/v2/app/blobs/{digest(data)}", blob(evil, digest=digest(data)))
    handed: list[int] = []
    with (
        client(hostile_registry.host) as reg,
        reg.open_blob("app", digest(data), len(data)) as r,
        pytest.raises(RegistryError) as info,
    ):
        while chunk := r.read(30_000):
            handed.append(len(chunk))
    assert sum(handed) < len(data)  # the last piece was never handed out
    assert str(info.value) == (
        f"blob {digest(data)} from {hostile_registry.host}/app: the content has digest "
        f"{digest(evil)}; refused"
    )


def test_truncated_blob_is_resumed_with_range(hostile_registry: HostileRegistry) -> None:
    data = os.urandom(200_000)
    hostile_registry.route(
        "GET", f"/v2/app/blobs/{digest(data)}", sequence(truncated(data, send=70_000), blob(data))
    )
    with client(hostile_registry.host) as reg:
        got = reg.get_blob("app", digest(data), len(data), limit=1 << 20)
    assert got == data
    first, second = hostile_registry.matching("GET", f"/v2/app/blobs/{digest(data)}")
    assert first.header("Range") is None
    assert second.header("Range") == "bytes=70000-"


def test_a_blob_that_always_breaks_off_is_refused(hostile_registry: HostileRegistry) -> None:
    data = os.urandom(50_000)
    hostile_registry.route("GET", f"/v2/app/blobs/{digest(data)}", truncated(data, send=10))
    with client(hostile_registry.host) as reg, pytest.raises(RegistryError) as info:
        reg.get_blob("app", digest(data), len(data), limit=1 << 20)
    assert "truncated after 10 of 50000 bytes, 3 resumes failed" in str(info.value)


def test_endless_blob_never_gives_more_than_its_size(hostile_registry: HostileRegistry) -> None:
    data = os.urandom(1000)
    hostile_registry.route("GET", f"/v2/app/blobs/{digest(data)}", endless())
    hostile_registry.route("GET", f"/v2/app/blobs/{digest(b'x')}", endless(content_length=10**12))
    with client(hostile_registry.host) as reg:
        with pytest.raises(RegistryError, match="the content has digest"):
            reg.get_blob("app", digest(data), len(data), limit=1 << 20)
        with pytest.raises(RegistryError, match=f"sends {10**12} bytes, but the blob has 1"):
            reg.open_blob("app", digest(b"x"), 1)


def test_redirect_to_another_host_does_not_carry_credentials(
    hostile_registry: HostileRegistry,
) -> None:
    data = os.urandom(5000)
    storage = HostileRegistry()
    try:
        storage.route("GET", r"/storage/blob", blob(data))
        hostile_registry.route("GET", r"/v2/", challenge('Basic realm="r"'))

        def needs_login(req: Request) -> None:
            if req.headers.get("Authorization") is None:
                challenge('Basic realm="r"')(req)
            else:
                req.reply(307, headers={"Location": f"{storage.url}/storage/blob?sig=1"})

        hostile_registry.route("GET", f"/v2/app/blobs/{digest(data)}", needs_login)

        reg = Registry(
            hostile_registry.host,
            credentials=lambda _n: Login(),
            http=HttpClient(retry=FAST_RETRY),
        )
        with reg:
            assert reg.get_blob("app", digest(data), len(data), limit=1 << 20) == data
        (at_storage,) = storage.requests
    finally:
        storage.close()
    asked = hostile_registry.matching("GET", f"/v2/app/blobs/{digest(data)}")
    assert [r.header("Authorization") is not None for r in asked] == [False, True]
    assert at_storage.header("Authorization") is None
    assert at_storage.query == {"sig": ["1"]}


def test_an_upload_url_on_another_host_gets_no_credentials(
    hostile_registry: HostileRegistry,
) -> None:
    data = b"blob to upload"
    storage = HostileRegistry()
    try:
        storage.route("PUT", r"/upload/1", respond(201))

        def needs_login(req: Request) -> None:
            if req.headers.get("Authorization") is None:
                challenge('Basic realm="r"')(req)
            else:
                req.reply(202, headers={"Location": f"{storage.url}/upload/1?state=x"})

        hostile_registry.route("POST", r"/v2/app/blobs/uploads/", needs_login)
        reg = Registry(
            hostile_registry.host, credentials=lambda _n: Login(), http=HttpClient(retry=FAST_RETRY)
        )
        with reg:
            assert reg.upload_blob("app", digest(data), len(data), data) == "uploaded"
        (put,) = storage.requests
    finally:
        storage.close()
    assert put.header("Authorization") is None
    assert put.query == {"state": ["x"], "digest": [digest(data)]} and put.body == data


# --- uploads ------------------------------------------------------------------------------------


def test_500_in_the_middle_of_a_chunked_upload_restarts_it(
    registry: RegistryServer, hostile_registry: HostileRegistry
) -> None:
    hostile_registry.forward_to(registry)
    hostile_registry.route("PATCH", r"/v2/app/blobs/uploads/.*", nth(2, respond(500)))
    data = os.urandom(5 << 20)
    with client(hostile_registry.host) as reg:
        outcome = reg.upload_blob(
            "app",
            digest(data),
            len(data),
            lambda: io.BytesIO(data),
            monolithic_limit=1 << 20,
            chunk_size=2 << 20,
        )
    assert outcome == "uploaded"
    methods = [r.method for r in hostile_registry.requests if "/uploads/" in r.path]
    # chunk 1 ok, chunk 2 fails, the session is dropped, and a new upload sends all 3 chunks.
    assert methods == ["POST", "PATCH", "PATCH", "DELETE", "POST", "PATCH", "PATCH", "PATCH", "PUT"]
    assert registry.request("GET", f"/v2/app/blobs/{digest(data)}").body == data


def test_an_upload_that_keeps_failing_gives_up_with_a_clear_error(
    registry: RegistryServer, hostile_registry: HostileRegistry
) -> None:
    hostile_registry.forward_to(registry)
    hostile_registry.route("PATCH", r"/v2/app/blobs/uploads/.*", respond(500))
    data = os.urandom(3 << 20)
    with client(hostile_registry.host) as reg, pytest.raises(RegistryError) as info:
        reg.upload_blob("app", digest(data), len(data), data, monolithic_limit=1 << 20)
    message = str(info.value)
    assert message.startswith(
        f"upload of blob {digest(data)} to {hostile_registry.host}/app failed 3 times; last: "
    )
    assert "PATCH http://" in message and "500 Internal Server Error" in message
    assert hostile_registry.count("POST", r"/v2/app/blobs/uploads/") == 3
    assert registry.request("HEAD", f"/v2/app/blobs/{digest(data)}").status == 404


# --- pulls: refused, and the store as it was ----------------------------------------------------


def tar_of(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class EvilImage:
    """An image the hostile registry serves as ``evil:v1``: config and gzip layers."""

    def __init__(self, hostile: HostileRegistry, *layers: dict[str, bytes]) -> None:
        self.tars = [tar_of(files) for files in layers]
        self.blobs = [gzip.compress(t, mtime=0) for t in self.tars]
        self.config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [digest(t) for t in self.tars]},
            }
        ).encode()
        self.manifest = mf.make_manifest(
            mf.Descriptor(mf.OCI_CONFIG, digest(self.config), len(self.config)),
            [mf.Descriptor(mf.OCI_LAYER_GZIP, digest(b), len(b)) for b in self.blobs],
        )
        hostile.route("GET", r"/v2/evil/manifests/v1", manifest(self.manifest, mf.OCI_MANIFEST))
        hostile.route("GET", f"/v2/evil/blobs/{digest(self.config)}", blob(self.config))
        for data in self.blobs:
            hostile.route("GET", f"/v2/evil/blobs/{digest(data)}", blob(data))
        self.ref = hostile.ref("evil", "v1")


def snapshot(store: Store) -> set[str]:
    """Every file and directory of the store, but the lock files (left in place by design)."""
    return {
        str(p.relative_to(store.root))
        for p in store.root.rglob("*")
        if p.relative_to(store.root).parts[0] != "locks"
    }


def pull_fails(store: Store, ref: str, error: type[Exception], **options: object) -> Exception:
    before = snapshot(store)
    events: list[TransferEvent] = []
    with pytest.raises(error) as info:
        pull(
            store,
            ref,
            http=HttpClient(retry=FAST_RETRY),
            credentials=nobody,
            progress=events.append,
            **options,  # type: ignore[arg-type]
        )
    assert snapshot(store) == before, "the failed pull left something in the store"
    assert not store.list_images()
    assert any(e.state == "failed" for e in events) or not events
    return info.value


@pytest.mark.rootless
def test_pull_of_a_layer_with_dotdot_entries_is_refused(
    hostile_registry: HostileRegistry, tmp_path: Path
) -> None:
    store = Store(tmp_path / "deep" / "store")
    evil = EvilImage(hostile_registry, {"../../escaped": b"pwned", "etc/ok": b"fine"})
    error = pull_fails(store, evil.ref, UnsafePathError)
    assert "../../escaped" in str(error) and digest(evil.blobs[0]) in str(error)
    assert not list(tmp_path.rglob("escaped"))


def test_pull_of_a_blob_with_wrong_content_is_refused(
    hostile_registry: HostileRegistry, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    evil = EvilImage(hostile_registry, {"b": b"two" * 100_000})
    bad = digest(evil.blobs[0])
    wrong = gzip.compress(tar_of({"b": b"TWO" * 100_000}), mtime=0)[: len(evil.blobs[0])]
    hostile_registry.route("GET", f"/v2/evil/blobs/{bad}", blob(wrong.ljust(len(evil.blobs[0]))))
    error = pull_fails(store, evil.ref, RegistryError)
    assert f"blob {bad} from {hostile_registry.host}/evil: the content has digest" in str(error)


def test_one_failing_layer_stops_the_other_downloads(
    hostile_registry: HostileRegistry, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    evil = EvilImage(hostile_registry, {"good": b"good" * 1000}, {"bad": b"bad"})
    good, bad = (digest(b) for b in evil.blobs)
    hostile_registry.route("GET", f"/v2/evil/blobs/{good}", slow(0.3, blob(evil.blobs[0])))
    hostile_registry.route("GET", f"/v2/evil/blobs/{bad}", truncated(evil.blobs[1], send=5))
    error = pull_fails(store, evil.ref, RegistryError)
    assert f"blob {bad} from" in str(error)


def test_pull_of_a_truncated_blob_is_refused(
    hostile_registry: HostileRegistry, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    evil = EvilImage(hostile_registry, {"big": os.urandom(300_000)})
    layer = digest(evil.blobs[0])
    hostile_registry.route("GET", f"/v2/evil/blobs/{layer}", truncated(evil.blobs[0]))
    error = pull_fails(store, evil.ref, RegistryError)
    assert "resumes failed" in str(error)
    assert hostile_registry.count("GET", f"/v2/evil/blobs/{layer}") == 4


def test_pull_of_an_endless_blob_is_refused(
    hostile_registry: HostileRegistry, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    evil = EvilImage(hostile_registry, {"f": b"data"})
    hostile_registry.route("GET", f"/v2/evil/blobs/{digest(evil.blobs[0])}", endless())
    started = time.monotonic()
    pull_fails(store, evil.ref, RegistryError)
    assert time.monotonic() - started < 2.0


def test_pull_with_a_config_that_is_not_what_the_manifest_says(
    hostile_registry: HostileRegistry, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    evil = EvilImage(hostile_registry, {"f": b"data"})
    other = evil.config.replace(b"amd64", b"arm64")
    hostile_registry.route("GET", f"/v2/evil/blobs/{digest(evil.config)}", blob(other))
    error = pull_fails(store, evil.ref, RegistryError)
    assert "the content has digest" in str(error) and digest(evil.config) in str(error)
    assert hostile_registry.count("GET", r"/v2/evil/blobs/.*") == 1  # no layer was fetched


def test_a_pull_retried_through_503s_succeeds(
    hostile_registry: HostileRegistry, tmp_path: Path
) -> None:
    store = Store(tmp_path / "store")
    evil = EvilImage(hostile_registry, {"f": b"data"})
    layer = digest(evil.blobs[0])
    hostile_registry.route(
        "GET", f"/v2/evil/blobs/{layer}", sequence(respond(503), blob(evil.blobs[0]))
    )
    result = pull(store, evil.ref, http=HttpClient(retry=FAST_RETRY), credentials=nobody)
    assert result.image_id == digest(evil.config)
    assert hostile_registry.count("GET", f"/v2/evil/blobs/{layer}") == 2
