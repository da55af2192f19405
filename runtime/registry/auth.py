"""Registry authentication: ``WWW-Authenticate`` challenges, basic credentials and bearer tokens.

How a registry asks for credentials: it answers ``401`` with one or more challenges,

* ``Basic realm="..."``: send ``Authorization: Basic base64(user:password)``;
* ``Bearer realm="https://auth.example/token",service="registry.example",scope="repository:x:pull"``:
  get a token from ``realm`` for that ``service`` and the scopes the request needs (``GET
  realm?service=...&scope=...``, with basic credentials when we have some, anonymously
  otherwise; or, when the credentials carry an *identity token*, a ``POST`` of an OAuth2
  ``refresh_token`` grant, as docker does), then send ``Authorization: Bearer <token>``.

Tokens are cached per set of scopes and fetched again when ``expires_in`` has passed (the token
service's own value, default 60 s) or when the registry refuses a token with a ``401`` (it may
have expired early, or been revoked). A second ``401`` in a row for one request means the
credentials are missing or lack the rights: :class:`AuthError` names the registry, the access
asked for, and the command that fixes it.

The parsing and planning are pure (:func:`parse_challenges`, :func:`plan_token_request`,
:func:`parse_token_response`); :class:`Authenticator` applies them with an :class:`HttpClient`.
Credentials are looked up lazily, at the first challenge: an anonymous pull never reads a
credential file or runs a credential helper.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlencode, urlsplit

from runtime.errors import AuthError, RegistryError
from runtime.registry.http import HttpClient, Response, is_loopback

__all__ = [
    "DEFAULT_TOKEN_LIFETIME",
    "Authenticator",
    "Challenge",
    "Credentials",
    "Token",
    "TokenRequest",
    "basic_authorization",
    "parse_challenges",
    "parse_token_response",
    "plan_token_request",
    "pull_scope",
    "push_scope",
]

DEFAULT_TOKEN_LIFETIME = 60.0
"""Seconds a token lives when the token service does not say (the docker token spec's default)."""
TOKEN_RESPONSE_LIMIT = 1 << 20
CLIENT_ID = "pytest-isolate"
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*(?=[ \t]*(?:,|$))")
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class Credentials(Protocol):
    """What authentication needs of a login: a user name and either a password or an
    identity token (docker's ``identitytoken``, an OAuth2 refresh token)."""

    @property
    def username(self) -> str: ...

    @property
    def password(self) -> str: ...

    @property
    def identity_token(self) -> str | None: ...


CredentialLookup = Callable[[str], "Credentials | None"]


# --- challenges (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header: the scheme (lower case) and its
    parameters (names lower case, values unquoted)."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        return self.params.get(name)


def parse_challenges(values: Iterable[str]) -> tuple[Challenge, ...]:
    """The challenges in one or more ``WWW-Authenticate`` header values (RFC 9110 grammar).

    Handles several challenges in one header (``Bearer realm="a", Basic realm="b"``),
    quoted strings with backslash escapes and commas inside, unquoted tokens, spaces around
    ``=``. Malformed parts are skipped, not fatal: the caller decides what to do when no usable
    challenge is left.
    """
    found: list[Challenge] = []
    for value in values:
        found.extend(_parse_header(value))
    return tuple(found)


def _parse_header(text: str) -> list[Challenge]:
    out: list[Challenge] = []
    pos, end = 0, len(text)
    while pos < end:
        pos = _skip(text, pos, " \t,")
        scheme, pos = _token(text, pos)
        if not scheme:
            # Not a token: skip to the next comma and try again.
            comma = text.find(",", pos + 1)
            pos = end if comma < 0 else comma
            continue
        params: dict[str, str] = {}
        pos = _skip(text, pos, " \t")
        token68 = _TOKEN68.match(text, pos)
        if token68 is not None:
            pos = token68.end()  # a token68 credential (``Negotiate abc==``): not used here
        while pos < end:
            name, after = _token(text, pos)
            after = _skip(text, after, " \t")
            if not name or after >= end or text[after] != "=":
                break  # the next challenge's scheme, or junk the outer loop skips
            pos = _skip(text, after + 1, " \t")
            if pos < end and text[pos] == '"':
                value, pos = _quoted(text, pos)
            else:
                value, pos = _token(text, pos)
            params[name.lower()] = value
            pos = _skip(text, pos, " \t")
            if pos >= end or text[pos] != ",":
                break
            pos = _skip(text, pos + 1, " \t,")
        out.append(Challenge(scheme.lower(), params))
    return out


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _token(text: str, pos: int) -> tuple[str, int]:
    start = pos
    while pos < len(text) and text[pos] in _TOKEN_CHARS:
        pos += 1
    return text[start:pos], pos


def _quoted(text: str, pos: int) -> tuple[str, int]:
    """The value of the quoted string at ``text[pos] == '"'`` and the position after it."""
    chars: list[str] = []
    pos += 1
    while pos < len(text):
        c = text[pos]
        if c == "\\" and pos + 1 < len(text):
            chars.append(text[pos + 1])
            pos += 2
            continue
        if c == '"':
            return "".join(chars), pos + 1
        chars.append(c)
        pos += 1
    return "".join(chars), pos  # unterminated: take what there is


# --- scopes, tokens (pure) ----------------------------------------------------------------------


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def basic_authorization(username: str, password: str) -> str:
    raw = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class TokenRequest:
    """How to ask a token service for a token (decided by :func:`plan_token_request`)."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None = None


def plan_token_request(
    challenge: Challenge, scopes: Sequence[str], credentials: Credentials | None
) -> TokenRequest:
    """The request for a token answering ``challenge`` for ``scopes`` (pure).

    An identity token is exchanged with an OAuth2 ``refresh_token`` grant (``POST``, form
    body); otherwise a ``GET`` with the service and scopes in the query, and basic credentials
    when there are some (the token service then issues a token with that user's rights).
    """
    realm = challenge.param("realm")
    if not realm:
        raise AuthError("the registry's bearer challenge has no realm (no token service)")
    service = challenge.param("service")
    if credentials is not None and credentials.identity_token:
        form: list[tuple[str, str]] = [
            ("grant_type", "refresh_token"),
            ("refresh_token", credentials.identity_token),
            ("client_id", CLIENT_ID),
        ]
        if service:
            form.append(("service", service))
        if scopes:
            form.append(("scope", " ".join(scopes)))
        return TokenRequest(
            "POST",
            realm,
            {"Content-Type": "application/x-www-form-urlencoded"},
            urlencode(form).encode(),
        )
    query: list[tuple[str, str]] = []
    if service:
        query.append(("service", service))
    query.extend(("scope", s) for s in scopes)
    headers: dict[str, str] = {}
    if credentials is not None and credentials.username:
        query.append(("account", credentials.username))
        headers["Authorization"] = basic_authorization(credentials.username, credentials.password)
    url = realm
    if query:
        url += ("&" if urlsplit(realm).query else "?") + urlencode(query)
    return TokenRequest("GET", url, headers)


@dataclass(frozen=True)
class Token:
    """A bearer token and the monotonic time after which it is fetched again."""

    value: str
    expires_at: float


def parse_token_response(body: bytes, now: float) -> Token:
    """The token in a token service's JSON answer (``token`` or ``access_token``), valid for
    ``expires_in`` seconds from ``now`` (default :data:`DEFAULT_TOKEN_LIFETIME`).

    Raises ``ValueError`` when there is no token.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"the answer is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError("the answer is not a JSON object")
    value = data.get("token") or data.get("access_token")
    if not isinstance(value, str) or not value:
        raise ValueError("the answer has no 'token' or 'access_token'")
    lifetime = data.get("expires_in")
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    return Token(value, now + float(lifetime))


# --- the flow -----------------------------------------------------------------------------------


class Authenticator:
    """The ``Authorization`` header for requests to one registry, learned from its challenges.

    ``registry`` is the name credentials are stored under and errors show (``docker.io``, not
    its API host). Thread-safe: parallel transfers share one token per scope set.
    """

    def __init__(
        self,
        registry: str,
        http: HttpClient,
        *,
        credentials: CredentialLookup,
        insecure: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self._http = http
        self._lookup = credentials
        self._insecure = insecure
        self._clock = clock
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._credentials: Credentials | None = None
        self._looked_up = False
        self._tokens: dict[tuple[str, ...], Token] = {}
        self.tokens_fetched = 0
        """How many tokens this authenticator fetched (for tests and progress displays)."""

    # --- what requests send ---

    def authorization(self, scopes: Sequence[str]) -> str | None:
        """The ``Authorization`` value for a request needing ``scopes``; ``None`` while the
        registry has not asked for anything (an open registry is never sent credentials)."""
        with self._lock:
            challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._creds()
            if creds is None or not creds.username:
                return None
            return basic_authorization(creds.username, creds.password)
        key = tuple(sorted(set(scopes)))
        with self._fetch_lock:
            token = self._tokens.get(key)
            if token is None or self._clock() >= token.expires_at:
                token = self._fetch_token(challenge, key)
                self._tokens[key] = token
        return "Bearer " + token.value

    def challenged(self, response: Response, scopes: Sequence[str], sent: str | None) -> None:
        """Learn from a ``401`` to a request that sent ``sent``; the caller then retries once.

        Raises :class:`AuthError` when a retry cannot help: no usable challenge, or a basic
        challenge and no credentials.
        """
        challenge = self.learn(response)
        if challenge.scheme == "basic":
            creds = self._creds()
            if creds is None or not creds.username:
                response.close()
                raise self._missing(scopes)
            if sent is not None and sent.startswith("Basic "):
                response.close()
                raise self.denied(scopes)
        else:
            key = tuple(sorted(set(scopes)))
            with self._fetch_lock:
                token = self._tokens.get(key)
                if token is not None and sent == "Bearer " + token.value:
                    del self._tokens[key]  # refused: expired early or revoked; fetch a new one
        response.close()

    def learn(self, response: Response) -> Challenge:
        """Remember the challenge of a ``401`` (from ``GET /v2/``, say) for the next requests;
        :class:`AuthError` if it has none we can answer."""
        challenge = self._pick(response)
        with self._lock:
            self._challenge = challenge
        response.close()
        return challenge

    def denied(self, scopes: Sequence[str]) -> AuthError:
        """The error for a request refused again after :meth:`challenged`."""
        creds = self._creds()
        what = _describe_scopes(scopes)
        if creds is None or not (creds.username or creds.identity_token):
            return self._missing(scopes)
        who = creds.username or "the stored identity token"
        return AuthError(
            f"registry {self.registry} refused {what} to {who}: check the name and rights, "
            f"or log in again with `pytest-isolate login {self.registry}`"
        )

    # --- internals ---

    def _missing(self, scopes: Sequence[str]) -> AuthError:
        return AuthError(
            f"registry {self.registry} needs credentials for {_describe_scopes(scopes)} and "
            f"none are stored: run `pytest-isolate login {self.registry}`"
        )

    def _pick(self, response: Response) -> Challenge:
        challenges = parse_challenges(response.header_all("WWW-Authenticate"))
        for scheme in ("bearer", "basic"):  # bearer first, as docker: it can carry scopes
            for challenge in challenges:
                if challenge.scheme == scheme:
                    return challenge
        response.close()
        offered = ", ".join(sorted({c.scheme for c in challenges})) or "none"
        raise AuthError(
            f"registry {self.registry} answered {response.method} {response.url} with 401 and "
            f"no usable challenge (schemes offered: {offered})"
        )

    def _creds(self) -> Credentials | None:
        with self._lock:
            if not self._looked_up:
                self._credentials = self._lookup(self.registry)
                self._looked_up = True
            return self._credentials

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> Token:
        creds = self._creds()
        plan = plan_token_request(challenge, scopes, creds)
        self._check_realm(plan.url)
        response = self._send(plan)
        if plan.method == "POST" and response.status in (404, 405):
            # A token service without OAuth2 (docker falls back the same way).
            response.close()
            plan = plan_token_request(challenge, scopes, _WithoutIdentity.of(creds))
            response = self._send(plan)
        if response.status in (401, 403):
            detail = response.error()
            if creds is None:
                raise AuthError(
                    f"registry {self.registry}'s token service refused an anonymous token for "
                    f"{_describe_scopes(scopes)}: run `pytest-isolate login {self.registry}` "
                    f"({detail})"
                ) from detail
            raise AuthError(
                f"registry {self.registry}'s token service refused the credentials of "
                f"{creds.username or 'the identity token'}: log in again with `pytest-isolate "
                f"login {self.registry}` ({detail})"
            ) from detail
        if response.status != 200:
            raise response.error(f"getting a token for registry {self.registry}")
        body = response.read_all(TOKEN_RESPONSE_LIMIT, "token response")
        try:
            token = parse_token_response(body, self._clock())
        except ValueError as e:
            raise RegistryError(
                f"the token service {challenge.param('realm')} of registry {self.registry} "
                f"sent no usable token: {e}"
            ) from e
        self.tokens_fetched += 1
        return token

    def _send(self, plan: TokenRequest) -> Response:
        return self._http.request(
            plan.method,
            plan.url,
            headers=plan.headers,
            body=plan.body,
            idempotent=True,  # asking for a token again is harmless
        )

    def _check_realm(self, url: str) -> None:
        """Credentials go to the token service: never over plain HTTP to a remote host."""
        parts = urlsplit(url)
        if parts.scheme == "https":
            return
        host = parts.hostname or ""
        netloc = parts.netloc.rpartition("@")[2]
        if parts.scheme == "http" and (
            is_loopback(host) or host in self._insecure or netloc in self._insecure
        ):
            return
        raise AuthError(
            f"registry {self.registry} sends us for tokens to {url!r}, which is not HTTPS; "
            "refused (mark that host insecure if this is intended)"
        )


@dataclass(frozen=True)
class _WithoutIdentity:
    username: str
    password: str
    identity_token: str | None = None

    @staticmethod
    def of(creds: Credentials | None) -> Credentials | None:
        if creds is None or not creds.username:
            return None
        return _WithoutIdentity(creds.username, creds.password)


def _describe_scopes(scopes: Sequence[str]) -> str:
    if not scopes:
        return "access"
    parts = []
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind == "repository" and name:
            parts.append(f"{actions.replace(',', '+')} access to {name}")
        else:
            parts.append(scope)
    return ", ".join(parts)
