"""The HTTP client's decisions (scheme, redirects, retry timing, error messages) and the
registry client's URLs: no sockets."""

from __future__ import annotations

import email.utils
import json

import pytest

from runtime.errors import RegistryError
from runtime.registry.client import Registry, api_host, digest_of, with_query
from runtime.registry.http import (
    RetryPolicy,
    error_detail,
    is_loopback,
    plan_redirect,
    retry_after,
    retry_delay,
    scheme_for,
    split_host,
)


@pytest.mark.parametrize(
    ("host", "insecure", "scheme"),
    [
        ("127.0.0.1:5000", (), "http"),
        ("127.3.4.5", (), "http"),
        ("localhost:5000", (), "http"),
        ("LOCALHOST", (), "http"),
        ("[::1]:5000", (), "http"),
        ("registry.example:5000", (), "https"),
        ("registry.example:5000", ("registry.example:5000",), "http"),
        ("registry.example:5000", ("registry.example",), "http"),
        ("registry.example:5000", ("other.example",), "https"),
        ("10.0.0.1:5000", (), "https"),
        ("registry-1.docker.io", (), "https"),
        ("localhost.example.com", (), "https"),
    ],
)
def test_plain_http_only_for_loopback_and_hosts_named_insecure(
    host: str, insecure: tuple[str, ...], scheme: str
) -> None:
    assert scheme_for(host, insecure) == scheme


def test_split_host_handles_ipv6_and_ports_and_names_a_bad_one() -> None:
    assert split_host("[::1]:5000") == ("::1", 5000)
    assert split_host("Example.com") == ("example.com", None)
    assert is_loopback("::1") and is_loopback("127.255.0.1") and not is_loopback("128.0.0.1")
    with pytest.raises(RegistryError, match="invalid registry host 'x:99999'"):
        split_host("x:99999")


def test_retry_delay_doubles_with_full_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, base=0.5, cap=3.0)
    assert [retry_delay(policy, n, None, lambda: 1.0) for n in range(5)] == [
        0.5,
        1.0,
        2.0,
        3.0,
        3.0,
    ]
    assert retry_delay(policy, 3, None, lambda: 0.25) == 0.75
    assert retry_delay(policy, 0, None, lambda: 0.0) == 0.0
    # Retry-After is a floor, never shortened by the jitter.
    assert retry_delay(policy, 0, 7.0, lambda: 1.0) == 7.0
    assert retry_delay(policy, 4, 1.0, lambda: 1.0) == 3.0


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after("3", now) == 3.0
    assert retry_after(" 0 ", now) == 0.0
    assert retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after("soon", now) is None
    assert retry_after("-5", now) is None
    assert retry_after(None, now) is None


def test_redirect_to_another_host_drops_credentials_and_keeps_the_method() -> None:
    headers = {"Authorization": "Bearer t", "Range": "bytes=10-"}
    step = plan_redirect(
        "GET", 307, "https://storage.example/blob?sig=1", "http://127.0.0.1:5000/v2/x", headers
    )
    assert (step.method, step.url) == ("GET", "https://storage.example/blob?sig=1")
    assert step.headers == {"Range": "bytes=10-"}
    assert step.keep_body


@pytest.mark.parametrize(
    ("target", "kept"),
    [
        ("/v2/other", True),  # relative: same origin
        ("http://127.0.0.1:5000/v2/y", True),
        ("http://127.0.0.1:5001/v2/y", False),  # another port
        ("https://127.0.0.1:5000/v2/y", False),  # another scheme
        ("http://localhost:5000/v2/y", False),  # another name for the same host
    ],
)
def test_credentials_follow_a_redirect_only_to_the_same_origin(target: str, kept: bool) -> None:
    step = plan_redirect(
        "HEAD", 302, target, "http://127.0.0.1:5000/v2/x", {"authorization": "Basic x"}
    )
    assert ("authorization" in step.headers) is kept
    assert step.method == "HEAD"


def test_see_other_and_post_redirects_become_get_without_body() -> None:
    headers = {"Content-Type": "application/octet-stream", "Content-Range": "0-9", "X": "1"}
    for status in (303, 302, 301):
        step = plan_redirect("POST", status, "/next", "http://h/v2/a", headers)
        assert (step.method, step.url, step.keep_body) == ("GET", "http://h/next", False)
        assert step.headers == {"X": "1"}
    step = plan_redirect("PUT", 308, "/next", "http://h/v2/a", headers)
    assert step.method == "PUT" and step.keep_body and step.headers == headers


def test_redirect_to_a_non_http_url_is_refused() -> None:
    with pytest.raises(RegistryError, match=r"redirect to unsupported URL 'file:///etc/passwd'"):
        plan_redirect("GET", 302, "file:///etc/passwd", "http://h/v2/", {})


def test_error_detail_quotes_the_registry_errors() -> None:
    body = json.dumps(
        {
            "errors": [
                {"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {}},
                {"code": "NAME_UNKNOWN", "message": "repository name not known to registry"},
            ]
        }
    ).encode()
    assert error_detail(body, "application/json") == (
        "MANIFEST_UNKNOWN: manifest unknown; NAME_UNKNOWN: repository name not known to registry"
    )
    assert error_detail(b'{"message": "slow down"}', "application/json") == "slow down"
    assert error_detail(b'{"details": "bad token"}', None) == "bad token"
    assert error_detail(b"<html>\n  Bad   gateway </html>", "text/html") == (
        "<html> Bad gateway </html>"
    )
    assert error_detail(b"\x00\x01binary", "application/octet-stream") == ""
    long = error_detail(b"x" * 1000, "text/plain")
    assert len(long) == 203 and long.endswith("...")


def test_docker_hub_is_reached_at_its_api_host_and_others_by_scheme_rule() -> None:
    hub = Registry("docker.io", credentials=lambda _n: None)
    assert (hub.name, hub.base) == ("docker.io", "https://registry-1.docker.io/v2/")
    assert api_host("ghcr.io") == "ghcr.io"
    local = Registry("localhost:5000", credentials=lambda _n: None)
    assert local.base == "http://localhost:5000/v2/"
    named = Registry("reg.lan:5000", insecure=("reg.lan",), credentials=lambda _n: None)
    assert named.base == "http://reg.lan:5000/v2/"


def test_upload_urls_keep_their_state_when_the_digest_is_added() -> None:
    url = with_query("http://h/v2/a/blobs/uploads/u1?_state=abc%3D%3D", digest="sha256:00")
    assert url == "http://h/v2/a/blobs/uploads/u1?_state=abc%3D%3D&digest=sha256%3A00"
    assert with_query("/v2/a/blobs/uploads/u1", digest="d") == "/v2/a/blobs/uploads/u1?digest=d"
    assert digest_of(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert digest_of(b"", "sha512").startswith("sha512:cf83e1357eefb8bd")
    with pytest.raises(RegistryError, match="unsupported digest algorithm 'md5'"):
        digest_of(b"", "md5")
