"""Image manifests and indexes (OCI and Docker v2 schema 2): parse, choose a platform, write.

A registry, an OCI image layout and a ``docker save`` archive all describe an image the same
way: a *manifest* names the config blob and the layer blobs by :class:`Descriptor` (media type,
digest, size), and an *index* (Docker: *manifest list*) names one manifest per platform. This
module is pure: bytes in, frozen dataclasses out, and back. Fetching, verifying digests and
storing belong to the callers (:mod:`runtime.image.exchange`, the registry client, archives).

Why we are strict about media types: the same JSON could be read as a manifest or an index,
and a registry (or an archive) that says one thing and sends the other is confused or hostile.
When both the transport (``Content-Type``) and the body name a manifest type, they must agree.
Docker's schema 1 (signed, v1 ids, no config blob) is refused with a message saying so.

Errors are :class:`SpecError` naming the field (``layers[2].digest``), as for image configs;
callers add where the bytes came from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from runtime.errors import SpecError
from runtime.image.config import FrozenDict, host_architecture
from runtime.image.reference import check_digest

__all__ = [
    "ANNOTATION_REF_NAME",
    "ATTESTATION_ANNOTATION",
    "DOCKER_CONFIG",
    "DOCKER_FOREIGN_LAYER",
    "DOCKER_LAYER",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_SCHEMA1_MANIFEST",
    "DOCKER_SCHEMA1_SIGNED",
    "INDEX_TYPES",
    "MANIFEST_ACCEPT",
    "MANIFEST_TYPES",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "OCI_NONDIST_LAYER",
    "OCI_NONDIST_LAYER_GZIP",
    "OCI_NONDIST_LAYER_ZSTD",
    "Descriptor",
    "Index",
    "Manifest",
    "Platform",
    "host_platform",
    "is_foreign",
    "layer_compression",
    "make_index",
    "make_manifest",
    "parse_manifest",
    "select_platform",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_NONDIST_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_NONDIST_LAYER_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_NONDIST_LAYER_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_ACCEPT = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
"""What to send in ``Accept`` when asking a registry for a manifest, most wanted first."""

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
"""BuildKit marks attestation manifests (SBOM, provenance) in an index with this annotation."""

_SCHEMA1 = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED})
_GZIP_LAYERS = frozenset(
    {OCI_LAYER_GZIP, OCI_NONDIST_LAYER_GZIP, DOCKER_LAYER_GZIP, DOCKER_FOREIGN_LAYER}
)
_ZSTD_LAYERS = frozenset({OCI_LAYER_ZSTD, OCI_NONDIST_LAYER_ZSTD})
_PLAIN_LAYERS = frozenset({OCI_LAYER, OCI_NONDIST_LAYER, DOCKER_LAYER})
_FOREIGN_LAYERS = frozenset(
    {OCI_NONDIST_LAYER, OCI_NONDIST_LAYER_GZIP, OCI_NONDIST_LAYER_ZSTD, DOCKER_FOREIGN_LAYER}
)
_MAX_MANIFEST = 4 << 20
"""Registries refuse manifests above 4 MiB; a bigger one is not a manifest."""


@dataclass(frozen=True)
class Platform:
    """Where an image runs, in OCI (GOOS/GOARCH) spelling: ``linux/arm64/v8``."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def to_dict(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True)
class Descriptor:
    """A reference to a blob: what it is (``media_type``), its ``digest`` and ``size`` in bytes.

    ``platform`` is set on the entries of an index; ``urls`` on foreign (non-distributable)
    layers, which registries do not serve.
    """

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: FrozenDict[str, str] = field(default_factory=FrozenDict)
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_digest(self.digest)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise SpecError(f"descriptor {self.digest}: size must be >= 0, not {self.size!r}")
        if not isinstance(self.annotations, FrozenDict):
            object.__setattr__(self, "annotations", FrozenDict(self.annotations))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in the conventional key order."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            out["platform"] = self.platform.to_dict()
        return out


@dataclass(frozen=True)
class Manifest:
    """An image manifest: the config blob and the layer blobs, bottom layer first."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    media_type: str = OCI_MANIFEST
    annotations: FrozenDict[str, str] = field(default_factory=FrozenDict)

    @property
    def docker(self) -> bool:
        """Is this a Docker v2 schema 2 manifest (rather than OCI)?"""
        return self.media_type == DOCKER_MANIFEST


@dataclass(frozen=True)
class Index:
    """An image index (Docker: manifest list): one manifest per platform, maybe attestations."""

    manifests: tuple[Descriptor, ...]
    media_type: str = OCI_INDEX
    annotations: FrozenDict[str, str] = field(default_factory=FrozenDict)


# --- what a layer media type means ------------------------------------------------------------


def layer_compression(media_type: str) -> Literal["gzip", "zstd", "none"]:
    """How a layer blob of this media type is compressed; :class:`SpecError` if not a layer."""
    if media_type in _GZIP_LAYERS:
        return "gzip"
    if media_type in _ZSTD_LAYERS:
        return "zstd"
    if media_type in _PLAIN_LAYERS:
        return "none"
    raise SpecError(f"{media_type!r} is not a layer media type this engine knows")


def is_foreign(media_type: str) -> bool:
    """Is this a non-distributable layer (registries may not have it; it names ``urls``)?"""
    return media_type in _FOREIGN_LAYERS


# --- parsing --------------------------------------------------------------------------------


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """Parse manifest or index bytes; ``media_type`` is the transport's (``Content-Type``).

    A ``Content-Type`` with parameters (``; charset=utf-8``) is fine; a generic one
    (``application/json``, ``application/octet-stream``) or ``None`` defers to the body's
    ``mediaType``, and a body without one is OCI: a manifest when it has ``config``, an index
    when it has ``manifests``.
    """
    if len(data) > _MAX_MANIFEST:
        raise SpecError(f"manifest: {len(data)} bytes is more than the {_MAX_MANIFEST} allowed")
    declared = _bare_type(media_type)
    if declared in _SCHEMA1:
        raise _schema1()
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"manifest: not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise SpecError("manifest: expected a JSON object")
    version = body.get("schemaVersion")
    if version == 1 or body.get("mediaType") in _SCHEMA1:
        raise _schema1()
    if isinstance(version, bool) or version != 2:
        raise SpecError(f"manifest: schemaVersion: expected 2, got {json.dumps(version)}")
    inner = body.get("mediaType")
    if inner is not None and not isinstance(inner, str):
        raise SpecError(f"manifest: mediaType: expected a string, got {json.dumps(inner)[:80]}")
    kind = _kind_of(declared, inner, body)
    annotations = _annotations(body.get("annotations"), "annotations")
    if kind in INDEX_TYPES:
        entries = _list(body.get("manifests"), "manifests")
        return Index(
            tuple(_descriptor(e, f"manifests[{i}]") for i, e in enumerate(entries)),
            kind,
            annotations,
        )
    config = _descriptor(body.get("config"), "config")
    layers = _list(body.get("layers"), "layers")
    return Manifest(
        config,
        tuple(_descriptor(e, f"layers[{i}]") for i, e in enumerate(layers)),
        kind,
        annotations,
    )


def _schema1() -> SpecError:
    return SpecError(
        "manifest: Docker schema 1 manifests (v1 image ids, signed JSON) are not supported; "
        "push the image again with a current client to get a schema 2 or OCI manifest"
    )


def _bare_type(media_type: str | None) -> str | None:
    if media_type is None:
        return None
    bare = media_type.split(";", 1)[0].strip().lower()
    return bare or None


def _kind_of(declared: str | None, inner: str | None, body: Mapping[str, Any]) -> str:
    known = MANIFEST_TYPES | INDEX_TYPES
    if declared in known and inner in known and declared != inner:
        raise SpecError(f"manifest: mediaType is {inner!r} but it was served as {declared!r}")
    kind = inner if inner in known else declared if declared in known else None
    if inner is not None and inner not in known:
        raise SpecError(f"manifest: mediaType {inner!r} is not a manifest or index type")
    if kind is None:
        if "manifests" in body and "config" not in body:
            kind = OCI_INDEX
        elif "config" in body and "manifests" not in body:
            kind = OCI_MANIFEST
        else:
            where = f" (served as {declared!r})" if declared else ""
            raise SpecError(f"manifest: cannot tell a manifest from an index{where}")
    # OCI: a manifest has no "manifests" and an index no "config": guards a confusion attack.
    if kind in INDEX_TYPES and "config" in body:
        raise SpecError(f"manifest: an index ({kind}) must not have a 'config'")
    if kind in MANIFEST_TYPES and "manifests" in body:
        raise SpecError(f"manifest: a manifest ({kind}) must not have 'manifests'")
    return kind


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise SpecError(f"manifest: {where}: expected a list, got {json.dumps(value)[:80]}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SpecError(f"manifest: {where}: expected a string, got {json.dumps(value)[:80]}")
    return value


def _annotations(value: Any, where: str) -> FrozenDict[str, str]:
    if value is None:
        return FrozenDict()
    if not isinstance(value, dict):
        raise SpecError(f"manifest: {where}: expected an object of strings")
    return FrozenDict((k, _str(v, f"{where}.{k}")) for k, v in value.items())


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise SpecError(f"manifest: {where}: expected an object, got {json.dumps(value)[:80]}")
    media_type = _str(value.get("mediaType"), f"{where}.mediaType")
    digest = _str(value.get("digest"), f"{where}.digest")
    try:
        check_digest(digest)
    except SpecError as e:
        raise SpecError(f"manifest: {where}.digest: {e}") from e
    size = value.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise SpecError(
            f"manifest: {where}.size: expected a byte count >= 0, got {json.dumps(size)[:80]}"
        )
    urls = [] if value.get("urls") is None else _list(value["urls"], f"{where}.urls")
    url_list = tuple(_str(u, f"{where}.urls[{i}]") for i, u in enumerate(urls))
    platform = value.get("platform")
    return Descriptor(
        media_type,
        digest,
        size,
        None if platform is None else _platform(platform, f"{where}.platform"),
        _annotations(value.get("annotations"), f"{where}.annotations"),
        url_list,
    )


def _platform(value: Any, where: str) -> Platform:
    if not isinstance(value, dict):
        raise SpecError(f"manifest: {where}: expected an object")
    variant = value.get("variant")
    return Platform(
        _str(value.get("os"), f"{where}.os"),
        _str(value.get("architecture"), f"{where}.architecture"),
        None if variant is None else _str(variant, f"{where}.variant"),
    )


# --- platforms ------------------------------------------------------------------------------


_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}
_VARIANT_FALLBACKS = {"arm": ("v7", "v6", "v5")}
"""A v7 machine also runs v6 and v5 code, preferred in that order (as containerd does)."""


def host_platform() -> Platform:
    """This machine: ``linux`` and its architecture (``arm64`` gets variant ``v8``)."""
    arch = host_architecture()
    return Platform("linux", arch, _DEFAULT_VARIANT.get(arch))


def _normal_variant(platform: Platform) -> str | None:
    variant = platform.variant or None
    if platform.architecture == "arm64" and variant in ("v8", "8"):
        return None  # arm64 without a variant means v8
    if platform.architecture == "amd64" and variant == "v1":
        return None
    return variant


def _is_attestation(entry: Descriptor) -> bool:
    if ATTESTATION_ANNOTATION in entry.annotations:
        return True
    p = entry.platform
    return p is not None and p.os == "unknown" and p.architecture == "unknown"


def select_platform(index: Index, platform: Platform | None = None) -> Descriptor:
    """The entry of ``index`` for ``platform`` (default: :func:`host_platform`).

    Attestation entries (``unknown/unknown``, or annotated ``vnd.docker.reference.type``) are
    never chosen. The variant must match, after normalizing (``arm64`` = ``arm64/v8``), except
    that a wanted variant may fall back to an older one the machine also runs (``arm/v7`` takes
    ``v6``), and an entry without a variant matches any wanted variant after exact matches. An
    index whose only real entry has no platform at all gives that entry. The error lists the
    platforms the index has.
    """
    want = platform or host_platform()
    entries = [e for e in index.manifests if not _is_attestation(e)]
    same = [
        e
        for e in entries
        if e.platform is not None
        and e.platform.os == want.os
        and e.platform.architecture == want.architecture
    ]
    wanted = _normal_variant(want)
    order: list[str | None] = [wanted]
    if wanted is not None:
        fallbacks = _VARIANT_FALLBACKS.get(want.architecture, ())
        if wanted in fallbacks:
            order += fallbacks[fallbacks.index(wanted) + 1 :]
    for variant in order:
        for entry in same:
            assert entry.platform is not None
            if _normal_variant(entry.platform) == variant:
                return entry
    for entry in same:
        assert entry.platform is not None
        if entry.platform.variant is None:
            return entry
    if wanted is None and same:
        return same[0]
    if len(entries) == 1 and entries[0].platform is None:
        return entries[0]
    have = sorted({str(e.platform) for e in entries if e.platform is not None})
    listed = ", ".join(have) if have else "none"
    raise SpecError(f"the image index has no manifest for {want}; it has: {listed}")


# --- writing --------------------------------------------------------------------------------


def _dumps(value: Mapping[str, Any]) -> bytes:
    """Compact JSON in the given key order: stable bytes, hence a stable digest."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def make_manifest(
    config: Descriptor,
    layers: Sequence[Descriptor],
    *,
    docker: bool = False,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """The bytes of an image manifest: OCI, or Docker v2 schema 2 with ``docker``.

    The descriptors' media types are written as given; pick them to match (:data:`OCI_CONFIG`
    and :data:`OCI_LAYER_GZIP`, or :data:`DOCKER_CONFIG` and :data:`DOCKER_LAYER_GZIP`).
    Docker's schema has no annotations, so they are refused with ``docker``.
    """
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": config.to_dict(),
        "layers": [layer.to_dict() for layer in layers],
    }
    if annotations:
        if docker:
            raise SpecError("a Docker v2 schema 2 manifest cannot carry annotations")
        body["annotations"] = dict(sorted(annotations.items()))
    return _dumps(body)


def make_index(
    manifests: Sequence[Descriptor],
    *,
    docker: bool = False,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """The bytes of an image index (OCI), or a Docker manifest list with ``docker``."""
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST if docker else OCI_INDEX,
        "manifests": [m.to_dict() for m in manifests],
    }
    if annotations:
        if docker:
            raise SpecError("a Docker manifest list cannot carry annotations")
        body["annotations"] = dict(sorted(annotations.items()))
    return _dumps(body)
