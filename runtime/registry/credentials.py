"""Where registry credentials come from: our own auth file, then docker's.

Files, in the order they are asked (both in docker's ``config.json`` format)::

    our auth file      $PYTEST_ISOLATE_AUTH, else $XDG_CONFIG_HOME/pytest-isolate/auth.json,
                       else ~/.config/pytest-isolate/auth.json   (written by `pytest-isolate login`)
    docker's config    $DOCKER_CONFIG/config.json, else ~/.docker/config.json   (read only)

    {"auths": {"HOST": {"auth": base64("user:password"), "identitytoken": "..."}},
     "credHelpers": {"HOST": "NAME"}, "credsStore": "NAME"}

Within one file the order is docker's: a ``credHelpers`` entry for the registry, then the
``credsStore``, then the ``auths`` entry. A helper is the program ``docker-credential-NAME``
(the credential-helper protocol: ``get`` with the server on stdin, ``{"Username", "Secret"}``
on stdout). A helper that is not installed is skipped with a note (a copied config naming
``desktop`` should not break a pull that the next source can serve); a helper that runs and
fails is an :class:`AuthError`, since its keychain is where the user said the secret is.

Keys are normalized before they are compared (:func:`registry_key`): ``https://host:5000/v2/``
and ``host:5000`` are one registry, and ``https://index.docker.io/v1/``, ``docker.io``,
``index.docker.io`` and ``registry-1.docker.io`` are all Docker Hub.

A malformed file is an :class:`AuthError` naming the file and the key, not a
:class:`SpecError`: it is found while authenticating to a registry, and a caller that handles
"cannot authenticate" (``except AuthError`` around a pull or push) should handle it too.

:func:`store` and :func:`erase` (``login`` / ``logout``) only ever touch our own file: under a
lock on a sidecar file, written to a temporary file with mode 0600, fsynced, renamed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import AuthError, SpecError

__all__ = [
    "HUB",
    "Credentials",
    "Lookup",
    "auth_file",
    "docker_config_file",
    "erase",
    "find",
    "lookup",
    "parse_config",
    "registry_key",
    "store",
]

HUB = "docker.io"
"""The key every spelling of Docker Hub normalizes to."""

HUB_SERVER = "https://index.docker.io/v1/"
"""How docker names Docker Hub in ``auths`` and to credential helpers."""

_HUB_ALIASES = frozenset(
    {HUB, "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HELPER_TIMEOUT = 60.0  # a helper may ask the user to unlock a keychain
_NOT_FOUND = "credentials not found in native keychain"  # the protocol's "no entry" answer
_TOKEN_USER = "<token>"  # a helper's username meaning "the secret is an identity token"


@dataclass(frozen=True)
class Credentials:
    """What to log in with; ``source`` says where it came from (for messages, never secrets)."""

    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)
    source: str = ""


@dataclass(frozen=True)
class Lookup:
    """The answer of :func:`find`: the credentials (or None) and notes on sources skipped."""

    credentials: Credentials | None
    notes: tuple[str, ...] = ()


# --- names and places (pure) -------------------------------------------------------------------


def registry_key(server: str) -> str:
    """The registry a ``config.json`` key or a reference's domain names: ``host[:port]``.

    Drops a scheme and any path (``https://host/v2/``), lower-cases, and maps every Docker Hub
    spelling to :data:`HUB`.
    """
    host = server.strip().split("://", 1)[-1].split("/", 1)[0].lower()
    if not host:
        raise SpecError(f"not a registry name: {server!r}")
    return HUB if host in _HUB_ALIASES else host


def _server_address(key: str) -> str:
    """How docker names a registry to a helper and in ``auths``: Hub by its v1 URL."""
    return HUB_SERVER if key == HUB else key


def _xdg_path(env: Mapping[str, str], variable: str, fallback: str, *parts: str) -> Path | None:
    base = env.get(variable)
    if base and Path(base).is_absolute():  # the XDG spec says to ignore relative values
        return Path(base, *parts)
    home = env.get("HOME")
    if home and Path(home).is_absolute():
        return Path(home, fallback, *parts)
    return None


def auth_file(env: Mapping[str, str]) -> Path | None:
    """Our auth file for this environment, or None when there is no HOME to put it in."""
    explicit = env.get("PYTEST_ISOLATE_AUTH")
    if explicit:
        if not Path(explicit).is_absolute():
            raise SpecError(f"PYTEST_ISOLATE_AUTH must be an absolute path, not {explicit!r}")
        return Path(explicit)
    return _xdg_path(env, "XDG_CONFIG_HOME", ".config", "pytest-isolate", "auth.json")


def docker_config_file(env: Mapping[str, str]) -> Path | None:
    """Docker's ``config.json`` for this environment (it may not exist)."""
    explicit = env.get("DOCKER_CONFIG")
    if explicit:
        return Path(explicit, "config.json")
    home = env.get("HOME")
    return Path(home, ".docker", "config.json") if home else None


# --- reading a config file (pure once the bytes are read) -------------------------------------


def _read_config(path: Path) -> dict[str, Any] | None:
    """The parsed file, or None if it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AuthError(f"cannot read credentials file {path}: {e.strerror}") from e
    return parse_config(data, path)


def parse_config(data: bytes, path: Path | str) -> dict[str, Any]:
    """Parse and check the shape of a ``config.json``; errors name the file and the key."""
    if not data.strip():
        return {}
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise AuthError(f"{path}: not valid JSON ({where})") from e
    if not isinstance(config, dict):
        raise AuthError(f"{path}: expected a JSON object at the top")
    for key in ("auths", "credHelpers"):
        value = config.get(key, {})
        if not isinstance(value, dict):
            raise AuthError(f"{path}: {key!r} must be an object")
        for name, entry in value.items():
            want = dict if key == "auths" else str
            if not isinstance(entry, want):
                kind = "an object" if want is dict else "a helper name"
                raise AuthError(f"{path}: {key}[{name!r}] must be {kind}")
    store_name = config.get("credsStore")
    if store_name is not None and not isinstance(store_name, str):
        raise AuthError(f"{path}: 'credsStore' must be a helper name")
    return config


def _decode_entry(entry: Mapping[str, Any], origin: str) -> Credentials | None:
    """One ``auths`` entry; None for an empty placeholder (docker writes ``{}`` with a store)."""
    for name in ("auth", "username", "password", "identitytoken"):
        if not isinstance(entry.get(name, ""), str):
            raise AuthError(f"{origin}: {name!r} must be a string")
    username, password = entry.get("username", ""), entry.get("password", "")
    encoded = entry.get("auth", "")
    if encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as e:
            raise AuthError(f"{origin}: 'auth' is not base64 of 'user:password'") from e
        username, sep, password = decoded.partition(":")
        if not sep:
            raise AuthError(f"{origin}: 'auth' does not hold 'user:password' (no ':')")
    token = entry.get("identitytoken") or None
    if not username and not password and token is None:
        return None
    return Credentials(username, password, token, origin)


@dataclass(frozen=True)
class _Helper:
    """A credential helper to ask, and where we were told to."""

    name: str
    server: str
    origin: str


def _plan(key: str, path: Path, config: Mapping[str, Any]) -> list[Credentials | _Helper]:
    """What to try in one file for the registry ``key``, in docker's order."""
    steps: list[Credentials | _Helper] = []
    server = _server_address(key)
    for name, helper in config.get("credHelpers", {}).items():
        if _normalized(name) == key:
            steps.append(_checked_helper(helper, server, f"{path}: credHelpers[{name!r}]"))
    if config.get("credsStore"):
        steps.append(_checked_helper(config["credsStore"], server, f"{path}: credsStore"))
    auths = config.get("auths", {})
    names = sorted((n for n in auths if _normalized(n) == key), key=lambda n: n != server)
    for name in names:  # docker's own spelling first, then any other spelling of the host
        found = _decode_entry(auths[name], f"{path}: auths[{name!r}]")
        if found is not None:
            steps.append(found)
    return steps


def _normalized(name: str) -> str | None:
    try:
        return registry_key(name)
    except SpecError:
        return None


def _checked_helper(name: str, server: str, origin: str) -> _Helper:
    if not _HELPER_NAME.fullmatch(name):
        raise AuthError(f"{origin}: {name!r} is not a credential helper name")
    return _Helper(name, server, origin)


# --- asking a credential helper ----------------------------------------------------------------


def _ask_helper(helper: _Helper, env: Mapping[str, str]) -> Credentials | None:
    """Run ``docker-credential-NAME get``; None when it has nothing for the server."""
    program = f"docker-credential-{helper.name}"
    path = shutil.which(program, path=env.get("PATH", os.defpath))
    if path is None:
        raise FileNotFoundError(program)
    try:
        done = subprocess.run(
            [path, "get"],
            input=helper.server.encode(),
            capture_output=True,
            env=dict(env),
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise AuthError(
            f"{program} get {helper.server!r} did not answer in {_HELPER_TIMEOUT:.0f} s "
            f"({helper.origin})"
        ) from e
    except OSError as e:
        raise AuthError(f"cannot run {path} ({helper.origin}): {e.strerror}") from e
    out = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0:
        if _NOT_FOUND in out:
            return None
        said = out or done.stderr.decode(errors="replace").strip() or "no message"
        raise AuthError(
            f"{program} get {helper.server!r} failed (exit {done.returncode}, "
            f"{helper.origin}): {said}"
        )
    try:
        answer = json.loads(out)
        username, secret = answer["Username"], answer["Secret"]
        if not isinstance(username, str) or not isinstance(secret, str):
            raise TypeError("Username and Secret must be strings")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AuthError(
            f"{program} get {helper.server!r} answered something other than "
            f'{{"Username": ..., "Secret": ...}} ({helper.origin}): {e}'
        ) from e
    source = f"{program} ({helper.origin})"
    if username == _TOKEN_USER:
        return Credentials("", "", secret, source)
    return Credentials(username, secret, None, source)


# --- the public lookups ------------------------------------------------------------------------


def _config_files(env: Mapping[str, str]) -> list[Path]:
    return [p for p in (auth_file(env), docker_config_file(env)) if p is not None]


def find(host: str, env: Mapping[str, str] | None = None) -> Lookup:
    """The credentials for registry ``host`` (any spelling), and notes on sources skipped."""
    env = os.environ if env is None else env
    key = registry_key(host)
    notes: list[str] = []
    for path in _config_files(env):
        config = _read_config(path)
        if config is None:
            continue
        for step in _plan(key, path, config):
            if isinstance(step, Credentials):
                return Lookup(step, tuple(notes))
            try:
                found = _ask_helper(step, env)
            except FileNotFoundError:
                notes.append(
                    f"docker-credential-{step.name} is not installed; skipped ({step.origin})"
                )
                continue
            if found is not None:
                return Lookup(found, tuple(notes))
    return Lookup(None, tuple(notes))


def lookup(host: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials for registry ``host``, or None (anonymous)."""
    return find(host, env).credentials


# --- login / logout: our own file only ---------------------------------------------------------


def _our_file(env: Mapping[str, str] | None) -> Path:
    path = auth_file(os.environ if env is None else env)
    if path is None:
        raise SpecError(
            "cannot place the auth file: set PYTEST_ISOLATE_AUTH, XDG_CONFIG_HOME or HOME "
            "to an absolute path"
        )
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of ``path`` on a sidecar lock file (left in place)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, config: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``config`` atomically; the file is 0600 from its first byte."""
    data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # an old part file may have had other bits
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(part, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _entry(credentials: Credentials) -> dict[str, str]:
    if ":" in credentials.username:
        raise SpecError(f"a registry username cannot contain ':': {credentials.username!r}")
    entry: dict[str, str] = {}
    if credentials.username or credentials.password:
        pair = f"{credentials.username}:{credentials.password}".encode()
        entry["auth"] = base64.b64encode(pair).decode()
    if credentials.identity_token:
        entry["identitytoken"] = credentials.identity_token
    return entry


def store(host: str, credentials: Credentials, env: Mapping[str, str] | None = None) -> Path:
    """Save ``credentials`` for ``host`` in our auth file (``login``); returns the file.

    Other spellings of the same registry are replaced, other registries and keys kept.
    """
    key = registry_key(host)
    entry = _entry(credentials)
    path = _our_file(env)
    with _locked(path):
        config = _read_config(path) or {}
        auths = {n: e for n, e in config.get("auths", {}).items() if _normalized(n) != key}
        auths[_server_address(key)] = entry
        config["auths"] = auths
        _write_private(path, config)
    return path


def erase(host: str, env: Mapping[str, str] | None = None) -> bool:
    """Forget ``host`` in our auth file (``logout``); False if it was not there."""
    key = registry_key(host)
    path = _our_file(env)
    if not path.exists():
        return False
    with _locked(path):
        config = _read_config(path)
        if config is None:
            return False
        auths = config.get("auths", {})
        kept = {n: e for n, e in auths.items() if _normalized(n) != key}
        if len(kept) == len(auths):
            return False
        config["auths"] = kept
        _write_private(path, config)
    return True
