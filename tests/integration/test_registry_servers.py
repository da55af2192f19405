"""The registry servers of tests/registry_fixtures.py answer as configured (real HTTP, loopback)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import math
import os
import time
from typing import Any

import pytest

from tests.registry_fixtures import (
    HostileRegistry,
    RegistryServer,
    StartRegistry,
    blob,
    challenge,
    endless,
    json_reply,
    nth,
    parse_challenge,
    respond,
    sequence,
    truncated,
)


def get(
    host: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    name, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(name, int(port), timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_anonymous_registry_answers(registry: RegistryServer) -> None:
    status, headers, _ = get(registry.host, "/v2/")
    assert status == 200
    assert headers["docker-distribution-api-version"] == "registry/2.0"
    assert registry.url == f"http://{registry.host}"
    assert registry.storage_dir.is_dir()
    assert registry.username is None


def test_anonymous_registry_takes_a_monolithic_blob_upload(registry: RegistryServer) -> None:
    data = b"hello registry"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = registry.request("POST", "/v2/t/blobs/uploads/")
    assert started.status == 202
    location = started.headers["location"]
    sep = "&" if "?" in location else "?"
    done = registry.request(
        "PUT",
        f"{location}{sep}digest={digest}",
        body=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status == 201, done.body
    assert registry.blob_path(digest).read_bytes() == data


def test_registry_takes_a_chunked_upload_and_mounts_across_repositories(
    registry: RegistryServer,
) -> None:
    data = b"first chunk|second chunk"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = registry.request("POST", "/v2/a/blobs/uploads/").headers["location"]
    for start, part in ((0, data[:12]), (12, data[12:])):
        patched = registry.request(
            "PATCH",
            location,
            body=part,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(part) - 1}",
            },
        )
        assert patched.status == 202, patched.body
        assert patched.headers["range"] == f"0-{start + len(part) - 1}"
        location = patched.headers["location"]
    sep = "&" if "?" in location else "?"
    assert registry.request("PUT", f"{location}{sep}digest={digest}").status == 201
    mounted = registry.request("POST", f"/v2/b/blobs/uploads/?mount={digest}&from=a")
    assert mounted.status == 201
    assert mounted.headers["docker-content-digest"] == digest
    assert registry.request("GET", f"/v2/b/blobs/{digest}").body == data


def test_basic_registry_challenges_then_accepts(registry_basic: RegistryServer) -> None:
    status, headers, _ = get(registry_basic.host, "/v2/")
    assert status == 401
    assert headers["www-authenticate"].startswith("Basic ")
    assert registry_basic.username and registry_basic.password
    ok, _, _ = get(
        registry_basic.host, "/v2/", basic(registry_basic.username, registry_basic.password)
    )
    assert ok == 200
    wrong, _, _ = get(registry_basic.host, "/v2/", basic(registry_basic.username, "nope"))
    assert wrong == 401


def _token(
    registry: RegistryServer, scope: str, creds: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    issuer = registry.issuer
    assert issuer is not None
    status, _, body = get(issuer.host, f"/token?service={issuer.service}&scope={scope}", creds)
    return status, json.loads(body) if status == 200 else {}


def test_token_registry_challenge_names_the_issuer(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    status, headers, _ = get(registry_token.host, "/v2/t/tags/list")
    assert status == 401
    challenge = headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    params = parse_challenge(challenge)
    assert params["realm"] == issuer.url
    assert params["service"] == issuer.service
    assert params["scope"] == "repository:t:pull"


def test_token_from_the_issuer_opens_the_registry(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None and registry_token.username and registry_token.password
    creds = basic(registry_token.username, registry_token.password)
    status, answer = _token(registry_token, "repository:t:pull,push", creds)
    assert status == 200
    assert answer["expires_in"] == issuer.expiry
    assert issuer.tokens_issued == 1
    assert issuer.requests[0].account == registry_token.username
    assert issuer.requests[0].granted[0]["actions"] == ["pull", "push"]
    bearer = {"Authorization": "Bearer " + answer["token"]}
    assert get(registry_token.host, "/v2/", bearer)[0] == 200
    upload, _, _ = get(registry_token.host, "/v2/t/blobs/uploads/", bearer, method="POST")
    assert upload == 202


def test_token_issuer_refuses_a_wrong_password(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    status, _ = _token(registry_token, "repository:t:pull", basic("tokenuser", "wrong"))
    assert status == 401
    assert issuer.tokens_issued == 0
    assert issuer.requests[-1].status == 401


def test_anonymous_token_gets_pull_only_when_allowed(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    _, denied = _token(registry_token, "repository:t:pull,push", {})
    bearer = {"Authorization": "Bearer " + denied["token"]}
    assert get(registry_token.host, "/v2/t/tags/list", bearer)[0] == 401
    issuer.anonymous_pull = True
    _, allowed = _token(registry_token, "repository:t:pull,push", {})
    assert issuer.requests[-1].granted[0]["actions"] == ["pull"]
    bearer = {"Authorization": "Bearer " + allowed["token"]}
    assert get(registry_token.host, "/v2/t/tags/list", bearer)[0] == 404  # allowed, no such repo
    push, _, _ = get(registry_token.host, "/v2/t/blobs/uploads/", bearer, method="POST")
    assert push == 401
    assert issuer.tokens_issued == 2


def test_token_refresh_through_the_oauth2_form(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    form = "grant_type=password&username=tokenuser&password=token-secret&service=x&access_type=offline&scope=repository:t:pull"
    name, port = issuer.host.split(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=5)
    conn.request(
        "POST", "/token", body=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    first = json.loads(conn.getresponse().read())
    conn.request(
        "POST",
        "/token",
        body=f"grant_type=refresh_token&refresh_token={first['refresh_token']}&scope=repository:t:push",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    resp = conn.getresponse()
    second = json.loads(resp.read())
    conn.close()
    assert resp.status == 200 and second["access_token"]
    assert [r.account for r in issuer.requests] == ["tokenuser", "tokenuser"]
    assert issuer.tokens_issued == 2


def test_token_expiry_is_enforced_by_the_registry(registry_token: RegistryServer) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    issuer.expiry = 1
    issued = time.time()
    token = issuer.mint(["repository:t:pull"])
    bearer = {"Authorization": "Bearer " + token}
    assert get(registry_token.host, "/v2/", bearer)[0] == 200
    time.sleep(math.ceil(issued) + issuer.expiry + 0.05 - time.time())  # exp + 60 s leeway
    assert get(registry_token.host, "/v2/", bearer)[0] == 401
    assert issuer.tokens_issued == 0  # mint is test-side, not counted


def test_two_registries_in_one_test(start_registry: StartRegistry) -> None:
    a, b = start_registry(), start_registry()
    assert a.host != b.host and a.storage_dir != b.storage_dir
    assert get(a.host, "/v2/")[0] == get(b.host, "/v2/")[0] == 200


def test_fixtures_leave_nothing_behind(pytester: pytest.Pytester) -> None:
    """An inner session uses every server; afterwards no process, port or directory is left."""
    record = pytester.path / "seen.json"
    pytester.makepyfile(
        f"""
        import json, os

        def test_use(registry, registry_basic, registry_token, hostile_registry):
            servers = [registry, registry_basic, registry_token]
            json.dump({{
                "pids": [s.process.pid for s in servers],
                "hosts": [s.host for s in servers]
                    + [registry_token.issuer.host, hostile_registry.host],
                "dirs": [str(s.storage_dir) for s in servers],
            }}, open({str(record)!r}, "w"))
        """
    )
    result = pytester.runpytest_inprocess("-p", "tests.registry_fixtures", "-q")
    result.assert_outcomes(passed=1)
    seen = json.loads(record.read_text())
    for pid in seen["pids"]:
        assert not os.path.exists(f"/proc/{pid}"), f"docker-registry {pid} still running"
    for host in seen["hosts"]:
        with pytest.raises(ConnectionRefusedError):
            get(host, "/v2/")
    for d in seen["dirs"]:
        assert not os.path.exists(os.path.dirname(d))


def test_hostile_routes_answer_and_record(hostile_registry: HostileRegistry) -> None:
    hostile_registry.route("GET", r"/v2/x/manifests/(.*)", json_reply({"ok": True}))
    route = hostile_registry.route("GET", r"/v2/x/manifests/v1", respond(418))  # last wins
    assert get(hostile_registry.host, "/v2/")[0] == 200
    assert get(hostile_registry.host, "/v2/x/manifests/v1", {"X-Probe": "1"})[0] == 418
    status, headers, body = get(hostile_registry.host, "/v2/x/manifests/v2")
    assert (status, headers["content-type"], json.loads(body)) == (
        200,
        "application/json",
        {"ok": True},
    )
    assert get(hostile_registry.host, "/v2/x/blobs/sha256:00")[0] == 404
    assert route.hits == 1
    assert [(r.method, r.path) for r in hostile_registry.requests] == [
        ("GET", "/v2/"),
        ("GET", "/v2/x/manifests/v1"),
        ("GET", "/v2/x/manifests/v2"),
        ("GET", "/v2/x/blobs/sha256:00"),
    ]
    assert hostile_registry.requests[1].header("x-probe") == "1"
    assert hostile_registry.count("GET", r"/v2/x/manifests/.*") == 2


def test_hostile_blob_lies_and_serves_ranges(hostile_registry: HostileRegistry) -> None:
    data = b"0123456789"
    lie = "sha256:" + "0" * 64
    hostile_registry.route("GET", rf"/v2/x/blobs/{lie}", blob(data, digest=lie))
    status, headers, body = get(hostile_registry.host, f"/v2/x/blobs/{lie}")
    assert (status, headers["docker-content-digest"], body) == (200, lie, data)
    status, headers, body = get(hostile_registry.host, f"/v2/x/blobs/{lie}", {"Range": "bytes=4-"})
    assert (status, headers["content-range"], body) == (206, "bytes 4-9/10", b"456789")


def test_hostile_truncated_body_closes_early(hostile_registry: HostileRegistry) -> None:
    hostile_registry.route("GET", r"/v2/x/blobs/(.*)", truncated(b"a" * 1000, send=100))
    name, port = hostile_registry.host.split(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=5)
    conn.request("GET", "/v2/x/blobs/sha256:1")
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == "1000"
    with pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    assert len(err.value.partial) == 100
    conn.close()


def test_hostile_endless_body_streams_until_hang_up(hostile_registry: HostileRegistry) -> None:
    hostile_registry.route("GET", r"/v2/x/blobs/(.*)", endless())
    name, port = hostile_registry.host.split(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=5)
    conn.request("GET", "/v2/x/blobs/sha256:1")
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") is None
    got = 0
    while got < 5 * 2**20:
        got += len(resp.read(2**16))
    conn.close()  # the server notices and its handler ends (teardown joins it)


def test_hostile_sequence_and_nth(hostile_registry: HostileRegistry) -> None:
    hostile_registry.route("GET", "/v2/a", sequence(respond(503), respond(503), respond(200)))
    hostile_registry.route("GET", "/v2/b", nth(2, respond(500), respond(204)))
    assert [get(hostile_registry.host, "/v2/a")[0] for _ in range(4)] == [503, 503, 200, 200]
    assert [get(hostile_registry.host, "/v2/b")[0] for _ in range(3)] == [204, 500, 204]


def test_hostile_challenge(hostile_registry: HostileRegistry) -> None:
    value = 'Bearer realm="http://127.0.0.1:1/token",service="s",scope="repository:x:pull"'
    hostile_registry.route("*", r"/v2/.*", challenge(value))
    status, headers, body = get(hostile_registry.host, "/v2/x/tags/list", method="HEAD")
    assert (status, headers["www-authenticate"], body) == (401, value, b"")
    assert parse_challenge(value)["scope"] == "repository:x:pull"


def test_hostile_forwards_a_chunked_upload_and_fails_the_nth_patch(
    hostile_registry: HostileRegistry, registry: RegistryServer
) -> None:
    hostile_registry.forward_to(registry)
    hostile_registry.route("PATCH", r"/v2/x/blobs/uploads/.*", nth(2, respond(500)))
    started = hostile_registry_request(hostile_registry, "POST", "/v2/x/blobs/uploads/")
    assert started[0] == 202
    location = started[1]["location"]
    assert location.startswith(hostile_registry.url)  # upstream built it from our Host header
    first = hostile_registry_request(
        hostile_registry, "PATCH", location, b"abc", {"Content-Range": "0-2"}
    )
    assert first[0] == 202
    second = hostile_registry_request(
        hostile_registry, "PATCH", first[1]["location"], b"def", {"Content-Range": "3-5"}
    )
    assert second[0] == 500
    patches = hostile_registry.matching("PATCH", r"/v2/x/blobs/uploads/.*")
    assert [p.body for p in patches] == [b"abc", b"def"]


def hostile_registry_request(
    hostile: HostileRegistry,
    method: str,
    url: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    target = url.removeprefix(hostile.url)
    name, port = hostile.host.split(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=5)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_hostile_server_stops_while_a_client_still_reads() -> None:
    """close() ends an endless answer and an idle keep-alive connection, and joins the threads."""
    hostile = HostileRegistry()
    hostile.route("GET", r"/v2/x/blobs/(.*)", endless())
    name, port = hostile.host.split(":")
    streaming = http.client.HTTPConnection(name, int(port), timeout=5)
    streaming.request("GET", "/v2/x/blobs/sha256:1")
    resp = streaming.getresponse()
    resp.read(2**16)
    idle = http.client.HTTPConnection(name, int(port), timeout=5)
    idle.request("GET", "/v2/")
    idle.getresponse().read()  # keep-alive: the server thread waits for the next request
    started = time.monotonic()
    hostile.close()
    assert time.monotonic() - started < 1.0
    streaming.close()
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        get(hostile.host, "/v2/")
