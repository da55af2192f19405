"""``save`` / ``load`` on real files: round trips in the three formats, archives made by skopeo
and podman, and hostile archives, each refused with nothing stored."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import (
    ImageError,
    ImageNotFound,
    LayerError,
    SpecError,
    StoreCorruptError,
    UnsafePathError,
)
from runtime.image import archive, exchange
from runtime.image import manifest as m
from runtime.image.store import Store
from tests.integration.test_exchange import (
    BUSYBOX,
    EMPTY,
    busybox_image,
    make_image,
    make_layer,
    stored,
    tar_of,
)

pytestmark = pytest.mark.rootless

FORMATS = ("docker-archive", "oci-archive", "oci-dir")
SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="needs skopeo (apt-get install skopeo)")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def out_name(fmt: str) -> str:
    return "saved-dir" if fmt == "oci-dir" else "saved.tar"


def entries_of(path: Path) -> dict[str, bytes | str]:
    """An archive's files (tar or directory): name -> bytes, or symlink target as str."""
    found: dict[str, bytes | str] = {}
    if path.is_dir():
        for item in sorted(path.rglob("*")):
            rel = item.relative_to(path).as_posix()
            if item.is_symlink():
                found[rel] = os.readlink(item)
            elif item.is_file():
                found[rel] = item.read_bytes()
        return found
    with tarfile.open(path) as tar:
        for member in tar:
            if member.issym():
                found[member.name] = member.linkname
            elif member.isreg():
                data = tar.extractfile(member)
                assert data is not None
                found[member.name] = data.read()
    return found


def write_tar(path: Path, entries: dict[str, bytes | str]) -> Path:
    """A tar of ``entries`` (bytes: a file; str: a symlink to it), in the given order."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, value in entries.items():
            info = tarfile.TarInfo(name)
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size, info.mode = len(value), 0o644
                tar.addfile(info, io.BytesIO(value))
    return path


def write_dir(path: Path, entries: dict[str, bytes | str]) -> Path:
    for name, value in entries.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, str):
            target.symlink_to(value)
        else:
            target.write_bytes(value)
    return path


def same_files(store: Store, other: Store, ref: str) -> None:
    """The two stores' images have layers with the same diff ids and the same busybox."""
    mine, theirs = store.image_layers(ref), other.image_layers(ref)
    assert [layer.diff_id for layer in mine] == [layer.diff_id for layer in theirs]
    assert (theirs[0].path / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert os.readlink(theirs[0].path / "bin" / "sh") == "busybox"
    assert (theirs[1].path / "etc" / "app.conf").read_bytes() == b"debug = true\n"


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_then_load_gives_the_same_images(
    store: Store, other: Store, tmp_path: Path, fmt: archive.Format
) -> None:
    iid = busybox_image(store)
    store.tag("registry.example:5000/team/tools:2", iid)
    plain = make_image(store, make_layer(store, "solo", {"only": b"one"}))
    out = tmp_path / out_name(fmt)
    archive.save(store, ["tools:1", "registry.example:5000/team/tools:2", plain], out, format=fmt)
    assert sorted(os.listdir(tmp_path)) == sorted(["store", "other", out.name])  # no .part left

    loaded = archive.load(other, out)
    assert loaded == [
        "docker.io/library/tools:1",
        "registry.example:5000/team/tools:2",
        plain,
    ]
    assert other.resolve("tools:1") == other.resolve("registry.example:5000/team/tools:2") == iid
    assert other.get_image(plain).id == plain
    assert other.config_bytes(iid) == store.config_bytes(iid)
    same_files(store, other, "tools:1")
    assert other.fsck() == []
    # Loaded again: nothing changes, nothing is unpacked twice.
    layers_before = stored(other)["layers"]
    assert archive.load(other, out) == loaded
    assert stored(other)["layers"] == layers_before


def test_our_round_trip_stores_no_blob_for_layers_that_pack_back(
    store: Store, other: Store, tmp_path: Path
) -> None:
    busybox_image(store)
    archive.save(store, ["tools:1"], tmp_path / "d.tar")
    archive.load(other, tmp_path / "d.tar")
    assert stored(other)["blobs"] == [] and stored(other)["dist"] == []
    # ... and the loaded image exports to exactly what the original exports to.
    assert exchange.export_image(other, "tools:1") == exchange.export_image(store, "tools:1")


def test_docker_archive_layout_and_determinism(store: Store, tmp_path: Path) -> None:
    iid = busybox_image(store)
    archive.save(store, ["tools:1"], tmp_path / "a.tar")
    archive.save(store, ["tools:1"], tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    files = entries_of(tmp_path / "a.tar")
    [entry] = json.loads(files["manifest.json"])
    diff_ids = store.get_image(iid).config.diff_ids
    assert entry == {
        "Config": f"{iid[7:]}.json",
        "RepoTags": ["docker.io/library/tools:1"],
        "Layers": [f"{d[7:]}/layer.tar" for d in diff_ids],
    }
    for d in diff_ids:
        assert sha(files[f"{d[7:]}/layer.tar"]) == d  # uncompressed, as docker save writes


def test_oci_layout_names_and_blobs(store: Store, tmp_path: Path) -> None:
    busybox_image(store)
    archive.save(store, ["tools:1"], tmp_path / "dir", format="oci-dir")
    files = entries_of(tmp_path / "dir")
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = m.parse_manifest(files["index.json"], m.OCI_INDEX)  # type: ignore[arg-type]
    assert isinstance(index, m.Index)
    [entry] = index.manifests
    assert entry.annotations[m.ANNOTATION_REF_NAME] == "docker.io/library/tools:1"
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert isinstance(data, bytes) and sha(data) == "sha256:" + name[13:]
    exported = exchange.export_image(store, "tools:1", docker=False)
    assert entry.digest == exported.manifest_digest


def test_a_gzip_compressed_archive_loads(store: Store, other: Store, tmp_path: Path) -> None:
    iid = busybox_image(store)
    archive.save(store, ["tools:1"], tmp_path / "d.tar")
    (tmp_path / "d.tar.gz").write_bytes(gzip.compress((tmp_path / "d.tar").read_bytes()))
    assert archive.load(other, tmp_path / "d.tar.gz") == ["docker.io/library/tools:1"]
    assert other.resolve("tools:1") == iid


def test_docker_save_style_links_and_newer_blob_layout(
    store: Store, other: Store, tmp_path: Path
) -> None:
    """Old ``docker save`` links repeated layers (``<id>/layer.tar -> ../<other>/layer.tar``);
    newer docker writes ``blobs/sha256/<hex>`` paths in ``manifest.json``. Both load."""
    iid = busybox_image(store)
    archive.save(store, ["tools:1"], tmp_path / "ours.tar")
    files = entries_of(tmp_path / "ours.tar")
    [entry] = json.loads(files["manifest.json"])
    first, second = entry["Layers"]
    linked: dict[str, bytes | str] = {
        "v1a/layer.tar": files[first],
        "v1b/layer.tar": "../v1a/layer.tar",  # a link to a layer file (two "uses" of it)
        "v1c/layer.tar": files[second],
        entry["Config"]: files[entry["Config"]],
        "manifest.json": json.dumps(
            [dict(entry, Layers=["v1b/layer.tar", "v1c/layer.tar"])]
        ).encode(),
    }
    assert archive.load(other, write_tar(tmp_path / "linked.tar", linked)) == [
        "docker.io/library/tools:1"
    ]
    assert other.resolve("tools:1") == iid

    third = Store(tmp_path / "third")
    config = files[entry["Config"]]
    assert isinstance(config, bytes)
    blobs: dict[str, bytes | str] = {
        f"blobs/sha256/{sha(config)[7:]}": config,
        **{f"blobs/sha256/{name[:64]}": files[name] for name in entry["Layers"]},
    }
    newer = {
        **blobs,
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": b'{"schemaVersion":2,"manifests":[]}',
        "manifest.json": json.dumps(
            [
                {
                    "Config": f"blobs/sha256/{sha(config)[7:]}",
                    "RepoTags": ["tools:9"],
                    "Layers": [f"blobs/sha256/{name[:64]}" for name in entry["Layers"]],
                }
            ]
        ).encode(),
    }
    assert archive.load(third, write_dir(tmp_path / "newer", newer)) == [
        "docker.io/library/tools:9"
    ]
    assert third.resolve("tools:9") == iid


def test_a_multi_platform_layout_loads_this_hosts_image(
    store: Store, other: Store, tmp_path: Path
) -> None:
    iid = busybox_image(store)
    exported = exchange.export_image(store, "tools:1", docker=False)
    files = dict(entries_of(_saved_oci(store, tmp_path)))
    host = m.host_platform()
    elsewhere = m.Platform("linux", "s390x" if host.architecture != "s390x" else "amd64")
    missing = m.Descriptor(m.OCI_MANIFEST, sha(b"not in the layout"), 17, elsewhere)
    mine = m.Descriptor(m.OCI_MANIFEST, exported.manifest_digest, len(exported.manifest), host)
    attestation = m.Descriptor(
        m.OCI_MANIFEST, sha(b"attestation"), 11, m.Platform("unknown", "unknown")
    )
    nested = m.make_index([missing, attestation, mine])
    files[f"blobs/sha256/{sha(nested)[7:]}"] = nested
    files["index.json"] = m.make_index(
        [
            m.Descriptor(
                m.OCI_INDEX,
                sha(nested),
                len(nested),
                annotations={"io.containerd.image.name": "multi:1"},
            )
        ]
    )
    assert archive.load(other, write_dir(tmp_path / "multi", files)) == [
        "docker.io/library/multi:1"
    ]
    assert other.resolve("multi:1") == iid
    assert other.resolve(f"multi@{exported.manifest_digest}") == iid


def _saved_oci(store: Store, tmp_path: Path) -> Path:
    out = tmp_path / "saved-oci"
    archive.save(store, ["tools:1"], out, format="oci-dir")
    return out


def test_bare_tag_ref_names_load_untagged(store: Store, other: Store, tmp_path: Path) -> None:
    """``ref.name`` as OCI means it (``latest``, a tag without repository) names no image."""
    iid = busybox_image(store)
    files = dict(entries_of(_saved_oci(store, tmp_path)))
    index = json.loads(files["index.json"])
    index["manifests"][0]["annotations"] = {m.ANNOTATION_REF_NAME: "latest"}
    files["index.json"] = json.dumps(index).encode()
    assert archive.load(other, write_dir(tmp_path / "bare", files)) == [iid]
    assert other.list_images()[0].tags == ()


# --- save refusals -------------------------------------------------------------------------------


def test_save_refusals_leave_nothing(store: Store, tmp_path: Path) -> None:
    busybox_image(store)
    (tmp_path / "exists.tar").write_bytes(b"mine")
    with pytest.raises(SpecError, match="exists"):
        archive.save(store, ["tools:1"], tmp_path / "exists.tar")
    assert (tmp_path / "exists.tar").read_bytes() == b"mine"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_bytes(b"")
    with pytest.raises(SpecError, match="not an empty directory"):
        archive.save(store, ["tools:1"], tmp_path / "full", format="oci-dir")
    with pytest.raises(ImageNotFound):
        archive.save(store, ["nothing:here"], tmp_path / "none.tar")
    with pytest.raises(SpecError, match="unknown format"):
        archive.save(store, ["tools:1"], tmp_path / "x", format="zip")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="at least one"):
        archive.save(store, [], tmp_path / "x")
    top = store.image_layers("tools:1")[1]
    (top.path / "etc" / "app.conf").write_bytes(b"changed behind the store's back\n")
    for fmt in FORMATS:
        with pytest.raises(StoreCorruptError, match=f"layer {top.diff_id} does not pack"):
            archive.save(store, ["tools:1"], tmp_path / f"bad-{fmt}", format=fmt)
    assert sorted(os.listdir(tmp_path)) == ["exists.tar", "full", "store"]


# --- hostile archives ----------------------------------------------------------------------------


@pytest.fixture
def good(store: Store, tmp_path: Path) -> dict[str, Any]:
    """The pieces of a good archive of the busybox image, to spoil one at a time."""
    busybox_image(store)
    archive.save(store, ["tools:1"], tmp_path / "good.tar")
    archive.save(store, ["tools:1"], tmp_path / "good-oci", format="oci-dir")
    docker = entries_of(tmp_path / "good.tar")
    [entry] = json.loads(docker["manifest.json"])
    exported = exchange.export_image(store, "tools:1", docker=False)
    return {"docker": docker, "entry": entry, "oci": entries_of(tmp_path / "good-oci"),
            "exported": exported}  # fmt: skip


def refused(
    other: Store, path: Path, error: type[Exception], *texts: str
) -> pytest.ExceptionInfo[Exception]:
    with pytest.raises(error) as caught:
        archive.load(other, path)
    message = str(caught.value)
    assert str(path) in message, message
    for text in texts:
        assert text in message, message
    assert stored(other) == EMPTY
    return caught


def test_a_layer_path_that_climbs_out(good: dict[str, Any], other: Store, tmp_path: Path) -> None:
    files = dict(good["docker"])
    entry = good["entry"]
    files["manifest.json"] = json.dumps(
        [dict(entry, Layers=["../../etc/passwd", entry["Layers"][1]])]
    ).encode()
    refused(other, write_tar(tmp_path / "a.tar", files), UnsafePathError, "'../../etc/passwd'")
    files["manifest.json"] = json.dumps([dict(entry, Config="/etc/passwd")]).encode()
    refused(other, write_tar(tmp_path / "b.tar", files), UnsafePathError, "'/etc/passwd'")


def test_a_tar_entry_named_to_climb_out(good: dict[str, Any], other: Store, tmp_path: Path) -> None:
    files = {**good["docker"], "../evil": b"x"}
    refused(other, write_tar(tmp_path / "a.tar", files), UnsafePathError, "'../evil'")
    assert not (tmp_path.parent / "evil").exists()


def test_a_symlinked_blobs_directory(good: dict[str, Any], other: Store, tmp_path: Path) -> None:
    """The blobs are real and right, but outside the layout: they are never read."""
    outside = write_dir(
        tmp_path / "outside",
        {k: v for k, v in good["oci"].items() if k.startswith("blobs/")},
    )
    files = {k: v for k, v in good["oci"].items() if not k.startswith("blobs/")}
    layout = write_dir(tmp_path / "layout", {**files, "blobs": str(outside / "blobs")})
    refused(other, layout, ImageNotFound, "entry 'blobs/sha256/", "is missing")
    relative = write_dir(tmp_path / "layout2", {**files, "blobs": "../outside/blobs"})
    refused(other, relative, ImageNotFound, "is missing")
    as_tar = write_tar(tmp_path / "layout.tar", {**files, "blobs": str(outside / "blobs")})
    refused(other, as_tar, ImageNotFound, "is missing")


def test_a_blob_with_the_wrong_digest(good: dict[str, Any], other: Store, tmp_path: Path) -> None:
    layer = good["exported"].layers[1].descriptor
    name = f"blobs/sha256/{layer.digest[7:]}"
    data = bytearray(good["oci"][name])
    data[len(data) // 2] ^= 0x55
    files = {**good["oci"], name: bytes(data)}
    refused(other, write_dir(tmp_path / "bad", files), StoreCorruptError, name, layer.digest)


def test_a_truncated_layer(good: dict[str, Any], other: Store, tmp_path: Path) -> None:
    name = good["entry"]["Layers"][0]
    files = {**good["docker"], name: good["docker"][name][:-3000]}  # the end blocks: tar is fine
    refused(other, write_tar(tmp_path / "a.tar", files), StoreCorruptError, name, "config says")
    files = {**good["docker"], name: good["docker"][name][:100_000]}  # in a file's data
    refused(other, write_tar(tmp_path / "b.tar", files), LayerError, name, "unreadable")
    name = f"blobs/sha256/{good['exported'].layers[0].descriptor.digest[7:]}"
    files = {**good["oci"], name: good["oci"][name][:-100]}
    refused(other, write_dir(tmp_path / "oci", files), StoreCorruptError, name)
    whole = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError) as caught:
        archive.load(other, tmp_path / "cut.tar")
    assert str(tmp_path / "cut.tar") in str(caught.value)
    assert stored(other) == EMPTY


def test_a_manifest_naming_a_missing_blob(
    good: dict[str, Any], other: Store, tmp_path: Path
) -> None:
    name = f"blobs/sha256/{good['exported'].layers[0].descriptor.digest[7:]}"
    files = {k: v for k, v in good["oci"].items() if k != name}
    refused(other, write_dir(tmp_path / "oci", files), ImageNotFound, f"entry {name!r} is missing")
    docker = {k: v for k, v in good["docker"].items() if k != good["entry"]["Layers"][1]}
    refused(other, write_tar(tmp_path / "d.tar", docker), ImageNotFound, "is missing")


def test_a_layer_tar_with_escaping_entries(store: Store, other: Store, tmp_path: Path) -> None:
    """The digests are all right; the layer itself is the attack."""
    evil = tar_of({"fine": b"ok", "../../../tmp/owned": b"evil"})
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha(evil)]},
        }
    ).encode()
    files: dict[str, bytes | str] = {
        f"{sha(config)[7:]}.json": config,
        "l/layer.tar": evil,
        "manifest.json": json.dumps(
            [
                {
                    "Config": f"{sha(config)[7:]}.json",
                    "RepoTags": ["evil:1"],
                    "Layers": ["l/layer.tar"],
                }
            ]
        ).encode(),
    }
    refused(other, write_tar(tmp_path / "evil.tar", files), UnsafePathError, "l/layer.tar", "owned")


def test_a_config_that_is_not_what_its_name_says(
    good: dict[str, Any], other: Store, tmp_path: Path
) -> None:
    config_name = good["entry"]["Config"]
    config = json.loads(good["docker"][config_name])
    config["architecture"] = "arm64"
    files = {**good["docker"], config_name: json.dumps(config).encode()}
    refused(other, write_tar(tmp_path / "a.tar", files), StoreCorruptError, config_name)


def test_a_diff_id_that_does_not_match_the_layer(
    good: dict[str, Any], other: Store, tmp_path: Path
) -> None:
    first, second = good["entry"]["Layers"]
    files = {**good["docker"], first: good["docker"][second], second: good["docker"][first]}
    refused(other, write_tar(tmp_path / "a.tar", files), StoreCorruptError, first, "diff")


@pytest.mark.parametrize(
    ("files", "text"),
    [
        ({"hello.txt": b"hi"}, "neither a docker archive"),
        ({"manifest.json": b"{nope"}, "not JSON"),
        ({"manifest.json": b"{}"}, "expected a non-empty list"),
        ({"manifest.json": b"[1]"}, "expected an object"),
        ({"a": b"1", "./a": b"2"}, "appears twice"),
        ({"oci-layout": b"{}", "index.json": b"{}"}, "imageLayoutVersion"),
    ],
)
def test_malformed_archives(
    other: Store, tmp_path: Path, files: dict[str, bytes | str], text: str
) -> None:
    refused(other, write_tar(tmp_path / "x.tar", files), ImageError, text)


def test_not_an_archive(other: Store, tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(os.urandom(2048))
    refused(other, tmp_path / "junk", ImageError, "not a readable tar")
    with pytest.raises(ImageError, match="cannot read"):
        archive.load(other, tmp_path / "absent.tar")


# --- interoperability: skopeo --------------------------------------------------------------------


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}{done.stderr}"
    return done.stdout


@needs_skopeo
def test_skopeo_reads_what_we_save(store: Store, other: Store, tmp_path: Path) -> None:
    iid = busybox_image(store)
    exported = exchange.export_image(store, "tools:1", docker=False)
    archive.save(store, ["tools:1"], tmp_path / "layout", format="oci-dir")
    raw = run("skopeo", "inspect", "--raw", f"oci:{tmp_path / 'layout'}:docker.io/library/tools:1")
    assert raw.encode() == exported.manifest
    info = json.loads(
        run("skopeo", "inspect", f"oci:{tmp_path / 'layout'}:docker.io/library/tools:1")
    )
    assert info["Layers"] == [b.descriptor.digest for b in exported.layers]
    assert info["Architecture"] == "amd64"

    # oci-archive -> docker-archive by skopeo, loaded back: the very same image.
    archive.save(store, ["tools:1"], tmp_path / "ours.tar", format="oci-archive")
    run(
        "skopeo", "copy", "-q", f"oci-archive:{tmp_path / 'ours.tar'}:docker.io/library/tools:1",
        f"docker-archive:{tmp_path / 'skopeo.tar'}:skopeo/made:1",
    )  # fmt: skip
    assert archive.load(other, tmp_path / "skopeo.tar") == ["docker.io/skopeo/made:1"]
    assert other.resolve("skopeo/made:1") == iid
    same_files(store, other, iid)


@needs_skopeo
def test_what_skopeo_writes_loads(store: Store, other: Store, tmp_path: Path) -> None:
    busybox_image(store)
    archive.save(store, ["tools:1"], tmp_path / "ours.tar")
    run(
        "skopeo", "copy", "-q", f"docker-archive:{tmp_path / 'ours.tar'}",
        f"oci:{tmp_path / 'skopeo-oci'}:skopeo.example/made:2",
    )  # fmt: skip
    info = json.loads(run("skopeo", "inspect", "--config", f"oci:{tmp_path / 'skopeo-oci'}"))
    assert archive.load(other, tmp_path / "skopeo-oci") == ["skopeo.example/made:2"]
    # skopeo rewrites the config for the OCI media type; the layers are ours, byte for byte.
    loaded = other.get_image("skopeo.example/made:2")
    assert loaded.config.diff_ids == tuple(info["rootfs"]["diff_ids"])
    mine = store.image_layers("tools:1")
    theirs = other.image_layers("skopeo.example/made:2")
    assert [layer.diff_id for layer in theirs] == [layer.diff_id for layer in mine]
    assert (theirs[0].path / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()
    assert other.fsck() == []


# --- interoperability: podman --------------------------------------------------------------------


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[list[str]]:
    """``podman`` with a private root in ``tmp_path``; skips, with podman's reason, where it
    cannot run."""
    binary = shutil.which("podman")
    if binary is None:
        pytest.skip("needs podman (apt-get install podman)")
    if os.geteuid() != 0:
        pytest.skip("podman runs as root only here: rootless, it leaves a pause process behind")
    run_root = tempfile.mkdtemp(prefix="pi-podman-")  # podman wants a runroot < 50 characters
    argv = [
        binary, "--root", str(tmp_path / "podman"), "--runroot", run_root,
        "--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs",
    ]  # fmt: skip
    try:
        probe = subprocess.run(
            [*argv, "images"], capture_output=True, text=True, timeout=60, check=False
        )
        if probe.returncode != 0:
            pytest.skip(f"podman cannot run here: {probe.stderr.strip()[-300:]}")
        yield argv
    finally:
        shutil.rmtree(run_root, ignore_errors=True)


def test_podman_loads_what_we_save(store: Store, tmp_path: Path, podman: list[str]) -> None:
    iid = busybox_image(store)
    store.tag("localhost/extra:3", iid)
    archive.save(store, ["tools:1", "localhost/extra:3"], tmp_path / "d.tar")
    out = run(*podman, "load", "-q", "-i", str(tmp_path / "d.tar"))
    assert "docker.io/library/tools:1" in out and "localhost/extra:3" in out
    archive.save(store, ["tools:1"], tmp_path / "o.tar", format="oci-archive")
    run(*podman, "load", "-q", "-i", str(tmp_path / "o.tar"))
    listed = json.loads(run(*podman, "images", "--format", "json"))
    assert {image["Id"] for image in listed} == {iid[7:]}


def test_what_podman_saves_loads(
    store: Store, other: Store, tmp_path: Path, podman: list[str]
) -> None:
    iid = busybox_image(store)
    archive.save(store, ["tools:1"], tmp_path / "d.tar")
    run(*podman, "load", "-q", "-i", str(tmp_path / "d.tar"))
    run(*podman, "save", "-q", "-o", str(tmp_path / "p-docker.tar"), "docker.io/library/tools:1")
    run(
        *podman, "save", "-q", "--format", "oci-archive", "-o", str(tmp_path / "p-oci.tar"),
        "docker.io/library/tools:1",
    )  # fmt: skip
    assert archive.load(other, tmp_path / "p-docker.tar") == ["docker.io/library/tools:1"]
    assert other.resolve("tools:1") == iid
    same_files(store, other, "tools:1")
    third = Store(tmp_path / "third")
    assert archive.load(third, tmp_path / "p-oci.tar") == ["docker.io/library/tools:1"]
    mine = store.image_layers("tools:1")
    theirs = third.image_layers("tools:1")
    assert [layer.diff_id for layer in theirs] == [layer.diff_id for layer in mine]
    assert third.fsck() == []
