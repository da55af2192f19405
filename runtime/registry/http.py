"""A small HTTP(S) client for registries, on ``http.client``: pooled keep-alive connections,
redirects, retries with backoff, bounded bodies.

Why not ``urllib.request``: it opens a new connection for every request (a pull is dozens of
requests to one host, several in parallel), follows redirects without dropping credentials
across hosts, and reads error bodies without bound. Everything a registry sends is untrusted,
so every body here is read with a limit, and the caller always says how much it expects.

The decisions are pure functions (:func:`scheme_for`, :func:`plan_redirect`,
:func:`retry_delay`, :func:`retry_after`, :func:`error_detail`), tested without sockets;
:class:`HttpClient` applies them.

Retries (``attempts`` tries in all, 4 by default, so 3 retries; backoff 0.25 s doubling, capped
at 8 s, with full jitter):

* a connection that cannot be made, is reset, or times out: idempotent requests only;
* 429 Too Many Requests: any request whose body can be sent again (the registry did nothing),
  honouring ``Retry-After`` up to 60 s (a longer wait is returned to the caller, not slept);
* 500, 502, 503, 504: idempotent requests only (``GET``, ``HEAD``, ``PUT`` and ``DELETE`` by
  default; a caller can declare a ``POST`` idempotent, or an upload ``PUT`` not).

A keep-alive connection the server closed while it sat in the pool is not a failure: the
request is sent again at once on a fresh connection, without counting as a retry.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

from runtime.errors import RegistryError

__all__ = [
    "DEFAULT_RETRY",
    "ERROR_BODY_LIMIT",
    "IDEMPOTENT_METHODS",
    "RETRY_STATUSES",
    "HttpClient",
    "Payload",
    "Response",
    "RetryPolicy",
    "error_detail",
    "is_loopback",
    "plan_redirect",
    "retry_after",
    "retry_delay",
    "scheme_for",
    "split_host",
]

USER_AGENT = "pytest-isolate/0.1"
ERROR_BODY_LIMIT = 64 << 10
"""Bytes of an error response read for its message; the rest is dropped with the connection."""
SEND_CHUNK = 1 << 20
DRAIN_LIMIT = 1 << 20
"""A response body up to this size left unread is drained to keep the connection; larger
bodies close it (cheaper than reading what nobody wants)."""
MAX_REDIRECTS = 5
MAX_IDLE_PER_HOST = 8
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


# --- pure decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: ``attempts`` tries in all, backoff ``base * 2**n``
    seconds (full jitter) capped at ``cap``; a ``Retry-After`` above ``max_retry_after`` is
    not waited for."""

    attempts: int = 4
    base: float = 0.25
    cap: float = 8.0
    max_retry_after: float = 60.0


DEFAULT_RETRY = RetryPolicy()


def retry_delay(
    policy: RetryPolicy, attempt: int, retry_after_s: float | None, rand: Callable[[], float]
) -> float:
    """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0).

    Full jitter (a uniform fraction of the exponential step) spreads clients that failed
    together; the registry's ``Retry-After``, when given, is a floor.
    """
    step = min(policy.cap, policy.base * 2.0**attempt)
    delay = step * rand()
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


def retry_after(value: str | None, now: float) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    stamp: float = when.timestamp()
    return max(0.0, stamp - now)


def split_host(host: str) -> tuple[str, int | None]:
    """``"[::1]:5000"`` -> ``("::1", 5000)``; ``"example.com"`` -> ``("example.com", None)``."""
    parts = urlsplit(f"//{host}")
    try:
        port = parts.port
    except ValueError as e:
        raise RegistryError(f"invalid registry host {host!r}: {e}") from e
    if not parts.hostname:
        raise RegistryError(f"invalid registry host {host!r}")
    return parts.hostname, port


def is_loopback(hostname: str) -> bool:
    """``localhost`` and loopback addresses (127.0.0.0/8, ::1): docker's automatic insecure set."""
    if hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def scheme_for(host: str, insecure: Collection[str] = ()) -> str:
    """``http`` for loopback registries and hosts listed as insecure, ``https`` otherwise.

    ``insecure`` may name a host with or without its port (``myreg:5000`` or ``myreg``).
    """
    hostname, _ = split_host(host)
    if is_loopback(hostname) or host in insecure or hostname in insecure:
        return "http"
    return "https"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


@dataclass(frozen=True)
class Redirect:
    """Where to send a request next, as decided by :func:`plan_redirect`."""

    method: str
    url: str
    headers: Mapping[str, str]
    keep_body: bool


def plan_redirect(
    method: str, status: int, location: str, url: str, headers: Mapping[str, str]
) -> Redirect:
    """The request that follows a redirect response (pure).

    303 (and 301/302 after a ``POST``, as browsers do) become a ``GET`` without a body; 307/308
    repeat the request. ``Authorization`` is dropped when the target's scheme, host or port
    differ: a registry sending blobs to a storage host must not hand it our credentials (the
    storage URL carries its own signature).
    """
    target = urljoin(url, location)
    if urlsplit(target).scheme not in ("http", "https"):
        raise RegistryError(f"{method} {url}: redirect to unsupported URL {location!r}")
    new_method, keep_body = method, True
    if status == 303 or (status in (301, 302) and method == "POST"):
        new_method, keep_body = ("HEAD" if method == "HEAD" else "GET"), False
    new_headers = dict(headers)
    if _origin(target) != _origin(url):
        new_headers = {k: v for k, v in new_headers.items() if k.lower() != "authorization"}
    if not keep_body:
        new_headers = {
            k: v
            for k, v in new_headers.items()
            if k.lower() not in ("content-type", "content-range")
        }
    return Redirect(new_method, target, new_headers, keep_body)


def error_detail(body: bytes, content_type: str | None) -> str:
    """The registry's own words from an error body: ``CODE: message`` of each entry of the
    distribution spec's ``{"errors": [{"code", "message", "detail"}]}``, else a short text."""
    text = body[:ERROR_BODY_LIMIT]
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        errors = data.get("errors")
        if isinstance(errors, list):
            parts = []
            for entry in errors[:5]:
                if not isinstance(entry, dict):
                    continue
                code, message = entry.get("code"), entry.get("message")
                piece = ": ".join(str(x) for x in (code, message) if x)
                if piece:
                    parts.append(piece)
            if parts:
                return "; ".join(parts)
        for key in ("message", "error_description", "details", "error"):
            if isinstance(data.get(key), str) and data[key]:
                return str(data[key])
    if content_type and not content_type.startswith(("text/", "application/json")):
        return ""
    short = text.decode("utf-8", "replace").strip()
    short = " ".join(short.split())
    return short[:200] + ("..." if len(short) > 200 else "")


# --- requests and responses ---------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """A request body that can be sent again: ``open()`` returns a fresh reader of exactly
    ``length`` bytes (a file region, a blob in the store)."""

    length: int
    open: Callable[[], BinaryIO]


Body = bytes | Payload | None


class Response:
    """A response whose body has not been read yet; close it (or use ``with``) to give the
    connection back to the pool.

    :meth:`read_all` takes a limit: a body larger than the caller expects is an error, never
    memory exhausted.
    """

    def __init__(
        self,
        client: HttpClient,
        method: str,
        url: str,
        raw: http.client.HTTPResponse,
        conn: http.client.HTTPConnection,
        key: tuple[str, str, int | None],
    ) -> None:
        self._client = client
        self.method = method
        self.url = url
        self.status = raw.status
        self.reason = raw.reason
        self.headers = raw.headers
        self._raw = raw
        self._conn: http.client.HTTPConnection | None = conn
        self._key = key

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def header_all(self, name: str) -> list[str]:
        return self.headers.get_all(name) or []

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the body (``b""`` at its end); connection errors become
        :class:`RegistryError` naming the request."""
        try:
            return self._raw.read(size if size >= 0 else None)
        except (OSError, http.client.HTTPException) as e:
            self.abort()
            raise RegistryError(
                f"{self.method} {self.url}: reading the response failed: {e}"
            ) from e

    def read_all(self, limit: int, what: str = "response") -> bytes:
        """The whole body, refused with :class:`RegistryError` if longer than ``limit``."""
        declared = self.content_length
        if declared is not None and declared > limit:
            self.close()
            raise RegistryError(
                f"{self.method} {self.url}: the {what} is {declared} bytes, more than the "
                f"{limit} allowed"
            )
        data = self.read(limit + 1)
        while len(data) <= limit:
            more = self.read(limit + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) > limit:
            self.close()
            raise RegistryError(
                f"{self.method} {self.url}: the {what} is longer than the {limit} bytes allowed"
            )
        self.close()
        return data

    def error(self, what: str = "") -> RegistryError:
        """A :class:`RegistryError` for this response: method, URL, status, the registry's
        message (the body is read up to :data:`ERROR_BODY_LIMIT`)."""
        body = b""
        with suppress(RegistryError):
            body = self.read(ERROR_BODY_LIMIT) if self.method != "HEAD" else b""
        self.close()
        detail = error_detail(body, self.headers.get("Content-Type"))
        text = f"{self.method} {self.url}: {self.status} {self.reason}".rstrip()
        if detail:
            text += f": {detail}"
        if what:
            text = f"{what}: {text}"
        return RegistryError(text)

    def close(self) -> None:
        """Release the connection: back to the pool if the body was read (or is short enough
        to drain), closed otherwise."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        raw = self._raw
        try:
            if not raw.isclosed():
                length = raw.length
                if length is not None and length <= DRAIN_LIMIT:
                    while raw.read(64 << 10):
                        pass
                else:
                    raw.close()
                    conn.close()
                    return
            if raw.will_close:
                conn.close()
            else:
                self._client._release(self._key, conn)
        except (OSError, http.client.HTTPException):
            conn.close()

    def abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._raw.close()
            conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.abort()
        else:
            self.close()


class _StaleConnection(Exception):
    """A pooled connection turned out to be closed by the server before it answered."""


class HttpClient:
    """Pooled HTTP(S) connections to registries; safe to share between threads.

    Each request takes an idle connection to its host from the pool (or opens one) and gives it
    back when its response is closed, so N threads use up to N connections per host, and a
    sequence of requests reuses one. HTTPS uses the system's CA store.
    """

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        ssl_context: ssl.SSLContext | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.timeout = timeout
        self.retry = retry
        self._ssl = ssl_context
        self._sleep = sleep
        self._rand = rand
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int | None], list[http.client.HTTPConnection]] = {}

    def close(self) -> None:
        """Close every idle connection (connections in use close with their response)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- the request loop ---

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: Body = None,
        idempotent: bool | None = None,
        follow_redirects: bool = True,
    ) -> Response:
        """Send a request, following redirects and retrying as the module docstring says, and
        return the final response, whatever its status (the caller decides what is an error).

        Connection failures that outlive the retries raise :class:`RegistryError` naming the
        method and URL.
        """
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        policy = self.retry
        attempt = 0
        while True:
            last = attempt + 1 >= policy.attempts
            try:
                response = self._follow(method, url, dict(headers or {}), body, follow_redirects)
            except ssl.SSLCertVerificationError as e:
                raise RegistryError(
                    f"{method} {url}: the registry's TLS certificate is not trusted: "
                    f"{e.verify_message or e} (for a registry without TLS, mark it insecure)"
                ) from e
            except (OSError, http.client.HTTPException) as e:
                if not idempotent or last or isinstance(e, socket.gaierror):
                    raise RegistryError(f"{method} {url}: {_describe(e)}") from e
                self._sleep(retry_delay(policy, attempt, None, self._rand))
                attempt += 1
                continue
            status = response.status
            retryable = status in RETRY_STATUSES and (idempotent or status == 429)
            if not retryable or last:
                return response
            wait = retry_after(response.header("Retry-After"), time.time())
            if wait is not None and wait > policy.max_retry_after:
                return response
            response.close()
            self._sleep(retry_delay(policy, attempt, wait, self._rand))
            attempt += 1

    def _follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: Body,
        follow_redirects: bool,
    ) -> Response:
        for _ in range(MAX_REDIRECTS + 1):
            response = self._send_once(method, url, headers, body)
            location = response.header("Location")
            if not (follow_redirects and response.status in REDIRECT_STATUSES and location):
                return response
            response.close()
            step = plan_redirect(method, response.status, location, url, headers)
            method, url, headers = step.method, step.url, dict(step.headers)
            if not step.keep_body:
                body = None
        raise RegistryError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")

    def _send_once(self, method: str, url: str, headers: dict[str, str], body: Body) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryError(f"{method} {url}: not an http(s) URL")
        key = (parts.scheme, parts.hostname, parts.port)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        while True:
            conn, reused = self._acquire(key)
            try:
                raw = self._exchange(conn, method, target, headers, body, reused)
            except _StaleConnection:
                conn.close()
                continue
            except BaseException:
                conn.close()
                raise
            return Response(self, method, url, raw, conn, key)

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: Body,
        reused: bool,
    ) -> http.client.HTTPResponse:
        length = 0 if body is None else (len(body) if isinstance(body, bytes) else body.length)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            names = {k.lower() for k in headers}
            if "user-agent" not in names:
                conn.putheader("User-Agent", USER_AGENT)
            for name, value in headers.items():
                conn.putheader(name, value)
            if body is not None or method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            if isinstance(body, bytes):
                for offset in range(0, len(body), SEND_CHUNK):
                    conn.send(body[offset : offset + SEND_CHUNK])
            elif body is not None:
                _send_payload(conn, body)
            return conn.getresponse()
        except (
            http.client.RemoteDisconnected,
            BrokenPipeError,
            ConnectionResetError,
            ConnectionAbortedError,
        ) as e:
            if reused:
                raise _StaleConnection() from e
            raise

    # --- the pool ---

    def _acquire(self, key: tuple[str, str, int | None]) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        scheme, host, port = key
        conn: http.client.HTTPConnection
        if scheme == "https":
            context = self._ssl or _default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        return conn, False

    def _release(self, key: tuple[str, str, int | None], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < MAX_IDLE_PER_HOST:
                idle.append(conn)
                return
        conn.close()


def _send_payload(conn: http.client.HTTPConnection, payload: Payload) -> None:
    left = payload.length
    with payload.open() as stream:
        while left > 0:
            chunk = stream.read(min(SEND_CHUNK, left))
            if not chunk:
                raise RegistryError(
                    f"the request body ended {left} bytes short of its {payload.length} bytes"
                )
            conn.send(chunk)
            left -= len(chunk)


_CONTEXT: ssl.SSLContext | None = None
_CONTEXT_LOCK = threading.Lock()


def _default_context() -> ssl.SSLContext:
    """The system CA store, loaded once per process (loading it costs milliseconds)."""
    global _CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            _CONTEXT = ssl.create_default_context()
        return _CONTEXT


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the registry running?)"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name: {error.strerror or error}"
    text = str(error) or type(error).__name__
    return text
