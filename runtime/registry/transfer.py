"""``pull`` and ``push``: images between the store and a registry.

A pull reads the manifest (by tag or digest; an index is narrowed to this host's platform, or
the one asked for), the config, and then downloads the layers the store lacks, several at a
time, each streamed once straight into :func:`runtime.image.exchange.import_layer` (blob kept,
layer unpacked and verified in the same pass). Only when every layer is in does
:func:`runtime.image.exchange.import_image` record the image and its tags. A failure anywhere
stops the other downloads and leaves no image, no tag, and no half of anything: a layer is
stored whole or not at all (that is the store's and exchange's promise); whole layers already
imported stay, as reusable cache for the next attempt, and ``prune`` takes them if none comes.

A push exports the image (:func:`runtime.image.exchange.export_image`: a pulled image keeps its
manifest and digests), sends the layer blobs in parallel (the registry's own ``HEAD`` skips
those it has; a cross-repository mount is tried from repositories of the same registry that
this store knows hold the layer), then the config, then the manifest under the tag.

Where the store knows a blob lives: the *digest references* recorded by pulls and pushes
(``registry/repo@sha256:...``, tags in the store) and the tags of the same registry name the
repositories an image went to or came from; its layers are there. That is derived from the tags,
never stored separately, so it cannot go stale beyond what a mount attempt costs (one request,
whose upload session is then used).

Progress: ``progress(event)`` receives :class:`TransferEvent` objects, one at a time (calls are
serialized, so a display needs no lock), from the worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Literal

from runtime.errors import ImageNotFound, RegistryError, SpecError
from runtime.image import exchange
from runtime.image import manifest as mf
from runtime.image.config import ImageConfig
from runtime.image.reference import Reference, parse
from runtime.image.store import Store
from runtime.registry.auth import CredentialLookup
from runtime.registry.client import BlobReader, Registry
from runtime.registry.http import HttpClient

__all__ = [
    "CONFIG_LIMIT",
    "PullResult",
    "PushResult",
    "TransferEvent",
    "mount_sources",
    "pull",
    "push",
]

CONFIG_LIMIT = 8 << 20
"""Largest image config accepted (real ones are kilobytes; a long history, a few hundred)."""
PROGRESS_STEP = 1 << 20
"""Bytes between two progress events of one blob."""

State = Literal[
    "waiting", "present", "downloading", "exists", "mounted", "uploading", "done", "failed"
]


@dataclass(frozen=True)
class TransferEvent:
    """What happens to one layer blob.

    ``state``: ``waiting`` (queued), ``present`` (the store has it: no download),
    ``downloading`` / ``uploading`` (``done`` of ``total`` bytes), ``exists`` (the registry has
    it), ``mounted`` (from another repository), ``done``, ``failed``.
    """

    digest: str
    done: int
    total: int
    state: State


Progress = Callable[[TransferEvent], None]


@dataclass(frozen=True)
class PullResult:
    """What a pull stored: the image, the reference tagged, and the digests it resolved to.

    ``digest`` is what the reference pointed to (an index for a multi-platform image: pull
    ``name@digest`` for the same thing again); ``manifest_digest`` the platform's manifest.
    """

    image_id: str
    reference: str
    digest: str
    manifest_digest: str
    platform: mf.Platform | None
    layers: int
    downloaded: int
    bytes: int


@dataclass(frozen=True)
class PushResult:
    """What a push did: the manifest ``digest`` stored under ``reference``, and per layer
    blob whether it was uploaded, mounted or already there."""

    image_id: str
    reference: str
    digest: str
    uploaded: int
    mounted: int
    existed: int
    bytes: int


# --- pull ---------------------------------------------------------------------------------------


def pull(
    store: Store,
    ref: str,
    *,
    platform: mf.Platform | None = None,
    insecure: Collection[str] = (),
    progress: Progress | None = None,
    jobs: int = 4,
    http: HttpClient | None = None,
    credentials: CredentialLookup | None = None,
) -> PullResult:
    """Pull ``ref`` (``busybox``, ``host:5000/app:v1``, ``name@sha256:...``) into ``store``.

    ``platform`` picks an index's entry (default: this host's); ``jobs`` layers download at
    once; ``http`` shares a connection pool between calls; ``credentials`` replaces the
    stored logins (:func:`runtime.registry.credentials.lookup`). Raises :class:`SpecError` for
    a bad reference, :class:`AuthError`, :class:`RegistryError` for what the registry did or
    sent, :class:`ImageNotFound` when the image has no manifest for the platform, and the
    store's errors (:class:`LayerError` for a hostile layer). On any error, no image or tag is
    recorded.
    """
    _check_jobs(jobs)
    reference = parse(ref)
    report = _Reporter(progress)
    with Registry(
        reference.domain, insecure=insecure, http=http, credentials=credentials
    ) as registry:
        repo = reference.path
        found = _resolve(registry, reference, platform)
        manifest = found.manifest
        config_bytes = registry.get_blob(
            repo, manifest.config.digest, manifest.config.size, limit=CONFIG_LIMIT
        )
        diff_ids = _diff_ids(config_bytes, reference, manifest)
        with store.guard():
            work = _pending(store, manifest.layers, diff_ids, report)
            sizes = _run_parallel(
                [partial(_download, store, registry, repo, d, i, report) for d, i in work],
                jobs,
                report,
                [d for d, _ in work],
            )
            tag = None if reference.digest else reference.canonical
            image_id = exchange.import_image(
                store, config_bytes, manifest, manifest_bytes=found.data, ref=tag
            )
            store.tag(f"{reference.name}@{found.top_digest}", image_id)
    return PullResult(
        image_id=image_id,
        reference=tag or f"{reference.name}@{found.top_digest}",
        digest=found.top_digest,
        manifest_digest=found.digest,
        platform=found.platform,
        layers=len(manifest.layers),
        downloaded=len(work),
        bytes=sum(sizes),
    )


@dataclass(frozen=True)
class _Resolved:
    """The manifest a reference leads to on this platform, and the digest it was found by."""

    top_digest: str
    manifest: mf.Manifest
    data: bytes
    digest: str
    platform: mf.Platform | None


def _resolve(registry: Registry, reference: Reference, platform: mf.Platform | None) -> _Resolved:
    """Fetch the manifest of ``reference``, through its index entry for ``platform`` if it
    is an index; refuse what cannot be pulled (foreign layers, nested indexes)."""
    repo = reference.path
    top = registry.get_manifest(repo, reference.digest or reference.tag or "latest")
    parsed = _parse(top.data, top.media_type, f"{reference.name}@{top.digest}")
    fetched, chosen = top, None
    if isinstance(parsed, mf.Index):
        try:
            entry = mf.select_platform(parsed, platform)
        except SpecError as e:
            raise ImageNotFound(f"{reference.familiar}: {e}") from e
        chosen = entry.platform
        fetched = registry.get_manifest(repo, entry.digest)
        where = f"{reference.name}@{entry.digest}"
        if len(fetched.data) != entry.size:
            raise RegistryError(
                f"{where}: the manifest has {len(fetched.data)} bytes, the index says {entry.size}"
            )
        parsed = _parse(fetched.data, fetched.media_type, where)
        if isinstance(parsed, mf.Index):
            raise RegistryError(f"{where}: an index inside an index; not supported")
    for layer in parsed.layers:
        if mf.is_foreign(layer.media_type):
            raise RegistryError(
                f"{reference.familiar}: layer {layer.digest} is a foreign layer "
                f"({layer.media_type}), which registries do not serve"
            )
    return _Resolved(top.digest, parsed, fetched.data, fetched.digest, chosen)


def _parse(data: bytes, media_type: str, where: str) -> mf.Manifest | mf.Index:
    try:
        return mf.parse_manifest(data, media_type or None)
    except SpecError as e:
        raise RegistryError(f"{where}: the registry sent an invalid manifest: {e}") from e


def _diff_ids(config_bytes: bytes, reference: Reference, manifest: mf.Manifest) -> tuple[str, ...]:
    try:
        diff_ids = ImageConfig.from_json(config_bytes).diff_ids
    except SpecError as e:
        raise RegistryError(f"{reference.familiar}: the image config is invalid: {e}") from e
    if len(diff_ids) != len(manifest.layers):
        raise RegistryError(
            f"{reference.familiar}: the manifest has {len(manifest.layers)} layers but the "
            f"config {len(diff_ids)} diff ids"
        )
    return diff_ids


def _pending(
    store: Store,
    layers: Iterable[mf.Descriptor],
    diff_ids: Iterable[str],
    report: _Reporter,
) -> list[tuple[mf.Descriptor, str]]:
    """The layers to download: those the store lacks, each blob once."""
    work: dict[str, tuple[mf.Descriptor, str]] = {}
    for descriptor, diff_id in zip(layers, diff_ids, strict=True):
        if descriptor.digest in work:
            continue
        if exchange.layer_needed(store, descriptor, diff_id):
            work[descriptor.digest] = (descriptor, diff_id)
            report(TransferEvent(descriptor.digest, 0, descriptor.size, "waiting"))
        else:
            report(TransferEvent(descriptor.digest, descriptor.size, descriptor.size, "present"))
    return list(work.values())


def _download(
    store: Store,
    registry: Registry,
    repo: str,
    descriptor: mf.Descriptor,
    diff_id: str,
    report: _Reporter,
) -> int:
    with registry.open_blob(repo, descriptor.digest, descriptor.size) as reader:
        counted = _Counting(reader, descriptor, "downloading", report)
        exchange.import_layer(store, descriptor, diff_id, counted)  # type: ignore[arg-type]
    report(TransferEvent(descriptor.digest, descriptor.size, descriptor.size, "done"))
    return descriptor.size


# --- push ---------------------------------------------------------------------------------------


def push(
    store: Store,
    source_ref_or_id: str,
    dest_ref: str,
    *,
    docker_format: bool = False,
    insecure: Collection[str] = (),
    progress: Progress | None = None,
    jobs: int = 4,
    http: HttpClient | None = None,
    credentials: CredentialLookup | None = None,
) -> PushResult:
    """Push the image ``source_ref_or_id`` names to ``dest_ref`` (a tag, or a digest that must
    be the manifest's); return the manifest digest.

    The manifest sent is the one recorded for the image (a pulled image keeps its digests)
    or a new OCI one; ``docker_format`` makes a Docker v2 schema 2 manifest instead. Afterwards
    ``dest@digest`` is tagged in the store (what docker shows as RepoDigests), which later
    pushes use to mount layers from. Raises :class:`ImageNotFound`, :class:`SpecError`,
    :class:`AuthError`, :class:`RegistryError`.
    """
    _check_jobs(jobs)
    dest = parse(dest_ref)
    report = _Reporter(progress)
    exported = exchange.export_image(
        store, source_ref_or_id, docker=True if docker_format else None
    )
    if dest.digest is not None and dest.digest != exported.manifest_digest:
        raise SpecError(
            f"cannot push {source_ref_or_id!r} as {dest.familiar}: its manifest digest is "
            f"{exported.manifest_digest}"
        )
    sources = mount_sources(store, dest.domain, [layer.diff_id for layer in exported.layers])
    blobs: dict[str, exchange.LayerBlob] = {}
    for layer in exported.layers:
        if not mf.is_foreign(layer.descriptor.media_type):  # those are never pushed
            blobs.setdefault(layer.descriptor.digest, layer)
    outcomes: dict[str, str] = {}
    with Registry(dest.domain, insecure=insecure, http=http, credentials=credentials) as registry:
        for digest, layer in blobs.items():
            report(TransferEvent(digest, 0, layer.descriptor.size, "waiting"))
        _run_parallel(
            [
                partial(
                    _upload,
                    store,
                    registry,
                    dest.path,
                    layer,
                    [r for r in sources.get(layer.diff_id, ()) if r != dest.path],
                    report,
                    outcomes,
                )
                for layer in blobs.values()
            ],
            jobs,
            report,
            [layer.descriptor for layer in blobs.values()],
        )
        config = exported.config
        registry.upload_blob(
            dest.path,
            config.digest,
            config.size,
            exported.config_bytes,
            mount_from=_image_repositories(store, exported.image_id, dest),
        )
        digest = registry.put_manifest(
            dest.path, dest.tag or exported.manifest_digest, exported.manifest, exported.media_type
        )
    store.tag(f"{dest.name}@{digest}", exported.image_id)
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("uploaded", "mounted")}
    return PushResult(
        image_id=exported.image_id,
        reference=dest.canonical if dest.tag else f"{dest.name}@{digest}",
        digest=digest,
        uploaded=counts["uploaded"],
        mounted=counts["mounted"],
        existed=len(blobs) - counts["uploaded"] - counts["mounted"],
        bytes=sum(blobs[d].descriptor.size for d, v in outcomes.items() if v == "uploaded"),
    )


def mount_sources(store: Store, registry: str, diff_ids: Iterable[str]) -> dict[str, list[str]]:
    """For each layer, repositories of ``registry`` that the store's tags say hold it.

    Digest references (recorded by pull and push: the image really is there) come before
    plain tags (which may only have been tagged locally).
    """
    wanted = set(diff_ids)
    found: dict[str, dict[str, int]] = {d: {} for d in wanted}
    for image in store.list_images():
        layers = wanted.intersection(image.config.diff_ids)
        if not layers:
            continue
        for tag in image.tags:
            try:
                ref = parse(tag)
            except SpecError:
                continue
            if ref.domain != registry:
                continue
            rank = 0 if ref.digest else 1
            for diff_id in layers:
                known = found[diff_id].get(ref.path, rank)
                found[diff_id][ref.path] = min(known, rank)
    return {d: sorted(repos, key=lambda r: (repos[r], r)) for d, repos in found.items() if repos}


def _image_repositories(store: Store, image_id: str, dest: Reference) -> list[str]:
    """Other repositories of the destination registry that hold this very image (its config)."""
    repos: dict[str, int] = {}
    for tag in store.get_image(image_id).tags:
        try:
            ref = parse(tag)
        except SpecError:
            continue
        if ref.domain == dest.domain and ref.path != dest.path:
            repos[ref.path] = min(repos.get(ref.path, 1), 0 if ref.digest else 1)
    return sorted(repos, key=lambda r: (repos[r], r))


def _upload(
    store: Store,
    registry: Registry,
    repo: str,
    layer: exchange.LayerBlob,
    mount_from: list[str],
    report: _Reporter,
    outcomes: dict[str, str],
) -> int:
    descriptor = layer.descriptor

    def sent(done: int) -> None:
        report.bytes(descriptor, done, "uploading")

    outcome = registry.upload_blob(
        repo,
        descriptor.digest,
        descriptor.size,
        lambda: store.open_blob(descriptor.digest),
        mount_from=mount_from,
        progress=sent,
    )
    outcomes[descriptor.digest] = outcome
    state: State = "done" if outcome == "uploaded" else outcome
    report(TransferEvent(descriptor.digest, descriptor.size, descriptor.size, state))
    return descriptor.size if outcome == "uploaded" else 0


# --- shared: parallel work, progress ------------------------------------------------------------


def _check_jobs(jobs: int) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SpecError(f"jobs must be a positive number of parallel transfers, not {jobs!r}")


class _Cancelled(Exception):
    """Another transfer of the same pull or push failed: this one stops."""


class _Reporter:
    """Serializes progress events, throttles byte counts, and carries the stop signal."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}
        self.stop = threading.Event()

    def __call__(self, event: TransferEvent) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(event)

    def bytes(self, descriptor: mf.Descriptor, done: int, state: State) -> None:
        """A byte count, reported at the start, every :data:`PROGRESS_STEP` bytes, at the end
        and after a restart; raises :class:`_Cancelled` when the transfer should stop."""
        if self.stop.is_set():
            raise _Cancelled()
        last = self._last.get(descriptor.digest)
        end = descriptor.size
        if last is None or done < last or done - last >= PROGRESS_STEP or end == done != last:
            self._last[descriptor.digest] = done
            self(TransferEvent(descriptor.digest, done, descriptor.size, state))


class _Counting:
    """A reader that reports progress and stops when the transfer is cancelled."""

    def __init__(
        self, inner: BlobReader, descriptor: mf.Descriptor, state: State, report: _Reporter
    ) -> None:
        self._inner = inner
        self._descriptor = descriptor
        self._state: State = state
        self._report = report
        self._done = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._done += len(data)
        self._report.bytes(self._descriptor, self._done, self._state)
        return data


def _run_parallel(
    tasks: list[Callable[[], int]],
    jobs: int,
    report: _Reporter,
    descriptors: list[mf.Descriptor],
) -> list[int]:
    """Run ``tasks`` on up to ``jobs`` threads; on the first failure stop the rest and raise it."""
    if not tasks:
        return []
    pool = ThreadPoolExecutor(max_workers=min(jobs, len(tasks)))
    futures: list[Future[int]] = []
    try:
        futures = [pool.submit(task) for task in tasks]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            report.stop.set()
    except BaseException:  # Ctrl-C while waiting: the workers stop at their next read
        report.stop.set()
        raise
    finally:
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)
    if failed is not None:
        for future, descriptor in zip(futures, descriptors, strict=True):
            if future.cancelled() or future.exception() is not None:
                report(TransferEvent(descriptor.digest, 0, descriptor.size, "failed"))
        error = failed.exception()
        assert error is not None
        raise error
    return [f.result() for f in futures]
