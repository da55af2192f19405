"""The distribution client against Debian's real ``docker-registry``: blobs, manifests, chunked
uploads, cross-repository mounts, basic and token authentication.

A :class:`HostileRegistry` with ``forward_to(registry)`` in front of the real registry serves as
a recording proxy where a test must see the requests themselves (chunks, mounts).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.errors import AuthError, RegistryError
from runtime.image import manifest as mf
from runtime.registry import credentials
from runtime.registry.client import Registry
from runtime.registry.http import HttpClient, RetryPolicy
from tests.registry_fixtures import HostileRegistry, RegistryServer

FAST_RETRY = RetryPolicy(attempts=4, base=0.001, cap=0.01)


@dataclass(frozen=True)
class Login:
    username: str
    password: str = ""
    identity_token: str | None = None


def nobody(_name: str) -> None:
    return None


def login_as(username: str | None, password: str | None) -> object:
    assert username is not None and password is not None
    user = Login(username, password)
    return lambda _name: user


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def client(host: str, credentials: object = nobody) -> Registry:
    return Registry(host, credentials=credentials, http=HttpClient(retry=FAST_RETRY))  # type: ignore[arg-type]


def push_image(reg: Registry, repo: str, tag: str, layer: bytes) -> tuple[str, bytes]:
    """A minimal image (a config and one layer) pushed by the client; returns its digest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    reg.upload_blob(repo, digest(config), len(config), config)
    reg.upload_blob(repo, digest(layer), len(layer), layer)
    data = mf.make_manifest(
        mf.Descriptor(mf.OCI_CONFIG, digest(config), len(config)),
        [mf.Descriptor(mf.OCI_LAYER_GZIP, digest(layer), len(layer))],
    )
    return reg.put_manifest(repo, tag, data, mf.OCI_MANIFEST), data


def test_blob_upload_skip_and_verified_download(registry: RegistryServer) -> None:
    data = os.urandom(300_000)
    with client(registry.host) as reg:
        reg.ping()
        assert reg.blob_exists("app/one", digest(data)) is None
        assert reg.upload_blob("app/one", digest(data), len(data), data) == "uploaded"
        assert reg.upload_blob("app/one", digest(data), len(data), data) == "exists"
        assert reg.blob_exists("app/one", digest(data)) == len(data)
        with reg.open_blob("app/one", digest(data), len(data)) as reader:
            parts = []
            while chunk := reader.read(65536):
                parts.append(chunk)
        assert b"".join(parts) == data
    stored = registry.request("GET", f"/v2/app/one/blobs/{digest(data)}")
    assert stored.status == 200 and stored.body == data


def test_manifest_by_tag_and_digest_with_media_type(registry: RegistryServer) -> None:
    with client(registry.host) as reg:
        pushed, data = push_image(reg, "app/one", "v1", b"layer bytes")
        assert pushed == digest(data)
        by_tag = reg.get_manifest("app/one", "v1")
        by_digest = reg.get_manifest("app/one", pushed)
        head = reg.head_manifest("app/one", "v1")
        missing = reg.head_manifest("app/one", "v2")
        with pytest.raises(RegistryError) as info:
            reg.get_manifest("app/one", "v2")
    assert by_tag.data == by_digest.data == data
    assert by_tag.digest == by_digest.digest == pushed
    assert by_tag.media_type == mf.OCI_MANIFEST
    assert head is not None and (head.digest, head.size) == (pushed, len(data))
    assert missing is None
    message = str(info.value)
    assert f"manifest {registry.host}/app/one:v2 not found" in message
    assert f"GET http://{registry.host}/v2/app/one/manifests/v2: 404" in message
    assert "MANIFEST_UNKNOWN" in message


def test_big_blob_goes_up_in_chunks_with_content_range(
    registry: RegistryServer, hostile_registry: HostileRegistry
) -> None:
    hostile_registry.forward_to(registry)
    data = os.urandom(5 * 1024 * 1024 + 123)
    with client(hostile_registry.host) as reg:
        sent: list[int] = []
        outcome = reg.upload_blob(
            "app/big",
            digest(data),
            len(data),
            lambda: io.BytesIO(data),
            monolithic_limit=1 << 20,
            chunk_size=2 << 20,
            progress=sent.append,
        )
    assert outcome == "uploaded"
    patches = hostile_registry.matching("PATCH", r"/v2/app/big/blobs/uploads/.*")
    assert [p.header("Content-Range") for p in patches] == [
        "0-2097151",
        "2097152-4194303",
        f"4194304-{len(data) - 1}",
    ]
    assert sum(len(p.body or b"") for p in patches) == len(data)
    (put,) = hostile_registry.matching("PUT", r"/v2/app/big/blobs/uploads/.*")
    assert put.query["digest"] == [digest(data)] and not put.body
    assert sent[-1] == len(data) and sent == sorted(sent)
    assert registry.request("GET", f"/v2/app/big/blobs/{digest(data)}").body == data


def test_cross_repository_mount_instead_of_upload(
    registry: RegistryServer, hostile_registry: HostileRegistry
) -> None:
    hostile_registry.forward_to(registry)
    data = os.urandom(200_000)
    with client(hostile_registry.host) as reg:
        reg.upload_blob("team/base", digest(data), len(data), data)
        before = len(hostile_registry.requests)
        outcome = reg.upload_blob(
            "team/app", digest(data), len(data), data, mount_from=["team/base"]
        )
        asked = hostile_registry.requests[before:]
        # A source that lacks the blob: the registry opens an upload instead, which is used.
        other = os.urandom(1000)
        fallback = reg.upload_blob(
            "team/app", digest(other), len(other), other, mount_from=["team/nothing"]
        )
    assert outcome == "mounted"
    assert [(r.method, r.path) for r in asked] == [
        ("HEAD", f"/v2/team/app/blobs/{digest(data)}"),
        ("POST", "/v2/team/app/blobs/uploads/"),
    ]
    assert asked[1].query == {"mount": [digest(data)], "from": ["team/base"]}
    assert fallback == "uploaded"
    assert hostile_registry.count("POST", r"/v2/team/app/blobs/uploads/") == 2
    assert registry.request("HEAD", f"/v2/team/app/blobs/{digest(data)}").status == 200
    assert registry.request("HEAD", f"/v2/team/app/blobs/{digest(other)}").status == 200


# --- basic authentication -----------------------------------------------------------------------


def test_basic_auth_without_credentials_names_the_login_command(
    registry_basic: RegistryServer,
) -> None:
    with client(registry_basic.host) as reg, pytest.raises(AuthError) as info:
        reg.get_manifest("app/one", "v1")
    assert str(info.value) == (
        f"registry {registry_basic.host} needs credentials for pull access to app/one and none "
        f"are stored: run `pytest-isolate login {registry_basic.host}`"
    )


def test_ping_learns_the_challenge_without_needing_credentials(
    registry_basic: RegistryServer,
) -> None:
    with client(registry_basic.host) as reg:
        reg.ping()  # a registry that wants a login is still a registry
        with pytest.raises(AuthError, match="none are stored"):
            reg.ping(authenticate=True)


def test_basic_auth_with_good_and_wrong_credentials(registry_basic: RegistryServer) -> None:
    good = login_as(registry_basic.username, registry_basic.password)
    with client(registry_basic.host, good) as reg:
        reg.ping(authenticate=True)
        pushed, _ = push_image(reg, "app/one", "v1", b"basic layer")
        assert reg.get_manifest("app/one", "v1").digest == pushed
    wrong = login_as(registry_basic.username, "not-the-password")
    with client(registry_basic.host, wrong) as reg, pytest.raises(AuthError) as info:
        reg.ping(authenticate=True)
    assert f"registry {registry_basic.host} refused access to basicuser" in str(info.value)
    assert f"pytest-isolate login {registry_basic.host}" in str(info.value)


def test_basic_auth_credentials_come_from_the_login_file_or_dockers_config(
    registry_basic: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert registry_basic.username is not None and registry_basic.password is not None
    monkeypatch.setenv("PYTEST_ISOLATE_AUTH", str(tmp_path / "auth.json"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    (tmp_path / "docker").mkdir()
    user, password = registry_basic.username, registry_basic.password
    # docker's config.json only (as `docker login` writes it):
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    (tmp_path / "docker" / "config.json").write_text(
        json.dumps({"auths": {f"http://{registry_basic.host}": {"auth": pair}}})
    )
    with Registry(registry_basic.host, http=HttpClient(retry=FAST_RETRY)) as reg:
        pushed, _ = push_image(reg, "app/one", "v1", b"from docker config")
    # Our login file comes first: a wrong password there is what gets used (and refused).
    credentials.store(registry_basic.host, credentials.Credentials(user, "stale"))
    with (
        Registry(registry_basic.host, http=HttpClient(retry=FAST_RETRY)) as reg,
        pytest.raises(AuthError, match="refused pull access to app/one to basicuser"),
    ):
        reg.get_manifest("app/one", "v1")
    credentials.store(registry_basic.host, credentials.Credentials(user, password))
    with Registry(registry_basic.host, http=HttpClient(retry=FAST_RETRY)) as reg:
        assert reg.get_manifest("app/one", "v1").digest == pushed


# --- token authentication -----------------------------------------------------------------------


def test_token_auth_issues_one_token_per_scope_and_reuses_it(
    registry_token: RegistryServer,
) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    creds = login_as(registry_token.username, registry_token.password)
    with client(registry_token.host, creds) as reg:
        pushed, _ = push_image(reg, "app/one", "v1", b"token layer")
        after_push = issuer.tokens_issued
        for _ in range(3):
            assert reg.get_manifest("app/one", "v1").digest == pushed
        reg.blob_exists("app/one", pushed)
    assert after_push == 1  # one pull+push token for every request of the push
    assert issuer.tokens_issued == 2  # and one pull token for the reads
    scopes = [r.scopes for r in issuer.requests]
    assert scopes == [("repository:app/one:pull,push",), ("repository:app/one:pull",)]
    assert {r.account for r in issuer.requests} == {"tokenuser"}


def test_token_is_fetched_again_after_it_expires(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    issuer.expiry = 1  # expires_in: 1, and the registry refuses it after a second
    creds = login_as(registry_token.username, registry_token.password)
    with client(registry_token.host, creds) as reg:
        pushed, _ = push_image(reg, "app/one", "v1", b"short-lived")
        assert reg.get_manifest("app/one", "v1").digest == pushed
        counted = issuer.tokens_issued
        time.sleep(1.05)
        assert reg.get_manifest("app/one", "v1").digest == pushed
    assert issuer.tokens_issued == counted + 1
    assert all(r.status == 200 for r in issuer.requests)


def test_token_auth_refusals(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    with client(registry_token.host) as reg, pytest.raises(AuthError) as anonymous:
        reg.get_manifest("app/one", "v1")
    wrong = login_as("tokenuser", "wrong")
    with client(registry_token.host, wrong) as reg, pytest.raises(AuthError) as refused:
        reg.get_manifest("app/one", "v1")
    assert f"run `pytest-isolate login {registry_token.host}`" in str(anonymous.value)
    assert "needs credentials for pull access to app/one" in str(anonymous.value)
    assert "token service refused the credentials of tokenuser" in str(refused.value)
    assert "incorrect username or password" in str(refused.value)


def test_identity_token_is_exchanged_by_oauth2(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    # What `docker login` stores for an OAuth2 token service: a refresh token.
    form = urllib.parse.urlencode(
        {
            "grant_type": "password",
            "username": "tokenuser",
            "password": "token-secret",
            "service": issuer.service,
            "client_id": "test",
            "access_type": "offline",
        }
    ).encode()
    import http.client

    conn = http.client.HTTPConnection(issuer.host, timeout=5)
    conn.request("POST", "/token", form, {"Content-Type": "application/x-www-form-urlencoded"})
    refresh = json.loads(conn.getresponse().read())["refresh_token"]
    conn.close()
    identity = Login("", "", identity_token=refresh)
    with client(registry_token.host, lambda _n: identity) as reg:
        pushed, _ = push_image(reg, "app/one", "v1", b"oauth layer")
        assert reg.get_manifest("app/one", "v1").digest == pushed
    oauth = [r for r in issuer.requests if r.method == "POST"][1:]
    assert oauth and all(r.account == "tokenuser" and r.status == 200 for r in oauth)
    assert not [r for r in issuer.requests if r.method == "GET"]


def test_a_mount_refused_for_lack_of_rights_falls_back_to_an_upload(
    registry_token: RegistryServer,
) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    creds = login_as(registry_token.username, registry_token.password)
    data = os.urandom(10_000)
    with client(registry_token.host, creds) as reg:
        reg.upload_blob("secret/base", digest(data), len(data), data)
    grant = issuer.grant

    def no_secrets(user: str | None, scope: str) -> dict[str, object] | None:
        given = grant(user, scope)
        if given is not None and str(given["name"]).startswith("secret/"):
            given["actions"] = []
        return given

    issuer.grant = no_secrets  # type: ignore[method-assign]
    with client(registry_token.host, creds) as reg:
        outcome = reg.upload_blob(
            "team/app", digest(data), len(data), data, mount_from=["secret/base"]
        )
    assert outcome == "uploaded"
    assert registry_token.request("HEAD", f"/v2/team/app/blobs/{digest(data)}").status == 200
