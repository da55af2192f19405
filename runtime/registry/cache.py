"""A build cache kept in a registry, shared by CI agents: ``build --cache-to`` / ``--cache-from``.

BuildKit's registry cache is the model: one reference (``registry/project/cache:main``) holds
the layers a build made and a small document that says which cache key each layer answers.
Here that reference is an ordinary OCI image manifest, so any distribution registry stores it
and garbage collects nothing it refers to:

* ``config``: a blob of media type :data:`CACHE_CONFIG`, canonical JSON
  ``{"records": [{"key": KEY, "diff_id": DIFF_ID, "blob": DIGEST}, ...]}``, sorted by key;
* ``layers``: the compressed layer blobs the records name (each once).

The keys are the store's cache keys (:func:`runtime.build.cachekey.store_key`): they chain the
parent step's key, the instruction as evaluated and the content of what it copies, never a path
or a time of this machine, so the same Dockerfile and context give the same keys on every agent.
(``FROM host`` keys include the host's fingerprint: they only match on an identical host.)

``--cache-to`` exports every layer step of the build, of every stage it built (BuildKit's
``mode=max``), and replaces what the reference held. ``--cache-from`` is read once per build, the
first time a step misses the store; a step it knows is downloaded into the store with its cache
record, and the build goes on as if it had been built here. A cache reference that cannot be
read (missing, unreachable, refused, or not a cache) is a warning and the build goes on without
it, as BuildKit does: a cold cache must never fail a CI run. A layer that fails to download
after the cache said it had it fails the build: that is a broken registry, not a cold cache.

The layers' history timestamps come from when this store got them, so an image built from a
remote cache has the same layers and config as the original but may have another image id.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from runtime.errors import ImageError, IsolateError, RegistryError
from runtime.image import exchange
from runtime.image import manifest as mf
from runtime.image.config import canonical_json
from runtime.image.reference import Reference, check_digest, parse
from runtime.image.store import CacheRecord, Store
from runtime.registry.client import Registry, digest_of
from runtime.registry.http import HttpClient

__all__ = [
    "CACHE_CONFIG",
    "CacheEntry",
    "RegistryCache",
    "cache_config",
    "check_cache_manifest",
    "export_cache",
    "parse_cache_config",
]

CACHE_CONFIG = "application/vnd.pytest-isolate.build-cache.v1+json"
CONFIG_LIMIT = 16 << 20
"""The biggest cache document read (about 100,000 records)."""


@dataclass(frozen=True)
class CacheEntry:
    """One cached step: its store cache key, the layer's diff id, and the blob holding it."""

    key: str
    diff_id: str
    blob: mf.Descriptor


def cache_config(entries: Iterable[CacheEntry]) -> bytes:
    """The cache document for ``entries`` (pure)."""
    records = {e.key: e for e in entries}
    return canonical_json(
        {
            "records": [
                {"key": e.key, "diff_id": e.diff_id, "blob": e.blob.digest}
                for e in sorted(records.values(), key=lambda e: e.key)
            ]
        }
    )


def parse_cache_config(data: bytes, manifest: mf.Manifest, where: str) -> dict[str, CacheEntry]:
    """The records of a cache document, each with its blob's descriptor from ``manifest``.

    Raises :class:`RegistryError` naming ``where`` when the document is not one of ours."""
    check_cache_manifest(manifest, where)
    blobs = {layer.digest: layer for layer in manifest.layers}
    try:
        records = json.loads(data)["records"]
        entries = {}
        for record in records:
            blob = blobs[record["blob"]]
            entry = CacheEntry(str(record["key"]), check_digest(record["diff_id"]), blob)
            entries[entry.key] = entry
    except (ValueError, KeyError, TypeError, IsolateError) as e:
        raise RegistryError(f"{where}: the build cache document is malformed: {e!r}") from e
    return entries


def check_cache_manifest(manifest: mf.Manifest | mf.Index, where: str) -> mf.Manifest:
    """``manifest`` if it is a build cache's; else :class:`RegistryError` saying what it is."""
    if not isinstance(manifest, mf.Manifest):
        raise RegistryError(f"{where} is an index, not a build cache")
    if manifest.config.media_type != CACHE_CONFIG:
        raise RegistryError(
            f"{where} is not a build cache (its config is {manifest.config.media_type}, "
            f"not {CACHE_CONFIG})"
        )
    return manifest


def export_cache(
    store: Store,
    steps: Iterable[tuple[str, str]],
    ref: str,
    *,
    insecure: Collection[str] = (),
    http: HttpClient | None = None,
) -> str:
    """Push the layers of ``steps`` (``(store cache key, diff id)`` pairs) and their cache
    document to ``ref``, replacing what it held; return the manifest digest."""
    dest = _cache_ref(ref)
    entries = [
        CacheEntry(key, diff_id, exchange.layer_descriptor(store, diff_id))
        for key, diff_id in dict(steps).items()
    ]
    config = cache_config(entries)
    config_desc = mf.Descriptor(CACHE_CONFIG, digest_of(config), len(config))
    layers = list({e.blob.digest: e.blob for e in entries}.values())
    manifest = mf.make_manifest(config_desc, layers)
    with Registry(dest.domain, insecure=insecure, http=http) as registry:
        for blob in layers:
            registry.upload_blob(dest.path, blob.digest, blob.size, _opener(store, blob.digest))
        registry.upload_blob(dest.path, config_desc.digest, config_desc.size, config)
        return registry.put_manifest(dest.path, dest.tag or "latest", manifest, mf.OCI_MANIFEST)


class RegistryCache:
    """``--cache-from REF``: a :class:`runtime.build.builder.RemoteCache` backed by a registry.

    ``warn`` receives the one-line reason when the cache cannot be used at all. One client
    (its connections and tokens) serves every step of the build; :meth:`close` it afterwards.
    """

    def __init__(
        self,
        store: Store,
        ref: str,
        *,
        insecure: Collection[str] = (),
        warn: Callable[[str], None] | None = None,
        http: HttpClient | None = None,
    ) -> None:
        self.store = store
        self.ref = _cache_ref(ref)
        self._warn = warn or (lambda _text: None)
        self._registry = Registry(self.ref.domain, insecure=tuple(insecure), http=http)
        self._entries: dict[str, CacheEntry] | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._registry.close()

    def __enter__(self) -> RegistryCache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def entries(self) -> dict[str, CacheEntry]:
        """The cache's records, read on first use; empty (with a warning) when unusable."""
        with self._lock:
            if self._entries is None:
                try:
                    self._entries = self._read()
                except (ImageError, OSError) as e:
                    self._warn(f"cache {self.ref.familiar} not used: {e}")
                    self._entries = {}
            return self._entries

    def _read(self) -> dict[str, CacheEntry]:
        fetched = self._registry.get_manifest(self.ref.path, self.ref.tag or "latest")
        where = f"{self.ref.familiar}@{fetched.digest}"
        manifest = check_cache_manifest(mf.parse_manifest(fetched.data, fetched.media_type), where)
        data = self._registry.get_blob(
            self.ref.path, manifest.config.digest, manifest.config.size, limit=CONFIG_LIMIT
        )
        return parse_cache_config(data, manifest, where)

    def fetch(self, key: str) -> bool:
        entry = self.entries().get(key)
        if entry is None:
            return False
        if exchange.layer_needed(self.store, entry.blob, entry.diff_id):
            with self._registry.open_blob(
                self.ref.path, entry.blob.digest, entry.blob.size
            ) as reader:
                exchange.import_layer(self.store, entry.blob, entry.diff_id, reader)  # type: ignore[arg-type]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.store.put_cache(key, CacheRecord("layer", entry.diff_id, now))
        return True


def _cache_ref(ref: str) -> Reference:
    reference = parse(ref)
    if reference.digest is not None:
        raise RegistryError(f"cache reference {ref!r}: use a tag, not a digest (it is rewritten)")
    return reference


def _opener(store: Store, digest: str) -> Callable[[], BinaryIO]:
    return lambda: store.open_blob(digest)
