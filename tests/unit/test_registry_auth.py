"""Registry authentication: challenge parsing, token requests and answers, and the token cache
(driven through a scripted transport and a fake clock)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest

from runtime.errors import AuthError, RegistryError
from runtime.registry.auth import (
    DEFAULT_TOKEN_LIFETIME,
    Authenticator,
    Challenge,
    basic_authorization,
    parse_challenges,
    parse_token_response,
    plan_token_request,
    pull_scope,
    push_scope,
)
from runtime.registry.http import HttpClient, Response


@dataclass(frozen=True)
class Login:
    username: str
    password: str = ""
    identity_token: str | None = None


# --- WWW-Authenticate ---------------------------------------------------------------------------


def test_bearer_challenge_with_realm_service_and_scope() -> None:
    (c,) = parse_challenges(
        [
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/busybox:pull"'
        ]
    )
    assert c == Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/busybox:pull",
        },
    )


def test_quoted_strings_keep_commas_and_unescape_backslashes() -> None:
    (c,) = parse_challenges(
        [r'bearer Realm = "http://h/t?a=1,b=2", scope="repository:a:pull,push", x="say \"hi\"\\"']
    )
    assert c.scheme == "bearer"
    assert c.params == {
        "realm": "http://h/t?a=1,b=2",
        "scope": "repository:a:pull,push",
        "x": 'say "hi"\\',
    }


def test_several_challenges_in_one_header_and_in_several_headers() -> None:
    found = parse_challenges(
        [
            'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"',
            "Negotiate abc123==, Basic realm=plain",
        ]
    )
    assert [(c.scheme, dict(c.params)) for c in found] == [
        ("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
        ("basic", {"realm": "simple"}),
        ("negotiate", {}),
        ("basic", {"realm": "plain"}),
    ]


def test_garbage_is_skipped_not_fatal() -> None:
    assert parse_challenges([""]) == ()
    assert parse_challenges([", ,"]) == ()
    found = parse_challenges(['"oops", Basic realm="r"'])
    assert [c.scheme for c in found] == ["basic"]
    (c,) = parse_challenges(['Bearer realm="unterminated'])
    assert c.param("realm") == "unterminated"


# --- token requests and answers -----------------------------------------------------------------

BEARER = Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg"})


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_anonymous_token_request_asks_for_every_scope() -> None:
    plan = plan_token_request(BEARER, [pull_scope("a/b"), push_scope("c")], None)
    assert plan.method == "GET" and plan.body is None and dict(plan.headers) == {}
    assert plan.url.startswith("https://auth.example/token?")
    assert _query(plan.url) == {
        "service": ["reg"],
        "scope": ["repository:a/b:pull", "repository:c:pull,push"],
    }


def test_token_request_with_a_password_sends_basic_credentials_and_the_account() -> None:
    challenge = Challenge("bearer", {"realm": "https://auth.example/token?x=1"})
    plan = plan_token_request(challenge, [pull_scope("a")], Login("ann", "pw:with:colons"))
    assert plan.url.startswith("https://auth.example/token?x=1&")
    assert _query(plan.url) == {"x": ["1"], "scope": ["repository:a:pull"], "account": ["ann"]}
    auth = plan.headers["Authorization"]
    assert base64.b64decode(auth.removeprefix("Basic ")) == b"ann:pw:with:colons"


def test_identity_token_is_exchanged_with_an_oauth2_refresh_grant() -> None:
    plan = plan_token_request(BEARER, [pull_scope("a"), pull_scope("b")], Login("ann", "", "idt"))
    assert plan.method == "POST" and plan.url == "https://auth.example/token"
    assert plan.headers == {"Content-Type": "application/x-www-form-urlencoded"}
    assert parse_qs((plan.body or b"").decode()) == {
        "grant_type": ["refresh_token"],
        "refresh_token": ["idt"],
        "client_id": ["pytest-isolate"],
        "service": ["reg"],
        "scope": ["repository:a:pull repository:b:pull"],
    }


def test_a_challenge_without_realm_is_an_auth_error() -> None:
    with pytest.raises(AuthError, match="no realm"):
        plan_token_request(Challenge("bearer", {"service": "x"}), [], None)


def test_token_answers_token_or_access_token_and_lifetime() -> None:
    assert parse_token_response(b'{"token": "t", "expires_in": 300}', 10.0).expires_at == 310.0
    token = parse_token_response(b'{"access_token": "a"}', 10.0)
    assert (token.value, token.expires_at) == ("a", 10.0 + DEFAULT_TOKEN_LIFETIME)
    # A nonsense lifetime falls back to the default instead of "never expires".
    assert parse_token_response(b'{"token": "t", "expires_in": -1}', 0).expires_at == 60.0
    assert parse_token_response(b'{"token": "t", "expires_in": true}', 0).expires_at == 60.0
    for bad, why in [
        (b"<html>", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"token": ""}', "no 'token'"),
        (b'{"token": 5}', "no 'token'"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_token_response(bad, 0)


# --- the flow, through a scripted transport -----------------------------------------------------


@dataclass
class FakeRaw:
    """What :class:`Response` reads of an ``http.client.HTTPResponse``."""

    status: int
    body: bytes
    headers: Message
    reason: str = "X"
    length: int | None = None
    will_close: bool = True
    _done: bool = False

    def read(self, size: int | None = None) -> bytes:
        data, self.body = (self.body, b"") if size is None else (self.body[:size], self.body[size:])
        return data

    def isclosed(self) -> bool:
        return not self.body

    def close(self) -> None:
        self.body = b""


class FakeConn:
    def close(self) -> None:
        pass


@dataclass
class Script:
    """A transport that answers from a list and records what was asked."""

    answers: list[tuple[int, bytes, dict[str, str]]]
    asked: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def request(self, method: str, url: str, **kw: Any) -> Response:
        self.asked.append((method, url, dict(kw.get("headers") or {})))
        status, body, headers = self.answers.pop(0)
        msg = Message()
        for k, v in headers.items():
            msg[k] = v
        raw = FakeRaw(status, body, msg)
        return Response(cast(HttpClient, self), method, url, raw, FakeConn(), ("http", "h", None))  # type: ignore[arg-type]


CHALLENGE = {"WWW-Authenticate": 'Bearer realm="http://127.0.0.1:1/token",service="reg"'}


def _token(value: str, expires: int = 300) -> tuple[int, bytes, dict[str, str]]:
    return (200, json.dumps({"token": value, "expires_in": expires}).encode(), {})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _auth(script: Script, clock: Clock, login: Login | None = None) -> Authenticator:
    return Authenticator(
        "reg.example",
        cast(HttpClient, script),
        credentials=lambda name: login,
        clock=clock,
    )


def _challenge_401(script: Script) -> Response:
    script.answers.insert(0, (401, b"", CHALLENGE))
    return script.request("GET", "http://127.0.0.1:1/v2/a/manifests/x")


def test_tokens_are_cached_per_scope_set_and_refetched_after_expiry() -> None:
    script, clock = Script([]), Clock()
    auth = _auth(script, clock)
    assert auth.authorization([pull_scope("a")]) is None  # nothing asked yet: anonymous
    auth.challenged(_challenge_401(script), [pull_scope("a")], None)
    script.answers += [_token("t1", 30), _token("t2"), _token("t3")]
    assert auth.authorization([pull_scope("a")]) == "Bearer t1"
    assert auth.authorization([pull_scope("a"), pull_scope("a")]) == "Bearer t1"  # cached
    assert auth.authorization([pull_scope("b")]) == "Bearer t2"  # another scope set
    clock.now += 29.9
    assert auth.authorization([pull_scope("a")]) == "Bearer t1"
    clock.now += 0.1
    assert auth.authorization([pull_scope("a")]) == "Bearer t3"  # expired: fetched again
    assert auth.tokens_fetched == 3
    token_urls = [url for _, url, _ in script.asked if "/token" in url]
    assert [_query(u)["scope"] for u in token_urls] == [
        ["repository:a:pull"],
        ["repository:b:pull"],
        ["repository:a:pull"],
    ]


def test_a_refused_token_is_dropped_and_fetched_again() -> None:
    script, clock = Script([]), Clock()
    auth = _auth(script, clock)
    auth.challenged(_challenge_401(script), [pull_scope("a")], None)
    script.answers += [_token("t1"), _token("t2")]
    sent = auth.authorization([pull_scope("a")])
    assert sent == "Bearer t1"
    auth.challenged(_challenge_401(script), [pull_scope("a")], sent)
    assert auth.authorization([pull_scope("a")]) == "Bearer t2"
    # A 401 for a token we did not send (another thread renewed it meanwhile) keeps the new one.
    auth.challenged(_challenge_401(script), [pull_scope("a")], "Bearer t1")
    assert auth.authorization([pull_scope("a")]) == "Bearer t2"


def test_basic_challenge_uses_the_login_and_names_the_fix_when_there_is_none() -> None:
    basic = {"WWW-Authenticate": 'Basic realm="r"'}
    script, clock = Script([(401, b"", basic)]), Clock()
    auth = _auth(script, clock, Login("ann", "pw"))
    auth.challenged(script.request("GET", "http://h/v2/"), [push_scope("a")], None)
    sent = auth.authorization([push_scope("a")])
    assert sent == basic_authorization("ann", "pw")
    script.answers.append((401, b"", basic))
    with pytest.raises(AuthError, match=r"reg.example refused pull\+push access to a to ann"):
        auth.challenged(script.request("GET", "http://h/v2/"), [push_scope("a")], sent)

    script = Script([(401, b"", basic)])
    anonymous = _auth(script, clock)
    with pytest.raises(
        AuthError,
        match=r"registry reg.example needs credentials for pull access to a and none are "
        r"stored: run `pytest-isolate login reg.example`",
    ):
        anonymous.challenged(script.request("GET", "http://h/v2/"), [pull_scope("a")], None)


def test_token_service_refusals_are_auth_errors_naming_the_user() -> None:
    script, clock = Script([]), Clock()
    auth = _auth(script, clock, Login("ann", "bad"))
    auth.challenged(_challenge_401(script), [pull_scope("a")], None)
    script.answers.append((401, b'{"details": "wrong password"}', {}))
    with pytest.raises(AuthError, match=r"refused the credentials of ann.*wrong password"):
        auth.authorization([pull_scope("a")])
    script.answers.append((200, b"{}", {}))
    with pytest.raises(RegistryError, match="sent no usable token"):
        auth.authorization([pull_scope("a")])


def test_identity_token_falls_back_to_get_when_the_service_has_no_oauth() -> None:
    script, clock = Script([]), Clock()
    auth = _auth(script, clock, Login("ann", "pw", identity_token="idt"))
    auth.challenged(_challenge_401(script), [pull_scope("a")], None)
    script.answers += [(404, b"", {}), _token("t")]
    assert auth.authorization([pull_scope("a")]) == "Bearer t"
    methods = [(m, "Authorization" in h) for m, u, h in script.asked if "/token" in u]
    assert methods == [("POST", False), ("GET", True)]


def test_credentials_never_go_to_a_remote_plain_http_token_service() -> None:
    script, clock = Script([]), Clock()
    auth = _auth(script, clock, Login("ann", "pw"))
    script.answers.insert(0, (401, b"", {"WWW-Authenticate": 'Bearer realm="http://evil/t"'}))
    auth.challenged(script.request("GET", "http://h/v2/"), [], None)
    with pytest.raises(AuthError, match=r"'http://evil/t.*not HTTPS; refused"):
        auth.authorization([pull_scope("a")])


def test_a_401_without_a_usable_challenge_says_so() -> None:
    script, clock = Script([(401, b"", {"WWW-Authenticate": "Negotiate"})]), Clock()
    auth = _auth(script, clock)
    with pytest.raises(AuthError, match=r"no usable challenge \(schemes offered: negotiate\)"):
        auth.challenged(script.request("GET", "http://h/v2/"), [], None)
