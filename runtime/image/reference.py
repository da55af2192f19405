"""Image references, parsed and normalized the way docker does.

A reference names an image in a registry::

    [domain[:port]/]path[:tag][@algorithm:hex]

``busybox`` and ``docker.io/library/busybox:latest`` are the same image: a name without a domain
belongs to Docker Hub, and a one-component name on Docker Hub lives under ``library/``. A
reference without tag or digest means ``:latest``. We keep both spellings:
:attr:`Reference.canonical` (``str()``) is what the store records, :attr:`Reference.familiar` is
what people type and read.

``scratch`` (the empty base of ``FROM scratch``) and ``host`` (run on the host's own root
filesystem) are not registry references; :func:`is_special` tells them apart and :func:`parse`
refuses them, so a caller cannot pull ``docker.io/library/scratch`` by accident.

Digests are checked here too (:func:`check_digest`), since the store names its content by them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.errors import SpecError

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_TAG",
    "HOST",
    "SCRATCH",
    "Reference",
    "check_digest",
    "is_special",
    "normalize",
    "parse",
]

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
SCRATCH = "scratch"
HOST = "host"
_SPECIAL = frozenset({SCRATCH, HOST})
_OFFICIAL_PREFIX = "library/"
_LEGACY_DOMAINS = frozenset({"index.docker.io", "registry-1.docker.io"})
_MAX_NAME = 255

# The grammar of distribution/reference, written out piece by piece so each error can say which
# piece is wrong.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_PATH_COMPONENT = re.compile(rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*", re.ASCII)
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?", re.ASCII
)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
_ALGORITHM = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*", re.ASCII)
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+", re.ASCII)
_IMAGE_ID = re.compile(r"[a-f0-9]{64}", re.ASCII)


@dataclass(frozen=True)
class Reference:
    """A normalized image reference: always a domain, a full path, and a tag and/or digest."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/path``: the repository, without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def canonical(self) -> str:
        """The fully qualified form, ``docker.io/library/busybox:latest``."""
        return self.name + self._suffix()

    @property
    def familiar_name(self) -> str:
        """The repository as people write it: ``busybox``, ``user/img``, ``localhost:5000/x``."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        path = self.path
        rest = path.removeprefix(_OFFICIAL_PREFIX)
        if rest != path and "/" not in rest:
            return rest
        return path

    @property
    def familiar(self) -> str:
        """The short form for display: ``busybox:latest``, ``user/img@sha256:...``."""
        return self.familiar_name + self._suffix()

    def with_tag(self, tag: str) -> Reference:
        """The same repository with another tag (and no digest)."""
        _check_tag(tag, self.canonical)
        return Reference(self.domain, self.path, tag, None)

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to a digest (the tag is kept for display)."""
        return Reference(self.domain, self.path, self.tag, check_digest(digest))

    def _suffix(self) -> str:
        text = ""
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def __str__(self) -> str:
        return self.canonical


def is_special(text: str) -> bool:
    """Is ``text`` one of the names that are not registry references (``scratch``, ``host``)?"""
    return text in _SPECIAL


def normalize(text: str) -> str:
    """The canonical string of a reference: ``busybox`` -> ``docker.io/library/busybox:latest``."""
    return parse(text).canonical


def parse(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalize a reference; raise :class:`SpecError` naming it when it is invalid.

    With ``default_tag`` (the default) a reference with neither tag nor digest gets ``:latest``,
    as ``docker pull`` does; without it, the tag stays ``None`` (useful to list a repository).
    """
    if not isinstance(text, str) or not text:
        raise SpecError("invalid image reference '': it is empty")
    if is_special(text):
        raise SpecError(
            f"invalid image reference {text!r}: {text!r} is a reserved name, not a registry image"
        )
    if text != text.strip() or any(c.isspace() for c in text):
        raise SpecError(f"invalid image reference {text!r}: it contains white space")

    remainder, at, digest = text.partition("@")
    checked_digest = None
    if at:
        checked_digest = _digest_in(digest, text)
    name, tag = _split_tag(remainder)
    if tag is not None:
        _check_tag(tag, text)
    if not name:
        raise SpecError(f"invalid image reference {text!r}: the repository name is empty")
    if _IMAGE_ID.fullmatch(name):
        raise SpecError(
            f"invalid image reference {text!r}: a 64-character hexadecimal name is an image id, "
            "not a repository"
        )

    domain, path = _split_domain(name)
    if not _DOMAIN.fullmatch(domain):
        raise SpecError(f"invalid image reference {text!r}: bad registry domain {domain!r}")
    for component in path.split("/"):
        if _PATH_COMPONENT.fullmatch(component):
            continue
        if _PATH_COMPONENT.fullmatch(component.lower()):
            raise SpecError(f"invalid image reference {text!r}: repository name must be lowercase")
        raise SpecError(
            f"invalid image reference {text!r}: bad repository path component {component!r} "
            "(lowercase letters, digits and single '.', '_', '__' or '-' separators)"
        )
    if len(domain) + 1 + len(path) > _MAX_NAME:
        raise SpecError(
            f"invalid image reference {text!r}: the repository name is longer than "
            f"{_MAX_NAME} characters"
        )
    if tag is None and checked_digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, checked_digest)


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed ``algorithm:hex`` digest, else raise SpecError."""
    return _digest_in(digest, digest)


def _digest_in(digest: str, context: str) -> str:
    algorithm, colon, encoded = digest.partition(":")
    where = (
        f"invalid digest {digest!r}"
        if context == digest
        else (f"invalid image reference {context!r}: bad digest {digest!r}")
    )
    if not colon or not _ALGORITHM.fullmatch(algorithm):
        raise SpecError(f"{where}: expected algorithm:hex, e.g. sha256:<64 hex digits>")
    want = _HEX_LENGTH.get(algorithm)
    if want is None:
        raise SpecError(f"{where}: unsupported digest algorithm {algorithm!r}")
    if len(encoded) != want or not _HEX.fullmatch(encoded):
        raise SpecError(f"{where}: {algorithm} needs {want} lowercase hexadecimal digits")
    return digest


def _split_tag(name: str) -> tuple[str, str | None]:
    # A ':' after the last '/' starts the tag; one before it belongs to a registry port.
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon + 1 :]
    return name, None


def _check_tag(tag: str, context: str) -> None:
    if not _TAG.fullmatch(tag):
        raise SpecError(
            f"invalid image reference {context!r}: bad tag {tag!r} (up to 128 letters, digits, "
            "'_', '.' or '-', not starting with '.' or '-')"
        )


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    # The first component is a registry only if it looks like a host: a dot, a port, the word
    # localhost, or capitals (repository paths are lowercase). Otherwise it is a Hub user.
    looks_like_host = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if not slash or not looks_like_host:
        domain, path = DEFAULT_DOMAIN, name
    else:
        domain, path = first, rest
    if domain in _LEGACY_DOMAINS:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = _OFFICIAL_PREFIX + path
    return domain, path
