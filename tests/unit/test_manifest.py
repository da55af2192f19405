"""Manifests and indexes: parsing (errors name the field), platform choice, writing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runtime.errors import SpecError
from runtime.image import manifest as m
from runtime.image.config import FrozenDict
from runtime.image.manifest import Descriptor, Index, Manifest, Platform

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def oci_manifest(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": m.OCI_MANIFEST,
        "config": {"mediaType": m.OCI_CONFIG, "digest": D1, "size": 10},
        "layers": [
            {"mediaType": m.OCI_LAYER_GZIP, "digest": D2, "size": 20},
            {"mediaType": m.OCI_LAYER_ZSTD, "digest": D3, "size": 30},
        ],
    }
    body.update(extra)
    return body


def entry(os: str, arch: str, variant: str | None = None, **kw: Any) -> dict[str, Any]:
    platform = {"os": os, "architecture": arch}
    if variant:
        platform["variant"] = variant
    digest = kw.pop(
        "digest", "sha256:" + (os + arch + (variant or "")).encode().hex()[:64].ljust(64, "0")
    )
    return {"mediaType": m.OCI_MANIFEST, "digest": digest, "size": 1, "platform": platform, **kw}


def index(*entries: dict[str, Any]) -> Index:
    data = json.dumps({"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": list(entries)})
    parsed = m.parse_manifest(data.encode())
    assert isinstance(parsed, Index)
    return parsed


# --- parsing ----------------------------------------------------------------------------------


def test_an_oci_manifest() -> None:
    parsed = m.parse_manifest(json.dumps(oci_manifest()).encode(), m.OCI_MANIFEST)
    assert isinstance(parsed, Manifest)
    assert parsed.media_type == m.OCI_MANIFEST and not parsed.docker
    assert parsed.config == Descriptor(m.OCI_CONFIG, D1, 10)
    assert [(d.digest, d.size) for d in parsed.layers] == [(D2, 20), (D3, 30)]


def test_a_docker_manifest_served_with_parameters() -> None:
    body = oci_manifest(mediaType=m.DOCKER_MANIFEST)
    parsed = m.parse_manifest(json.dumps(body).encode(), m.DOCKER_MANIFEST + "; charset=utf-8")
    assert isinstance(parsed, Manifest) and parsed.docker


@pytest.mark.parametrize("served", [None, "application/json", "application/octet-stream"])
def test_without_a_media_type_the_shape_decides(served: str | None) -> None:
    body = oci_manifest()
    del body["mediaType"]
    assert isinstance(m.parse_manifest(json.dumps(body).encode(), served), Manifest)
    listing = {"schemaVersion": 2, "manifests": [entry("linux", "amd64")]}
    parsed = m.parse_manifest(json.dumps(listing).encode(), served)
    assert isinstance(parsed, Index) and parsed.media_type == m.OCI_INDEX


def test_served_type_and_body_type_must_agree() -> None:
    with pytest.raises(SpecError, match="served as"):
        m.parse_manifest(json.dumps(oci_manifest()).encode(), m.OCI_INDEX)


@pytest.mark.parametrize(
    ("body", "served", "message"),
    [
        (oci_manifest(manifests=[]), None, "must not have 'manifests'"),
        (
            {"schemaVersion": 2, "mediaType": m.OCI_INDEX, "manifests": [], "config": {}},
            None,
            "must not have a 'config'",
        ),
        (oci_manifest(schemaVersion=1), None, "schema 1"),
        ({"schemaVersion": 1, "fsLayers": []}, m.DOCKER_SCHEMA1_SIGNED, "schema 1"),
        (oci_manifest(schemaVersion=3), None, "schemaVersion: expected 2"),
        (oci_manifest(mediaType="text/html"), None, "not a manifest or index type"),
        (oci_manifest(config=None), None, "config: expected an object"),
        (oci_manifest(layers={}), None, "layers: expected a list"),
        (
            oci_manifest(layers=[{"mediaType": m.OCI_LAYER, "digest": "sha256:12", "size": 1}]),
            None,
            r"layers\[0\].digest",
        ),
        (
            oci_manifest(layers=[{"mediaType": m.OCI_LAYER, "digest": D2, "size": -1}]),
            None,
            r"layers\[0\].size",
        ),
        (
            oci_manifest(layers=[{"mediaType": m.OCI_LAYER, "digest": D2, "size": True}]),
            None,
            r"layers\[0\].size",
        ),
        (oci_manifest(layers=[{"digest": D2, "size": 1}]), None, r"layers\[0\].mediaType"),
        (oci_manifest(annotations={"a": 1}), None, "annotations.a"),
        ({"schemaVersion": 2}, None, "cannot tell a manifest from an index"),
        ([], None, "expected a JSON object"),
    ],
)
def test_bad_manifests_name_the_field(body: Any, served: str | None, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        m.parse_manifest(json.dumps(body).encode(), served)


def test_not_json_and_too_big() -> None:
    with pytest.raises(SpecError, match="not valid JSON"):
        m.parse_manifest(b"{", None)
    with pytest.raises(SpecError, match="bytes is more than"):
        m.parse_manifest(b" " * (5 << 20), None)


def test_an_index_with_platforms_and_foreign_layer_urls() -> None:
    parsed = index(entry("linux", "arm", "v7", annotations={"x": "y"}))
    [first] = parsed.manifests
    assert first.platform == Platform("linux", "arm", "v7")
    assert str(first.platform) == "linux/arm/v7"
    assert first.annotations == {"x": "y"}
    body = oci_manifest(
        layers=[
            {"mediaType": m.DOCKER_FOREIGN_LAYER, "digest": D2, "size": 5, "urls": ["https://x"]}
        ]
    )
    parsed_manifest = m.parse_manifest(json.dumps(body).encode())
    assert isinstance(parsed_manifest, Manifest)
    assert parsed_manifest.layers[0].urls == ("https://x",)
    assert m.is_foreign(parsed_manifest.layers[0].media_type)


# --- platforms --------------------------------------------------------------------------------


def test_the_host_is_chosen_by_default_and_attestations_never() -> None:
    host = m.host_platform()
    attestation = entry(
        host.os,
        host.architecture,
        host.variant,
        digest=D3,
        annotations={m.ATTESTATION_ANNOTATION: "attestation-manifest"},
    )
    unknown = entry("unknown", "unknown", digest=D2)
    mine = entry(host.os, host.architecture, host.variant, digest=D1)
    other = entry("linux", "s390x" if host.architecture != "s390x" else "ppc64le")
    assert m.select_platform(index(attestation, unknown, other, mine)).digest == D1


def test_arm64_without_variant_is_v8() -> None:
    idx = index(entry("linux", "amd64"), entry("linux", "arm64", digest=D1))
    assert m.select_platform(idx, Platform("linux", "arm64", "v8")).digest == D1
    idx = index(entry("linux", "arm64", "v8", digest=D2))
    assert m.select_platform(idx, Platform("linux", "arm64")).digest == D2


def test_arm_variants_prefer_exact_then_older() -> None:
    idx = index(entry("linux", "arm", "v6", digest=D1), entry("linux", "arm", "v7", digest=D2))
    assert m.select_platform(idx, Platform("linux", "arm", "v7")).digest == D2
    assert m.select_platform(idx, Platform("linux", "arm", "v6")).digest == D1
    only_v6 = index(entry("linux", "arm", "v6", digest=D1))
    assert m.select_platform(only_v6, Platform("linux", "arm", "v7")).digest == D1
    with pytest.raises(SpecError, match="no manifest for linux/arm/v5"):
        m.select_platform(only_v6, Platform("linux", "arm", "v5"))


def test_no_match_lists_what_there_is() -> None:
    idx = index(entry("linux", "arm64"), entry("windows", "amd64"), entry("unknown", "unknown"))
    with pytest.raises(SpecError, match=r"has: linux/arm64, windows/amd64$"):
        m.select_platform(idx, Platform("linux", "riscv64"))


def test_a_lone_entry_without_platform_is_taken() -> None:
    lone = {"mediaType": m.OCI_MANIFEST, "digest": D1, "size": 1}
    assert m.select_platform(index(lone)).digest == D1
    with pytest.raises(SpecError, match="it has: none"):
        m.select_platform(index(lone, dict(lone, digest=D2)))


# --- writing ----------------------------------------------------------------------------------


def test_make_manifest_round_trips_and_is_stable() -> None:
    config = Descriptor(m.OCI_CONFIG, D1, 10)
    layers = [Descriptor(m.OCI_LAYER_GZIP, D2, 20, annotations=FrozenDict({"b": "2", "a": "1"}))]
    data = m.make_manifest(config, layers, annotations={"org.example": "x"})
    assert data == m.make_manifest(config, layers, annotations={"org.example": "x"})
    parsed = m.parse_manifest(data, m.OCI_MANIFEST)
    assert parsed == Manifest(
        config, tuple(layers), m.OCI_MANIFEST, FrozenDict({"org.example": "x"})
    )
    assert list(json.loads(data)) == [
        "schemaVersion",
        "mediaType",
        "config",
        "layers",
        "annotations",
    ]


def test_make_docker_manifest() -> None:
    config = Descriptor(m.DOCKER_CONFIG, D1, 10)
    data = m.make_manifest(config, [Descriptor(m.DOCKER_LAYER_GZIP, D2, 20)], docker=True)
    parsed = m.parse_manifest(data, m.DOCKER_MANIFEST)
    assert isinstance(parsed, Manifest) and parsed.docker
    with pytest.raises(SpecError, match="annotations"):
        m.make_manifest(config, [], docker=True, annotations={"a": "b"})


def test_make_index_round_trips() -> None:
    entries = [Descriptor(m.OCI_MANIFEST, D1, 5, Platform("linux", "arm64", "v8"))]
    parsed = m.parse_manifest(m.make_index(entries))
    assert parsed == Index(tuple(entries))
    listing = m.parse_manifest(m.make_index(entries, docker=True))
    assert isinstance(listing, Index) and listing.media_type == m.DOCKER_MANIFEST_LIST


def test_descriptors_are_checked() -> None:
    with pytest.raises(SpecError, match="invalid digest"):
        Descriptor(m.OCI_LAYER, "md5:abc", 1)
    with pytest.raises(SpecError, match="size must be >= 0"):
        Descriptor(m.OCI_LAYER, D1, -1)


@pytest.mark.parametrize(
    ("media_type", "compression"),
    [
        (m.OCI_LAYER, "none"),
        (m.DOCKER_LAYER, "none"),
        (m.OCI_LAYER_GZIP, "gzip"),
        (m.DOCKER_LAYER_GZIP, "gzip"),
        (m.DOCKER_FOREIGN_LAYER, "gzip"),
        (m.OCI_LAYER_ZSTD, "zstd"),
        (m.OCI_NONDIST_LAYER_ZSTD, "zstd"),
    ],
)
def test_layer_compression(media_type: str, compression: str) -> None:
    assert m.layer_compression(media_type) == compression


def test_a_config_is_not_a_layer() -> None:
    with pytest.raises(SpecError, match="not a layer media type"):
        m.layer_compression(m.OCI_CONFIG)
    assert not m.is_foreign(m.OCI_LAYER_GZIP)
