"""The distribution API of one registry: manifests and blobs, read and written.

:class:`Registry` speaks the OCI distribution spec (``/v2/``) to one host. Everything it
receives is checked before anyone sees it as good:

* a manifest is at most :data:`MANIFEST_LIMIT` bytes; its digest is computed from the bytes,
  compared with the reference when that is a digest and with ``Docker-Content-Digest`` when
  the registry sends one;
* a blob is read through a :class:`BlobReader`, which refuses a byte more than the
  descriptor's size and checks the size and digest when the last byte arrives, *before*
  handing that byte over; a connection lost mid-blob is resumed with a ``Range`` request (a
  few times), so one reset does not restart a 100 MB layer.

Uploads skip blobs the registry has (``HEAD``), try a cross-repository mount when the caller
names repositories of the same registry that have the blob, and otherwise send the blob in
one ``PUT`` (up to :data:`MONOLITHIC_LIMIT` bytes) or in ``PATCH`` chunks of
:data:`CHUNK_SIZE` with ``Content-Range``. A failed chunk (a 5xx, a lost connection, an upload
the registry forgot) restarts the upload from scratch, up to :data:`UPLOAD_ATTEMPTS` times.

``docker.io`` is reached at ``registry-1.docker.io``, as docker does; credentials and messages
keep the name ``docker.io``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Collection, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Literal
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit, urlunsplit

from runtime.errors import AuthError, RegistryError, SpecError
from runtime.image import manifest as mf
from runtime.image.reference import DEFAULT_DOMAIN, check_digest
from runtime.registry.auth import Authenticator, CredentialLookup, pull_scope, push_scope
from runtime.registry.http import HttpClient, Payload, Response, scheme_for

__all__ = [
    "CHUNK_SIZE",
    "DOCKER_HUB_API_HOST",
    "MANIFEST_ACCEPT",
    "MANIFEST_LIMIT",
    "MONOLITHIC_LIMIT",
    "BlobReader",
    "FetchedManifest",
    "ManifestInfo",
    "Registry",
    "UploadOutcome",
    "api_host",
    "digest_of",
    "with_query",
]

DOCKER_HUB_API_HOST = "registry-1.docker.io"
MANIFEST_LIMIT = 4 << 20
"""Largest manifest or index accepted (the distribution registry refuses to store more)."""
MONOLITHIC_LIMIT = 64 << 20
"""Blobs up to this size go up in one ``PUT``; bigger ones in ``PATCH`` chunks."""
CHUNK_SIZE = 64 << 20
"""Why these sizes (measured against distribution 2.8 on loopback, 128 MiB blob): one ``PUT``
ran at ~160 MB/s, 4-64 MiB chunks at 75-110 MB/s (each chunk is a round trip, and the registry
hashes a chunked upload again at the end). A restart resends the whole blob either way, so
chunks buy nothing but staying under the request-size limits of proxies in front of
registries (often 100 MB): the largest chunk that does is best."""
UPLOAD_ATTEMPTS = 3
RESUME_ATTEMPTS = 3
MAX_MOUNT_SOURCES = 3
READ_CHUNK = 1 << 20
MANIFEST_ACCEPT: tuple[str, ...] = tuple(mf.MANIFEST_ACCEPT)
"""Every manifest and index type we read, in the ``Accept`` of manifest requests."""

UploadOutcome = Literal["exists", "mounted", "uploaded"]


def api_host(registry: str) -> str:
    """The host serving ``registry``'s API: Docker Hub's is not ``docker.io`` itself."""
    return DOCKER_HUB_API_HOST if registry == DEFAULT_DOMAIN else registry


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data`` (sha256 or sha512, the algorithms references allow)."""
    if algorithm not in ("sha256", "sha512"):
        raise RegistryError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query, keeping what is there (an upload URL's
    ``_state``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip()


def _is_digest(reference: str) -> bool:
    try:
        check_digest(reference)
    except SpecError:
        return False
    return True


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    digest: str


@dataclass(frozen=True)
class ManifestInfo:
    """What a ``HEAD`` of a manifest says: its type, digest and size."""

    media_type: str
    digest: str | None
    size: int | None


class Registry:
    """A client of one registry (``127.0.0.1:5000``, ``ghcr.io``, ``docker.io``); thread-safe.

    ``insecure`` lists hosts reached over plain HTTP besides loopback; ``credentials(name)``
    returns the login for a registry name (default: :func:`runtime.registry.credentials.lookup`).
    """

    def __init__(
        self,
        registry: str,
        *,
        insecure: Collection[str] = (),
        http: HttpClient | None = None,
        credentials: CredentialLookup | None = None,
    ) -> None:
        if credentials is None:
            from runtime.registry.credentials import lookup

            credentials = lookup
        self.name = registry
        self.host = api_host(registry)
        self.base = f"{scheme_for(self.host, insecure)}://{self.host}/v2/"
        self._own_http = http is None
        self.http = http or HttpClient()
        self.auth = Authenticator(registry, self.http, credentials=credentials, insecure=insecure)

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- requests with authentication ---

    def request(
        self,
        method: str,
        url: str,
        scopes: Sequence[str],
        *,
        headers: dict[str, str] | None = None,
        body: bytes | Payload | None = None,
        idempotent: bool | None = None,
    ) -> Response:
        """A request carrying the credentials ``scopes`` need; a ``401`` is answered once
        (challenge learned, token fetched or renewed) and a second one raises
        :class:`AuthError`. ``url`` is absolute or relative to ``/v2/``."""
        url = urljoin(self.base, url)
        own = _origin(url) == _origin(self.base)
        for attempt in (0, 1):
            # Credentials only ever go to the registry itself, not to an upload URL elsewhere.
            sent = self.auth.authorization(scopes) if own else None
            sending = dict(headers or {})
            if sent is not None:
                sending["Authorization"] = sent
            response = self.http.request(
                method, url, headers=sending, body=body, idempotent=idempotent
            )
            if response.status != 401 or not own:
                return response
            if attempt == 1:
                response.close()
                raise self.auth.denied(scopes)
            self.auth.challenged(response, scopes, sent)
        raise AssertionError("unreachable")  # pragma: no cover

    def ping(self, *, authenticate: bool = False) -> None:
        """``GET /v2/``: is this a registry? With ``authenticate``, also prove the stored
        credentials work (what ``login`` checks); :class:`AuthError` when they do not."""
        response = self.request("GET", "", ()) if authenticate else None
        if response is None:
            response = self.http.request("GET", self.base)
            if response.status == 401:
                self.auth.learn(response)
                return
        if response.status != 200:
            raise response.error(f"registry {self.name} is not a v2 registry")
        response.close()

    # --- manifests ---

    def _manifest_url(self, repo: str, reference: str) -> str:
        return f"{quote(repo)}/manifests/{quote(reference, safe=':')}"

    def get_manifest(
        self, repo: str, reference: str, *, accept: Sequence[str] = MANIFEST_ACCEPT
    ) -> FetchedManifest:
        """The manifest or index ``repo:reference`` (a tag or a digest), digest verified."""
        url = self._manifest_url(repo, reference)
        response = self.request(
            "GET", url, [pull_scope(repo)], headers={"Accept": ", ".join(accept)}
        )
        where = f"{self.name}/{repo}{'@' if _is_digest(reference) else ':'}{reference}"
        if response.status == 404:
            raise response.error(f"manifest {where} not found")
        if response.status != 200:
            raise response.error(f"cannot get manifest {where}")
        data = response.read_all(MANIFEST_LIMIT, "manifest")
        media_type = _media_type(response.header("Content-Type"))
        header = response.header("Docker-Content-Digest")
        if _is_digest(reference):
            digest = digest_of(data, reference.partition(":")[0])
            if digest != reference:
                raise RegistryError(
                    f"GET {response.url}: the manifest has digest {digest}, not the {reference} "
                    "asked for; refused"
                )
        else:
            digest = digest_of(data)
        if header and _is_digest(header.strip()):
            header = header.strip()
            algorithm = header.partition(":")[0]
            found = digest if digest.startswith(algorithm + ":") else digest_of(data, algorithm)
            if found != header:
                raise RegistryError(
                    f"GET {response.url}: the manifest has digest {found}, but the registry "
                    f"says Docker-Content-Digest {header}; refused"
                )
        return FetchedManifest(data, media_type, digest)

    def head_manifest(
        self,
        repo: str,
        reference: str,
        *,
        accept: Sequence[str] = MANIFEST_ACCEPT,
        push: bool = False,
    ) -> ManifestInfo | None:
        """What the registry has under ``repo:reference``, or ``None`` if nothing."""
        scope = push_scope(repo) if push else pull_scope(repo)
        response = self.request(
            "HEAD",
            self._manifest_url(repo, reference),
            [scope],
            headers={"Accept": ", ".join(accept)},
        )
        if response.status == 404:
            response.close()
            return None
        if response.status != 200:
            raise response.error(f"cannot check manifest {self.name}/{repo}:{reference}")
        info = ManifestInfo(
            _media_type(response.header("Content-Type")),
            response.header("Docker-Content-Digest"),
            response.content_length,
        )
        response.close()
        return info

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        """Store a manifest under a tag or its digest; return its digest (checked against
        what the registry computed)."""
        digest = digest_of(data)
        if _is_digest(reference) and reference != digest:
            raise RegistryError(
                f"cannot push manifest with digest {digest} as {self.name}/{repo}@{reference}"
            )
        response = self.request(
            "PUT",
            self._manifest_url(repo, reference),
            [push_scope(repo)],
            headers={"Content-Type": media_type},
            body=data,
        )
        if response.status not in (200, 201):
            raise response.error(f"cannot push manifest {self.name}/{repo}:{reference}")
        told = response.header("Docker-Content-Digest")
        response.close()
        if told and told.strip() != digest:
            raise RegistryError(
                f"PUT {response.url}: the registry stored the manifest as {told.strip()}, "
                f"but its digest is {digest}"
            )
        return digest

    # --- blobs: reading ---

    def _blob_url(self, repo: str, digest: str) -> str:
        return f"{quote(repo)}/blobs/{quote(digest, safe=':')}"

    def blob_exists(self, repo: str, digest: str, *, push: bool = False) -> int | None:
        """The size of blob ``digest`` in ``repo``, or ``None`` if the registry lacks it."""
        scope = push_scope(repo) if push else pull_scope(repo)
        response = self.request("HEAD", self._blob_url(repo, digest), [scope])
        if response.status == 404:
            response.close()
            return None
        if response.status != 200:
            raise response.error(f"cannot check blob {digest} in {self.name}/{repo}")
        size = response.content_length
        response.close()
        return size if size is not None else -1

    def open_blob(self, repo: str, digest: str, size: int) -> BlobReader:
        """A stream of blob ``digest`` of ``size`` bytes, verified as it is read (see
        :class:`BlobReader`)."""
        check_digest(digest)
        if size < 0:
            raise RegistryError(f"blob {digest} has a negative size {size}")
        response = self._get_blob(repo, digest, 0)
        return BlobReader(self, repo, digest, size, response)

    def get_blob(self, repo: str, digest: str, size: int, *, limit: int) -> bytes:
        """A small blob (a config) read whole; refused when ``size`` is over ``limit``."""
        if size > limit:
            raise RegistryError(
                f"blob {digest} in {self.name}/{repo} is {size} bytes, more than the {limit} "
                "allowed for it"
            )
        with self.open_blob(repo, digest, size) as reader:
            return reader.read()

    def _get_blob(self, repo: str, digest: str, offset: int) -> Response:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.request(
            "GET", self._blob_url(repo, digest), [pull_scope(repo)], headers=headers
        )
        if response.status == 404:
            raise response.error(f"blob {digest} not found in {self.name}/{repo}")
        if response.status not in (200, 206):
            raise response.error(f"cannot get blob {digest} from {self.name}/{repo}")
        return response

    # --- blobs: writing ---

    def upload_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        source: bytes | Callable[[], BinaryIO],
        *,
        mount_from: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
        monolithic_limit: int = MONOLITHIC_LIMIT,
        chunk_size: int = CHUNK_SIZE,
    ) -> UploadOutcome:
        """Make blob ``digest`` (``size`` bytes) present in ``repo``; say how.

        ``source`` is the bytes, or opens a fresh reader of them (it is opened again for each
        chunk and each restart). ``mount_from`` names other repositories of this registry that
        may have the blob (tried in order, at most :data:`MAX_MOUNT_SOURCES`). ``progress``
        receives the bytes sent so far (it starts again from 0 after a restart).
        """
        check_digest(digest)
        have = self.blob_exists(repo, digest, push=True)
        if have is not None:
            if have not in (-1, size):
                raise RegistryError(
                    f"registry {self.name} has blob {digest} in {repo} with {have} bytes, "
                    f"not {size}"
                )
            return "exists"
        session: str | None = None
        for source_repo in [r for r in mount_from if r != repo][:MAX_MOUNT_SOURCES]:
            if session is not None:
                self._cancel(repo, session)
            try:
                mounted, session = self._mount(repo, digest, source_repo)
            except AuthError:
                break  # no read access to the source: send the blob instead, as docker does
            if mounted:
                return "mounted"
        opener = _opener(source)
        problem: RegistryError | None = None
        for _ in range(UPLOAD_ATTEMPTS):
            try:
                if session is None:
                    session = self._start_upload(repo)
                if size <= monolithic_limit:
                    self._put_whole(repo, session, digest, size, opener, progress)
                else:
                    self._put_chunks(repo, session, digest, size, opener, progress, chunk_size)
                return "uploaded"
            except _Interrupted as e:
                problem = e.error
                if session is not None:
                    self._cancel(repo, session)
                session = None
        raise RegistryError(
            f"upload of blob {digest} to {self.name}/{repo} failed {UPLOAD_ATTEMPTS} times; "
            f"last: {problem}"
        ) from problem

    def _mount(self, repo: str, digest: str, source_repo: str) -> tuple[bool, str | None]:
        query = urlencode({"mount": digest, "from": source_repo})
        response = self.request(
            "POST",
            f"{quote(repo)}/blobs/uploads/?{query}",
            [push_scope(repo), pull_scope(source_repo)],
            idempotent=True,  # a repeated start only opens another upload session
        )
        if response.status == 201:
            response.close()
            return True, None
        if response.status == 202:
            return False, self._location(response)
        raise response.error(f"cannot mount blob {digest} from {source_repo} into {repo}")

    def _start_upload(self, repo: str) -> str:
        try:
            response = self.request(
                "POST", f"{quote(repo)}/blobs/uploads/", [push_scope(repo)], idempotent=True
            )
        except AuthError:
            raise
        except RegistryError as e:
            raise _Interrupted(e) from e
        if response.status != 202:
            error = response.error(f"cannot start an upload to {self.name}/{repo}")
            if response.status >= 500:
                raise _Interrupted(error)
            raise error
        return self._location(response)

    def _location(self, response: Response) -> str:
        location = response.header("Location")
        response.close()
        if not location:
            raise RegistryError(f"{response.method} {response.url}: no Location for the upload")
        return urljoin(response.url, location)

    def _put_whole(
        self,
        repo: str,
        session: str,
        digest: str,
        size: int,
        opener: Callable[[], BinaryIO],
        progress: Callable[[int], None] | None,
    ) -> None:
        payload = Payload(size, _region(opener, 0, size, progress))
        self._send(
            "PUT",
            with_query(session, digest=digest),
            repo,
            {"Content-Type": "application/octet-stream"},
            payload,
            (201,),
        )

    def _put_chunks(
        self,
        repo: str,
        session: str,
        digest: str,
        size: int,
        opener: Callable[[], BinaryIO],
        progress: Callable[[int], None] | None,
        chunk_size: int,
    ) -> None:
        location = session
        for offset in range(0, size, chunk_size):
            length = min(chunk_size, size - offset)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + length - 1}",
            }
            payload = Payload(length, _region(opener, offset, length, progress))
            response = self._send("PATCH", location, repo, headers, payload, (202, 204))
            location = urljoin(response.url, response.header("Location") or location)
            response.close()
        self._send("PUT", with_query(location, digest=digest), repo, {}, None, (201,))

    def _send(
        self,
        method: str,
        url: str,
        repo: str,
        headers: dict[str, str],
        body: Payload | None,
        ok: tuple[int, ...],
    ) -> Response:
        """One request of an upload; what a restart can fix raises :class:`_Interrupted`."""
        try:
            response = self.request(
                method, url, [push_scope(repo)], headers=headers, body=body, idempotent=False
            )
        except AuthError:
            raise
        except RegistryError as e:  # the connection failed
            raise _Interrupted(e) from e
        if response.status in ok:
            return response
        error = response.error(f"upload to {self.name}/{repo}")
        if response.status >= 500 or response.status in (404, 416, 429):
            raise _Interrupted(error)  # server trouble, or it lost the upload: start again
        raise error

    def _cancel(self, repo: str, session: str) -> None:
        """Best effort: tell the registry to drop an upload we abandon."""
        with suppress(RegistryError):
            self.request("DELETE", session, [push_scope(repo)], idempotent=False).close()


class _Interrupted(Exception):
    """An upload step failed in a way that starting the upload again may fix."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(str(error))
        self.error = error


def _opener(source: bytes | Callable[[], BinaryIO]) -> Callable[[], BinaryIO]:
    if isinstance(source, bytes):
        data = source
        return lambda: io.BytesIO(data)
    return source


def _region(
    opener: Callable[[], BinaryIO],
    offset: int,
    length: int,
    progress: Callable[[int], None] | None,
) -> Callable[[], BinaryIO]:
    """Opens ``length`` bytes at ``offset`` of the source, reporting bytes read to
    ``progress`` as offsets from the start of the blob."""

    def open_region() -> BinaryIO:
        stream = opener()
        try:
            if offset:
                if stream.seekable():
                    stream.seek(offset)
                else:
                    _skip(stream, offset)
        except BaseException:
            stream.close()
            raise
        return _Region(stream, offset, length, progress)  # type: ignore[return-value]

    return open_region


def _skip(stream: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(READ_CHUNK, count))
        if not chunk:
            raise RegistryError(f"the blob source ended {count} bytes before the chunk")
        count -= len(chunk)


class _Region:
    def __init__(
        self,
        stream: BinaryIO,
        offset: int,
        length: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self._stream = stream
        self._position = offset
        self._left = length
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size < 0 else min(size, self._left)
        data = self._stream.read(want)
        self._left -= len(data)
        self._position += len(data)
        if self._progress is not None and data:
            self._progress(self._position)
        return data

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> _Region:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class BlobReader:
    """A blob from the registry, checked as it streams.

    At most ``size`` bytes are ever handed out: a longer body is refused as soon as it shows,
    so an endless body costs neither memory nor disk. When the last byte arrives the digest is
    compared before that byte is returned, so a consumer never sees the whole of wrong content
    as good; a body that ends early is resumed with ``Range`` a few times, then refused.
    Every refusal is a :class:`RegistryError` naming the blob and the registry.
    """

    def __init__(
        self, registry: Registry, repo: str, digest: str, size: int, response: Response
    ) -> None:
        self._registry = registry
        self._repo = repo
        self.digest = digest
        self.size = size
        self._response: Response | None = response
        self._hash = hashlib.new(digest.partition(":")[0])
        self.done = 0
        self._resumes = 0
        self._check_length(response, 0)

    @property
    def _where(self) -> str:
        return f"blob {self.digest} from {self._registry.name}/{self._repo}"

    def _check_length(self, response: Response, offset: int) -> None:
        length = response.content_length
        if length is not None and length != self.size - offset:
            response.close()
            self._response = None
            raise RegistryError(
                f"{self._where}: the registry sends {offset + length} bytes, but the blob has "
                f"{self.size}; refused"
            )

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left if negative); ``b""`` at the end."""
        if size < 0:
            parts = []
            while chunk := self.read(READ_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        left = self.size - self.done
        if left == 0:
            self._expect_end()
            return b""
        data = self._read_some(min(size, left))
        self.done += len(data)
        self._hash.update(data)
        if self.done == self.size:
            found = f"{self._hash.name}:{self._hash.hexdigest()}"
            if found != self.digest:
                self.close()
                raise RegistryError(f"{self._where}: the content has digest {found}; refused")
        return data

    def _read_some(self, want: int) -> bytes:
        while True:
            response = self._response
            if response is None:
                raise RegistryError(f"{self._where}: read after close")
            try:
                data = response.read(want)
            except RegistryError as e:
                self._resume(e)
                continue
            if data:
                return data
            self._resume(
                RegistryError(
                    f"{self._where}: the body ended after {self.done} of {self.size} bytes"
                )
            )

    def _resume(self, problem: RegistryError) -> None:
        """Ask again for the rest of the blob, from where it broke off."""
        if self._response is not None:
            self._response.abort()
            self._response = None
        if self._resumes >= RESUME_ATTEMPTS:
            raise RegistryError(
                f"{self._where}: truncated after {self.done} of {self.size} bytes, "
                f"{self._resumes} resumes failed: {problem}"
            ) from problem
        self._resumes += 1
        response = self._registry._get_blob(self._repo, self.digest, self.done)
        if response.status == 206:
            self._check_range(response)
            self._check_length(response, self.done)
        else:  # the registry ignored Range: skip what we have
            self._check_length(response, 0)
            skip = self.done
            while skip:
                chunk = response.read(min(READ_CHUNK, skip))
                if not chunk:
                    break
                skip -= len(chunk)
        self._response = response

    def _check_range(self, response: Response) -> None:
        value = response.header("Content-Range") or ""
        unit, _, spec = value.partition(" ")
        first = spec.partition("-")[0]
        if unit != "bytes" or not first.isdigit() or int(first) != self.done:
            response.close()
            self._response = None
            raise RegistryError(
                f"{self._where}: asked for bytes from {self.done}, got Content-Range {value!r}"
            )

    def _expect_end(self) -> None:
        """After the last byte: one more byte would be too many."""
        response = self._response
        if response is None:
            return
        length = response.content_length
        if length is None:
            extra = response.read(1)
            if extra:
                self.close()
                raise RegistryError(
                    f"{self._where}: the registry sends more than the blob's {self.size} "
                    "bytes; refused"
                )
        response.close()
        self._response = None

    def close(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            if self.done == self.size:
                response.close()
            else:
                response.abort()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
