"""``pull`` and ``push`` with real parts: images built locally into a store, Debian's
``docker-registry``, a second empty store, the engine running what was pulled, and ``skopeo``
(Debian's) on the other end of each direction.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from runtime.build.builder import BuildOptions, build
from runtime.engine import Engine
from runtime.errors import ImageNotFound, SpecError
from runtime.image import manifest as mf
from runtime.image.images import resolve_image
from runtime.image.store import Store
from runtime.registry.client import Registry
from runtime.registry.transfer import TransferEvent, mount_sources, pull, push
from runtime.spec import ContainerSpec
from tests.integration.test_build import BUSYBOX, needs_busybox
from tests.registry_fixtures import HostileRegistry, RegistryServer

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY hello.txt /etc/hello.txt
CMD ["/bin/busybox", "cat", "/etc/hello.txt"]
"""


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def nobody(_name: str) -> None:
    return None


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Store, Store]:
    """The store an image is built in, and an empty one to pull it into."""
    return Store(tmp_path / "here"), Store(tmp_path / "there")


@pytest.fixture
def image(tmp_path: Path, stores: tuple[Store, Store], engine: Engine) -> str:
    """A two-layer scratch image with a static busybox, built in the first store."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copy2(BUSYBOX, ctx / "busybox")
    (ctx / "hello.txt").write_text("hello from the registry\n")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    build(BuildOptions(context=ctx, tags=("app:built",)), store=stores[0], engine=engine)
    return "app:built"


def run_image(engine: Engine, store: Store, ref: str) -> str:
    """Run the image's default command in a container; its output."""
    image = resolve_image(store, ref)
    spec = ContainerSpec(image.rootfs, argv=image.argv(), env=image.env, cwd=image.cwd)
    with tempfile.TemporaryFile() as out:
        status = engine.run(spec, stdio=(None, out.fileno(), out.fileno()))
        out.seek(0)
        text = out.read().decode(errors="replace")
    assert status.exit_code == 0, text
    return text


def store_entries(store: Store) -> dict[str, list[str]]:
    """What the store holds on disk, per area (to compare before and after)."""
    out = {}
    for area in ("blobs/sha256", "layers/sha256", "images/sha256", "tmp"):
        path = store.root / area
        out[area] = sorted(p.name for p in path.iterdir()) if path.exists() else []
    return out


@needs_busybox
@pytest.mark.rootless
def test_push_then_pull_into_an_empty_store_and_run_it(
    registry: RegistryServer, stores: tuple[Store, Store], image: str, engine: Engine
) -> None:
    here, there = stores
    events: list[TransferEvent] = []
    pushed = push(here, image, registry.ref("team/app", "v1"), progress=events.append)
    assert (pushed.uploaded, pushed.mounted, pushed.existed) == (2, 0, 0)
    assert {e.state for e in events} == {"waiting", "uploading", "done"}

    events.clear()
    pulled = pull(there, registry.ref("team/app", "v1"), progress=events.append)
    assert pulled.image_id == here.resolve(image)
    assert pulled.digest == pulled.manifest_digest == pushed.digest
    assert (pulled.layers, pulled.downloaded) == (2, 2)
    assert pulled.reference == f"{registry.host}/team/app:v1"
    assert there.resolve(f"{registry.host}/team/app@{pushed.digest}") == pulled.image_id
    assert run_image(engine, there, f"{registry.host}/team/app:v1") == "hello from the registry\n"

    # Each layer: waiting, then byte counts that only grow to its size, then done.
    for blob in {e.digest for e in events}:
        mine = [e for e in events if e.digest == blob]
        assert mine[0].state == "waiting" and mine[-1].state == "done"
        counts = [e.done for e in mine if e.state == "downloading"]
        assert counts == sorted(counts) and counts[-1] == mine[-1].total

    # Again: nothing to download. Pushed back: the same digest, every blob already there.
    assert pull(there, registry.ref("team/app", "v1")).downloaded == 0
    again = push(there, f"{registry.host}/team/app:v1", registry.ref("team/app", "v2"))
    assert again.digest == pushed.digest and again.existed == 2


@needs_busybox
def test_push_to_another_repository_mounts_the_layers(
    registry: RegistryServer,
    hostile_registry: HostileRegistry,
    stores: tuple[Store, Store],
    image: str,
) -> None:
    hostile_registry.forward_to(registry)  # a recording proxy in front of the real registry
    here, _ = stores
    first = push(here, image, hostile_registry.ref("team/base", "v1"))
    layers = [e for e in here.get_image(image).config.diff_ids]
    assert mount_sources(here, hostile_registry.host, layers) == {d: ["team/base"] for d in layers}
    second = push(here, image, hostile_registry.ref("team/other", "v1"))
    assert (second.mounted, second.uploaded, second.digest) == (2, 0, first.digest)
    mounts = hostile_registry.matching("POST", r"/v2/team/other/blobs/uploads/")
    assert sorted(m.query["from"][0] for m in mounts) == ["team/base", "team/base", "team/base"]
    # Two layers and the config: mounted, nothing sent.
    assert not hostile_registry.matching("PATCH", r"/v2/team/other/.*")
    assert not hostile_registry.matching("PUT", r"/v2/team/other/blobs/.*")


@needs_busybox
def test_pull_of_an_index_picks_this_platform_and_skips_attestations(
    registry: RegistryServer, stores: tuple[Store, Store], image: str
) -> None:
    here, there = stores
    pushed = push(here, image, registry.ref("multi", "amd"))
    with Registry(registry.host, credentials=nobody) as reg:
        size = len(reg.get_manifest("multi", pushed.digest).data)
        # Another platform's image: the index names it, nobody should download it.
        tar = tar_of({"etc/arch": b"s390x\n"})
        layer = gzip.compress(tar)
        config = json.dumps(
            {
                "architecture": "s390x",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [digest(tar)]},
            }
        ).encode()
        reg.upload_blob("multi", digest(config), len(config), config)
        reg.upload_blob("multi", digest(layer), len(layer), layer)
        foreign = mf.make_manifest(
            mf.Descriptor(mf.OCI_CONFIG, digest(config), len(config)),
            [mf.Descriptor(mf.OCI_LAYER_GZIP, digest(layer), len(layer))],
        )
        reg.put_manifest("multi", "s390x", foreign, mf.OCI_MANIFEST)
        index = mf.make_index(
            [
                # An attestation that claims this host's platform comes first: skipped.
                mf.Descriptor(
                    mf.OCI_MANIFEST,
                    digest(foreign),
                    len(foreign),
                    platform=mf.host_platform(),
                    annotations={"vnd.docker.reference.type": "attestation-manifest"},
                ),
                mf.Descriptor(
                    mf.OCI_MANIFEST,
                    digest(foreign),
                    len(foreign),
                    platform=mf.Platform("linux", "s390x"),
                ),
                mf.Descriptor(mf.OCI_MANIFEST, pushed.digest, size, platform=mf.host_platform()),
            ]
        )
        index_digest = reg.put_manifest("multi", "latest", index, mf.OCI_INDEX)
    pulled = pull(there, registry.ref("multi"))
    assert pulled.image_id == here.resolve(image)
    assert (pulled.digest, pulled.manifest_digest) == (index_digest, pushed.digest)
    assert pulled.platform == mf.host_platform()
    assert there.resolve(f"{registry.host}/multi@{index_digest}") == pulled.image_id
    with pytest.raises(ImageNotFound) as info:
        pull(there, registry.ref("multi"), platform=mf.Platform("linux", "arm64"))
    assert f"{registry.host}/multi:latest: " in str(info.value)
    assert "no manifest for linux/arm64" in str(info.value) and "linux/s390x" in str(info.value)
    s390x = pull(there, registry.ref("multi"), platform=mf.Platform("linux", "s390x"))
    assert s390x.manifest_digest == digest(foreign) and s390x.downloaded == 1


@needs_busybox
def test_pull_by_digest_records_the_digest_only(
    registry: RegistryServer, stores: tuple[Store, Store], image: str
) -> None:
    here, there = stores
    pushed = push(here, image, registry.ref("app", "v1"), docker_format=True)
    ref = f"{registry.host}/app@{pushed.digest}"
    pulled = pull(there, ref)
    assert pulled.reference == ref and pulled.image_id == here.resolve(image)
    assert there.get_image(ref).tags == (ref,)
    with Registry(registry.host, credentials=nobody) as reg:
        assert reg.get_manifest("app", "v1").media_type == mf.DOCKER_MANIFEST


def test_bad_arguments_are_refused_before_any_request(stores: tuple[Store, Store]) -> None:
    here, _ = stores
    with pytest.raises(SpecError, match="jobs must be a positive number"):
        pull(here, "127.0.0.1:1/app", jobs=0)
    with pytest.raises(SpecError, match="repository name must be lowercase"):
        pull(here, "127.0.0.1:1/App")
    with pytest.raises(ImageNotFound):
        push(here, "nothing:here", "127.0.0.1:1/app")


# --- interoperability with skopeo ---------------------------------------------------------------


def skopeo(*args: str) -> str:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (Debian package skopeo)")
    done = subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"skopeo {' '.join(args)}:\n{done.stderr}"
    return done.stdout


def oci_layout(path: Path, tag: str) -> str:
    """An OCI image layout written by hand (not by our code): busybox in one gzip layer."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, "bin/busybox")
        text = b"made by hand, copied by skopeo\n"
        info = tarfile.TarInfo("etc/hello.txt")
        info.size, info.mode = len(text), 0o644
        tar.addfile(info, io.BytesIO(text))
    raw = tar_bytes.getvalue()
    layer = gzip.compress(raw, compresslevel=1, mtime=0)
    config = json.dumps(
        {
            "architecture": mf.host_platform().architecture,
            "os": "linux",
            "config": {"Cmd": ["/bin/busybox", "cat", "/etc/hello.txt"]},
            "rootfs": {"type": "layers", "diff_ids": [digest(raw)]},
        }
    ).encode()
    manifest = mf.make_manifest(
        mf.Descriptor(mf.OCI_CONFIG, digest(config), len(config)),
        [mf.Descriptor(mf.OCI_LAYER_GZIP, digest(layer), len(layer))],
    )
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for data in (layer, config, manifest):
        (blobs / digest(data)[7:]).write_bytes(data)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entry = mf.Descriptor(
        mf.OCI_MANIFEST,
        digest(manifest),
        len(manifest),
        annotations={"org.opencontainers.image.ref.name": tag},
    )
    (path / "index.json").write_bytes(mf.make_index([entry]))
    return digest(manifest)


@needs_busybox
@pytest.mark.rootless
def test_skopeo_pushes_an_image_we_pull_and_run(
    registry: RegistryServer, tmp_path: Path, stores: tuple[Store, Store], engine: Engine
) -> None:
    _, there = stores
    manifest_digest = oci_layout(tmp_path / "oci", "v1")
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{tmp_path / 'oci'}:v1",
        f"docker://{registry.ref('skopeo/app', 'v1')}",
    )
    pulled = pull(there, registry.ref("skopeo/app", "v1"))
    assert pulled.digest == manifest_digest  # skopeo sent the manifest as it was
    assert run_image(engine, there, pulled.reference) == "made by hand, copied by skopeo\n"


@needs_busybox
@pytest.mark.parametrize("docker_format", [False, True], ids=["oci", "docker"])
def test_skopeo_reads_and_copies_what_we_push(
    registry: RegistryServer,
    tmp_path: Path,
    stores: tuple[Store, Store],
    image: str,
    docker_format: bool,
) -> None:
    here, _ = stores
    pushed = push(here, image, registry.ref("ours/app", "v1"), docker_format=docker_format)
    inspected = json.loads(
        skopeo("inspect", "--tls-verify=false", f"docker://{registry.ref('ours/app', 'v1')}")
    )
    exported_layers = [d for d in json.loads(here.open_blob(pushed.digest).read())["layers"]]
    assert inspected["Digest"] == pushed.digest
    assert inspected["Layers"] == [layer["digest"] for layer in exported_layers]
    assert inspected["Architecture"] == here.get_image(image).config.architecture
    raw = json.loads(
        skopeo(
            "inspect", "--raw", "--tls-verify=false", f"docker://{registry.ref('ours/app', 'v1')}"
        )
    )
    assert raw["mediaType"] == (mf.DOCKER_MANIFEST if docker_format else mf.OCI_MANIFEST)

    out = tmp_path / "copied"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{registry.ref('ours/app', 'v1')}",
        f"oci:{out}:v1",
    )
    index = json.loads((out / "index.json").read_text())
    (entry,) = index["manifests"]
    copied = json.loads((out / "blobs" / "sha256" / entry["digest"][7:]).read_bytes())
    # skopeo verified every blob on the way; the layers arrive byte for byte.
    assert [layer["digest"] for layer in copied["layers"]] == inspected["Layers"]
    if not docker_format:
        assert entry["digest"] == pushed.digest


@needs_busybox
def test_a_zstd_layer_the_registry_serves_is_pulled_and_runs(
    registry: RegistryServer, stores: tuple[Store, Store], image: str, engine: Engine
) -> None:
    zstandard = pytest.importorskip("zstandard", reason="zstd layers need the zstandard module")
    from runtime.image import exchange

    here, there = stores
    exported = exchange.export_image(here, image)
    repo = "team/zstd"
    layers = []
    with Registry(registry.host) as client:
        for blob in exported.layers:
            with here.open_blob(blob.descriptor.digest) as raw:
                tar = exchange.uncompressed(raw).read()  # type: ignore[arg-type]
            data = zstandard.ZstdCompressor().compress(tar)
            layers.append(mf.Descriptor(mf.OCI_LAYER_ZSTD, digest(data), len(data)))
            client.upload_blob(repo, layers[-1].digest, len(data), data)
        client.upload_blob(
            repo, exported.config.digest, exported.config.size, exported.config_bytes
        )
        manifest = mf.make_manifest(exported.config, layers)
        client.put_manifest(repo, "v1", manifest, mf.OCI_MANIFEST)

    pulled = pull(there, registry.ref(repo, "v1"))
    assert pulled.image_id == here.resolve(image)  # the same diff ids, another compression
    assert run_image(engine, there, registry.ref(repo, "v1")) == "hello from the registry\n"
