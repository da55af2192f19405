"""Real registry servers on 127.0.0.1 for the tests, and a hostile one the tests script.

A pytest plugin (listed in ``tests/conftest.py``). Every server is started by a function-scoped
fixture and stopped after the test, so each test gets empty storage, fresh counters and its own
port: starting Debian's ``docker-registry`` (distribution 2.8.2) takes about 0.05 s, cheaper
than the bookkeeping a shared server would need. The slow parts (an RSA key, a bcrypt
password file) are made once per session. A missing tool skips the test, naming the package.

Fixtures
--------
``registry`` -> :class:`RegistryServer`
    anonymous, plain HTTP. ``.host`` (``"127.0.0.1:PORT"``), ``.url`` (``"http://..."``),
    ``.storage_dir`` (distribution's root directory), ``.auth`` (``"none"``),
    ``.username``/``.password`` (``None``), ``.issuer`` (``None``), ``.ref(repo, tag)``,
    ``.blob_path(digest)`` (the stored file, to corrupt it), ``.request(method, path, ...)``
    (a test-side HTTP call that authenticates itself without touching the counters),
    ``.log_text()``.
``registry_basic`` -> :class:`RegistryServer`
    htpasswd (bcrypt) basic auth; ``.auth == "basic"``, ``.username``/``.password`` are the one
    known account (:data:`BASIC_USER`, :data:`BASIC_PASSWORD`).
``registry_token`` -> :class:`RegistryServer`
    bearer token auth; ``.auth == "token"``, ``.username``/``.password`` (:data:`TOKEN_USER`,
    :data:`TOKEN_PASSWORD`), ``.issuer`` is the :class:`TokenIssuer`: ``.url`` (the realm),
    ``.service``, ``.users`` (dict, editable), ``.anonymous_pull`` (bool, settable),
    ``.expiry`` (seconds a token is accepted by the registry, settable), ``.tokens_issued``,
    ``.requests`` (list of :class:`TokenRequest`), ``.mint(scopes, user)`` (a token made
    test-side, not counted).
``start_registry`` -> ``(auth="none" | "basic" | "token") -> RegistryServer``
    more servers in one test (two registries, cross-registry copies); each is stopped after it.
``hostile_registry`` -> :class:`HostileRegistry`
    a threaded ``http.server`` the test scripts::

        hostile.route("GET", r"/v2/x/blobs/(.*)", truncated(data))
        hostile.route("PATCH", r"/v2/.*/blobs/uploads/.*", nth(2, respond(500)))
        hostile.forward_to(registry)        # unmatched requests go to a real registry
        hostile.requests                    # [Recorded(method, path, query, headers, body)]

    Patterns are ``re.fullmatch``-ed against the path without the query; the route added last
    wins; ``method="*"`` matches any method. Unmatched requests are forwarded to the upstream
    if one is set, else ``GET /v2/`` answers 200 and everything else a distribution-style 404.
    Handlers (``Callable[[Request], None]``) come from :func:`respond`, :func:`json_reply`,
    :func:`blob` (also: wrong content for its digest, ``Range``), :func:`manifest`,
    :func:`truncated`, :func:`endless`, :func:`challenge`, :func:`slow`, :func:`sequence`,
    :func:`nth` and :data:`forward`; or write your own with :class:`Request`'s ``reply``,
    ``start``/``write``, ``hang_up`` and ``body()``.

Token expiry: distribution accepts a token up to 60 s after its ``exp`` claim (clock-skew
leeway), so the issuer writes ``exp = iat + expiry - 60``: the registry then really refuses the
token ``expiry`` seconds after it was issued, which is what a refresh test needs. ``expires_in``
in the issuer's answer is ``expiry``.
"""

from __future__ import annotations

import base64
import contextlib
import email.message
import hashlib
import http.client
import json
import math
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest

__all__ = [
    "BASIC_PASSWORD",
    "BASIC_USER",
    "TOKEN_PASSWORD",
    "TOKEN_USER",
    "HostileRegistry",
    "Recorded",
    "RegistryServer",
    "Reply",
    "Request",
    "Route",
    "TokenIssuer",
    "TokenRequest",
    "blob",
    "challenge",
    "endless",
    "forward",
    "json_reply",
    "manifest",
    "nth",
    "respond",
    "sequence",
    "slow",
    "truncated",
]

BASIC_USER = "basicuser"
BASIC_PASSWORD = "basic-secret"
TOKEN_USER = "tokenuser"
TOKEN_PASSWORD = "token-secret"
TOKEN_SERVICE = "pytest-isolate-registry"
TOKEN_ISSUER = "pytest-isolate-token-issuer"
DEFAULT_EXPIRY = 300
JWT_LEEWAY = 60
"""Seconds distribution (registry/auth/token) still accepts a token after its ``exp``."""

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
Auth = Literal["none", "basic", "token"]

_TOOLS = {
    "docker-registry": "docker-registry",
    "htpasswd": "apache2-utils",
    "openssl": "openssl",
}


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package {_TOOLS[tool]})")
    return path


def _free_port() -> int:
    # The registry cannot take a listening socket from us, so the port is free when chosen and
    # taken a moment later; a lost race shows as the registry exiting, and we retry.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# Small HTTP servers on 127.0.0.1 (the token issuer and the hostile registry)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a registry client expects
    server: _LoopbackServer

    def log_message(self, format: str, *args: Any) -> None:  # the tests read .requests instead
        pass

    def _dispatch(self) -> None:
        request = Request(self)
        try:
            self.server.owner.handle(request)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if not request.hung_up and not self.close_connection:
            request.drain()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch


class _LoopbackServer(ThreadingHTTPServer):
    """A threaded server whose :meth:`stop` ends every connection and joins every thread."""

    daemon_threads = False
    block_on_close = True  # server_close joins the handler threads

    def __init__(self, owner: _Owner) -> None:
        self.owner = owner
        self.stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        with self._lock:
            still_open = list(self._open)
        for sock in still_open:  # wake handlers blocked reading a keep-alive connection
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self._thread.join()


class _Owner:
    def handle(self, request: Request) -> None:
        raise NotImplementedError


class Request:
    """One request as a handler sees it, and the means to answer it (or misbehave)."""

    def __init__(self, handler: _Handler) -> None:
        self._h = handler
        url = urllib.parse.urlsplit(handler.path)
        self.method: str = handler.command
        self.target: str = handler.path
        self.path: str = url.path
        self.query: dict[str, list[str]] = urllib.parse.parse_qs(url.query)
        self.headers: email.message.Message = handler.headers
        self.match: re.Match[str] | None = None
        self.hung_up = False
        self.record: Recorded | None = None
        self._body: bytes | None = None

    @property
    def stopping(self) -> bool:
        """The server is shutting down: endless handlers stop."""
        return self._h.server.stopping.is_set()

    @property
    def server_host(self) -> str:
        return self._h.server.host

    def body(self) -> bytes:
        """The request body (Content-Length or chunked), read once."""
        if self._body is None:
            rfile = self._h.rfile
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                parts = []
                while True:
                    size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    parts.append(rfile.read(size))
                    rfile.readline()
                self._body = b"".join(parts)
            else:
                self._body = rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.record is not None:
                self.record.body = self._body
        return self._body

    def drain(self) -> None:
        self.body()

    def start(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Send the status line and headers; the body follows with :meth:`write`.

        The request body is read first, as a server does, so the record of the request is
        complete by the time the client sees an answer.
        """
        self.body()
        self._h.send_response(status)
        for name, value in (headers or {}).items():
            self._h.send_header(name, value)
        self._h.end_headers()

    def write(self, data: bytes) -> None:
        if self.method != "HEAD":
            self._h.wfile.write(data)
            self._h.wfile.flush()

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """A complete answer with Content-Length (no body sent for HEAD)."""
        all_headers = {"Content-Length": str(len(body))}
        all_headers.update(headers or {})
        self.start(status, all_headers)
        self.write(body)

    def hang_up(self) -> None:
        """Close the connection now, whatever was promised."""
        self.hung_up = True
        self._h.close_connection = True
        self._h.wfile.flush()
        with contextlib.suppress(OSError):
            self._h.connection.shutdown(socket.SHUT_RDWR)

    def forward(self) -> None:
        """Pass the request to the hostile registry's upstream and its answer back."""
        owner = self._h.server.owner
        upstream = getattr(owner, "upstream", None)
        if upstream is None:
            self.reply(502, b"no upstream registry set (hostile.forward_to)\n")
            return
        body = self.body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.method in ("PUT", "POST", "PATCH"):
            headers["Content-Length"] = str(len(body))
        host, port = upstream.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(self.method, self.target, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
            if self.method != "HEAD":
                out["Content-Length"] = str(len(data))
            self.start(resp.status, out)
            self.write(data)
        finally:
            conn.close()


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
)

Handler = Callable[[Request], None]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


def respond(
    status: int,
    body: bytes | str = b"",
    headers: dict[str, str] | None = None,
    *,
    content_type: str | None = None,
) -> Handler:
    """A fixed answer, e.g. ``respond(503)`` or ``respond(404, b"{...}")``."""
    data = body.encode() if isinstance(body, str) else body
    extra = dict(headers or {})
    if content_type:
        extra["Content-Type"] = content_type

    def handler(req: Request) -> None:
        req.reply(status, data, extra)

    return handler


def json_reply(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    return respond(status, json.dumps(obj).encode(), headers, content_type="application/json")


def blob(
    data: bytes,
    *,
    digest: str | None = None,
    content_type: str = "application/octet-stream",
    headers: dict[str, str] | None = None,
) -> Handler:
    """Serve ``data`` as a blob, honouring ``Range: bytes=N-``.

    ``Docker-Content-Digest`` is ``digest`` if given (a lie, to test that the client checks the
    bytes), else the true digest; serving it at another digest's path is "wrong content".
    """
    claimed = digest or _digest(data)

    def handler(req: Request) -> None:
        out = {"Content-Type": content_type, "Docker-Content-Digest": claimed}
        out.update(headers or {})
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", ""))
        if m and int(m.group(1)) < len(data):
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else len(data) - 1
            part = data[first : last + 1]
            out["Content-Range"] = f"bytes {first}-{first + len(part) - 1}/{len(data)}"
            req.reply(206, part, out)
        else:
            req.reply(200, data, out)

    return handler


def manifest(data: bytes, media_type: str, *, digest: str | None = None) -> Handler:
    """Serve a manifest with its media type (and a lying digest header if ``digest`` is set)."""
    return blob(data, digest=digest, content_type=media_type)


def truncated(
    data: bytes,
    *,
    send: int | None = None,
    content_type: str = "application/octet-stream",
    digest: str | None = None,
) -> Handler:
    """Promise ``len(data)`` bytes, send ``send`` of them (default half), then hang up."""
    cut = len(data) // 2 if send is None else send

    def handler(req: Request) -> None:
        req.start(
            200,
            {
                "Content-Length": str(len(data)),
                "Content-Type": content_type,
                "Docker-Content-Digest": digest or _digest(data),
            },
        )
        req.write(data[:cut])
        req.hang_up()

    return handler


def endless(
    *,
    content_length: int | None = None,
    chunk: bytes = b"\0" * 65536,
    content_type: str = "application/octet-stream",
) -> Handler:
    """Stream ``chunk`` forever, until the client hangs up or the server stops.

    Without ``content_length`` the body is delimited by the connection's close (no end ever
    comes); with it, the header promises that many bytes and more are sent anyway.
    """

    def handler(req: Request) -> None:
        headers = {"Content-Type": content_type}
        if content_length is None:
            headers["Connection"] = "close"
            req._h.close_connection = True
        else:
            headers["Content-Length"] = str(content_length)
        req.start(200, headers)
        if req.method == "HEAD":
            return
        with contextlib.suppress(OSError):
            while not req.stopping:
                req.write(chunk)
        req.hang_up()

    return handler


def challenge(www_authenticate: str, status: int = 401) -> Handler:
    """Answer with a ``WWW-Authenticate`` challenge, e.g. ``'Bearer realm="...",service="x"'``."""
    return respond(
        status,
        _error_body("UNAUTHORIZED", "authentication required"),
        {"WWW-Authenticate": www_authenticate},
        content_type="application/json",
    )


def slow(seconds: float, handler: Handler) -> Handler:
    """Wait, then answer with ``handler`` (for client timeouts)."""

    def wrapped(req: Request) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not req.stopping:
            time.sleep(0.01)
        handler(req)

    return wrapped


def sequence(*handlers: Handler) -> Handler:
    """The n-th matching request gets ``handlers[n]``; the last one repeats.

    ``sequence(respond(503), respond(503), blob(data))``: two failures, then success.
    """
    if not handlers:
        raise ValueError("sequence() needs at least one handler")
    lock = threading.Lock()
    calls = [0]

    def handler(req: Request) -> None:
        with lock:
            n = calls[0]
            calls[0] += 1
        handlers[min(n, len(handlers) - 1)](req)

    return handler


def forward(req: Request) -> None:
    """Pass the request to the upstream registry (``hostile.forward_to(registry)``)."""
    req.forward()


def nth(n: int, handler: Handler, otherwise: Handler = forward) -> Handler:
    """The ``n``-th matching request (1-based) gets ``handler``, every other one ``otherwise``."""
    if n < 1:
        raise ValueError("nth() counts from 1")
    return sequence(*([otherwise] * (n - 1)), handler, otherwise)


@dataclass
class Recorded:
    """A request the hostile registry received (``body`` once it was read)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: email.message.Message
    route: Route | None
    body: bytes | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    hits: int = 0

    def matches(self, method: str, path: str) -> re.Match[str] | None:
        if self.method not in ("*", method):
            return None
        return self.pattern.fullmatch(path)


class HostileRegistry(_Owner):
    """A scripted registry: routes first, then the upstream, then a plain 404."""

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.requests: list[Recorded] = []
        self.upstream: str | None = None
        self._lock = threading.Lock()
        self._server = _LoopbackServer(self)
        self.host = self._server.host
        self.url = f"http://{self.host}"

    def route(self, method: str, pattern: str, handler: Handler) -> Route:
        """Answer ``method`` requests whose path fully matches ``pattern`` with ``handler``."""
        r = Route(method.upper(), re.compile(pattern), handler)
        with self._lock:
            self.routes.insert(0, r)  # the last added wins
        return r

    def forward_to(self, server: RegistryServer | str | None) -> None:
        """Send unmatched requests to a real registry (a fixture or ``"host:port"``)."""
        self.upstream = server.host if isinstance(server, RegistryServer) else server

    def matching(self, method: str, pattern: str) -> list[Recorded]:
        rx = re.compile(pattern)
        return [r for r in self.requests if r.method == method and rx.fullmatch(r.path)]

    def count(self, method: str, pattern: str) -> int:
        return len(self.matching(method, pattern))

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.host}/{repo}:{tag}"

    def handle(self, request: Request) -> None:
        with self._lock:
            route = next((r for r in self.routes if r.matches(request.method, request.path)), None)
            if route is not None:
                route.hits += 1
            record = Recorded(request.method, request.path, request.query, request.headers, route)
            self.requests.append(record)
        request.record = record
        if route is not None:
            request.match = route.matches(request.method, request.path)
            route.handler(request)
        elif self.upstream is not None:
            request.forward()
        elif request.path == "/v2/" and request.method in ("GET", "HEAD"):
            request.reply(
                200,
                b"{}",
                {
                    "Content-Type": "application/json",
                    "Docker-Distribution-Api-Version": "registry/2.0",
                },
            )
        else:
            code = (
                "MANIFEST_UNKNOWN"
                if "/manifests/" in request.path
                else "BLOB_UNKNOWN"
                if "/blobs/" in request.path
                else "NAME_UNKNOWN"
            )
            request.reply(
                404, _error_body(code, "not scripted"), {"Content-Type": "application/json"}
            )

    def close(self) -> None:
        self._server.stop()


# --------------------------------------------------------------------------------------------
# The token issuer


@dataclass(frozen=True)
class TokenKey:
    """An RSA key and its self-signed certificate, made with the openssl CLI."""

    key_pem: Path
    cert_pem: Path
    cert_der: bytes


def _make_token_key(directory: Path) -> TokenKey:
    openssl = _need("openssl")
    key, cert = directory / "token.key", directory / "token.crt"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", f"/CN={TOKEN_ISSUER}"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return TokenKey(key, cert, ssl.PEM_cert_to_DER_cert(cert.read_text()))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenRequest:
    """A request the issuer answered: who asked (``None``: anonymous), for what, what it gave."""

    method: str
    account: str | None
    scopes: tuple[str, ...]
    granted: tuple[dict[str, Any], ...]
    status: int


class TokenIssuer(_Owner):
    """A docker token server (``/token``, GET with basic auth, POST OAuth2 forms).

    Authenticated users get every action they ask for; anonymous requests get ``pull`` only if
    :attr:`anonymous_pull`, else a token with no access (as Docker Hub does), and wrong
    credentials get 401. Tokens are RS256 JWTs with the certificate in ``x5c``.
    """

    def __init__(self, key: TokenKey, users: dict[str, str]) -> None:
        self.key = key
        self.users = dict(users)
        self.anonymous_pull = False
        self.expiry = DEFAULT_EXPIRY
        self.service = TOKEN_SERVICE
        self.name = TOKEN_ISSUER
        self.tokens_issued = 0
        self.requests: list[TokenRequest] = []
        self.refresh_tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = _LoopbackServer(self)
        self.host = self._server.host
        self.url = f"http://{self.host}/token"

    # -- policy and signing (also used test-side through mint)

    def grant(self, user: str | None, scope: str) -> dict[str, Any] | None:
        try:
            kind, rest = scope.split(":", 1)
            name, actions = rest.rsplit(":", 1)
        except ValueError:
            return None
        asked = [a for a in actions.split(",") if a]
        allowed = asked if user is not None else (["pull"] if self.anonymous_pull else [])
        given = [a for a in asked if a in allowed]
        return {"type": kind, "name": name, "actions": given}

    def mint(self, scopes: Sequence[str], user: str | None = TOKEN_USER) -> str:
        """A token for ``user`` and ``scopes``, made here (not counted, not logged)."""
        access = [g for g in (self.grant(user, s) for s in scopes) if g is not None]
        return self._sign(user, access)

    def _sign(self, user: str | None, access: list[dict[str, Any]]) -> str:
        now = time.time()
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self.key.cert_der).decode()],
        }
        claims = {
            "iss": self.name,
            "sub": user or "",
            "aud": self.service,
            "iat": int(now),
            "nbf": int(now) - 1,
            "exp": math.ceil(now) + self.expiry - JWT_LEEWAY,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key.key_pem)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return signing_input + "." + _b64url(signature)

    # -- HTTP

    def _basic_user(self, request: Request) -> tuple[str | None, bool]:
        """(user, ok): no header is anonymous and ok; a wrong password is not ok."""
        value = request.headers.get("Authorization", "")
        if not value.lower().startswith("basic "):
            return None, True
        try:
            user, _, password = base64.b64decode(value[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, False
        return user, self.users.get(user) == password

    def handle(self, request: Request) -> None:
        if request.path != "/token" or request.method not in ("GET", "POST"):
            request.reply(404, b"not found\n")
            return
        refresh: str | None = None
        if request.method == "GET":
            user, ok = self._basic_user(request)
            scopes = tuple(request.query.get("scope", []))
            offline = request.query.get("offline_token", ["false"])[0] == "true"
        else:
            form = urllib.parse.parse_qs(request.body().decode())
            scopes = tuple(" ".join(form.get("scope", [])).split())
            grant_type = form.get("grant_type", [""])[0]
            offline = form.get("access_type", [""])[0] == "offline"
            if grant_type == "password":
                user = form.get("username", [""])[0]
                ok = self.users.get(user) == form.get("password", [""])[0]
            elif grant_type == "refresh_token":
                with self._lock:
                    user = self.refresh_tokens.get(form.get("refresh_token", [""])[0])
                ok = user is not None
            else:
                user, ok = None, False
        if not ok:
            with self._lock:
                self.requests.append(TokenRequest(request.method, user, scopes, (), 401))
            request.reply(
                401,
                json.dumps({"details": "incorrect username or password"}).encode(),
                {"Content-Type": "application/json", "WWW-Authenticate": 'Basic realm="token"'},
            )
            return
        access = [g for g in (self.grant(user, s) for s in scopes) if g is not None]
        token = self._sign(user, access)
        answer: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": self.expiry,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if offline and user is not None:
            refresh = secrets.token_urlsafe(16)
            answer["refresh_token"] = refresh
        with self._lock:
            if refresh is not None and user is not None:
                self.refresh_tokens[refresh] = user
            self.tokens_issued += 1
            self.requests.append(TokenRequest(request.method, user, scopes, tuple(access), 200))
        request.reply(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    def close(self) -> None:
        self._server.stop()


# --------------------------------------------------------------------------------------------
# docker-registry


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RegistryServer:
    """A running ``docker-registry`` (see the module docstring for the API)."""

    host: str
    storage_dir: Path
    auth: Auth
    log_path: Path
    process: subprocess.Popen[bytes]
    start_seconds: float
    username: str | None = None
    password: str | None = None
    issuer: TokenIssuer | None = None
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://{self.host}"

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"{self.host}/{repo}:{tag}"

    def blob_path(self, digest: str) -> Path:
        """Where distribution keeps a blob's bytes (to corrupt or remove it in a test)."""
        algo, hexa = digest.split(":", 1)
        return self.storage_dir / "docker/registry/v2/blobs" / algo / hexa[:2] / hexa / "data"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        authenticate: bool = True,
    ) -> Reply:
        """One HTTP exchange from the test side, logging in as the known user if needed.

        For a token registry the token is made with :meth:`TokenIssuer.mint`, so the issuer's
        counters only show what the code under test did.
        """
        sent = dict(headers or {})
        reply = _http(self.host, method, path, body, sent)
        if reply.status != 401 or not authenticate or self.auth == "none":
            return reply
        if self.auth == "basic":
            creds = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            sent["Authorization"] = f"Basic {creds}"
        else:
            assert self.issuer is not None
            params = parse_challenge(reply.headers.get("www-authenticate", ""))
            scopes = params.get("scope", "").split()
            sent["Authorization"] = f"Bearer {self.issuer.mint(scopes, self.username)}"
        return _http(self.host, method, path, body, sent)


def parse_challenge(value: str) -> dict[str, str]:
    """``Bearer realm="x",service="y"`` -> ``{"realm": "x", "service": "y"}`` (test helper)."""
    _, _, params = value.partition(" ")
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def _http(host: str, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
    name, port = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(name, int(port), timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def _registry_config(port: int, storage: Path, auth: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    if auth:
        config["auth"] = auth
    return config


def _answers(host: str) -> bool:
    try:
        reply = _http(host, "GET", "/v2/", None, {})
    except OSError:
        return False
    return "docker-distribution-api-version" in reply.headers


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_registry(workdir: Path, auth: dict[str, Any] | None) -> Iterator[RegistryServer]:
    """Start ``docker-registry`` with its storage in ``workdir``; stop it on exit."""
    binary = _need("docker-registry")
    storage = workdir / "storage"
    storage.mkdir()
    log_path = workdir / "registry.log"
    for _attempt in range(5):
        port = _free_port()
        config = workdir / "config.yml"  # JSON is YAML
        config.write_text(json.dumps(_registry_config(port, storage, auth), indent=1))
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [binary, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            host = f"127.0.0.1:{port}"
            deadline = started + START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if _answers(host):
                    break
                time.sleep(0.005)
            if proc.poll() is None and _answers(host):
                server = RegistryServer(
                    host, storage, "none", log_path, proc, time.monotonic() - started
                )
                yield server
                return
            log_text = log_path.read_text(errors="replace")
            if proc.poll() is not None and "address already in use" in log_text:
                continue  # lost the port to another process: pick another
            raise RuntimeError(f"docker-registry did not start on {host}:\n{log_text}")
        finally:
            _stop(proc)
    raise RuntimeError("docker-registry: no free port after 5 attempts")


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def _registry_session_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pytest-isolate-registry-keys-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def _htpasswd_file(_registry_session_dir: Path) -> Path:
    htpasswd = _need("htpasswd")
    line = subprocess.run(
        [htpasswd, "-Bbn", BASIC_USER, BASIC_PASSWORD], check=True, capture_output=True
    ).stdout
    path = _registry_session_dir / "htpasswd"
    path.write_bytes(line)
    return path


@pytest.fixture(scope="session")
def _token_key(_registry_session_dir: Path) -> TokenKey:
    return _make_token_key(_registry_session_dir)


StartRegistry = Callable[..., RegistryServer]


@pytest.fixture
def start_registry(request: pytest.FixtureRequest) -> Iterator[StartRegistry]:
    """``start_registry(auth="none"|"basic"|"token")``: a new server, stopped after the test."""
    stack = contextlib.ExitStack()

    def start(auth: Auth = "none") -> RegistryServer:
        _need("docker-registry")
        workdir = Path(tempfile.mkdtemp(prefix="pytest-isolate-registry-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        config: dict[str, Any] | None = None
        issuer: TokenIssuer | None = None
        if auth == "basic":
            htpasswd = request.getfixturevalue("_htpasswd_file")
            config = {"htpasswd": {"realm": "pytest-isolate", "path": str(htpasswd)}}
        elif auth == "token":
            key = request.getfixturevalue("_token_key")
            issuer = TokenIssuer(key, {TOKEN_USER: TOKEN_PASSWORD})
            stack.callback(issuer.close)
            config = {
                "token": {
                    "realm": issuer.url,
                    "service": issuer.service,
                    "issuer": issuer.name,
                    "rootcertbundle": str(key.cert_pem),
                }
            }
        elif auth != "none":
            raise ValueError(f"start_registry: unknown auth {auth!r}")
        server = stack.enter_context(running_registry(workdir, config))
        server.auth = auth
        server.issuer = issuer
        if auth == "basic":
            server.username, server.password = BASIC_USER, BASIC_PASSWORD
        elif auth == "token":
            server.username, server.password = TOKEN_USER, TOKEN_PASSWORD
        return server

    with stack:
        yield start


@pytest.fixture
def registry(start_registry: StartRegistry) -> RegistryServer:
    """An anonymous plain-HTTP ``docker-registry`` on 127.0.0.1 with empty storage."""
    return start_registry("none")


@pytest.fixture
def registry_basic(start_registry: StartRegistry) -> RegistryServer:
    """A ``docker-registry`` with htpasswd basic auth (``.username``/``.password``)."""
    return start_registry("basic")


@pytest.fixture
def registry_token(start_registry: StartRegistry) -> RegistryServer:
    """A ``docker-registry`` with token auth and its :class:`TokenIssuer` (``.issuer``)."""
    return start_registry("token")


@pytest.fixture
def hostile_registry() -> Iterator[HostileRegistry]:
    """A scripted registry (see :class:`HostileRegistry`); stopped after the test."""
    server = HostileRegistry()
    try:
        yield server
    finally:
        server.close()
