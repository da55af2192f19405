"""OCI image configs: exact JSON round trip, image ids, immutable changes, validation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from typing import Any

import pytest

from runtime.errors import SpecError
from runtime.image.config import (
    ContainerConfig,
    FrozenDict,
    Healthcheck,
    HistoryEntry,
    ImageConfig,
    RootFS,
    canonical_json,
    host_architecture,
    image_id,
)

L1 = "sha256:" + "1" * 64
L2 = "sha256:" + "2" * 64

# What docker writes for a small image: unmodelled keys (Hostname, container_config...), nulls,
# a docker-only Healthcheck, sets written as {"key": {}}.
DOCKER_CONFIG: dict[str, Any] = {
    "architecture": "amd64",
    "config": {
        "Hostname": "",
        "Domainname": "",
        "User": "app",
        "AttachStdin": False,
        "ExposedPorts": {"8080/tcp": {}, "53/udp": {}},
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
        "Cmd": ["python3"],
        "Healthcheck": {"Test": ["CMD", "true"], "Interval": 30_000_000_000, "Retries": 3},
        "ArgsEscaped": True,
        "Image": "sha256:" + "9" * 64,
        "Volumes": {"/data": {}},
        "WorkingDir": "/srv",
        "Entrypoint": None,
        "OnBuild": None,
        "Labels": {"org.opencontainers.image.title": "démo"},
        "StopSignal": "SIGTERM",
        "Shell": ["/bin/bash", "-c"],
    },
    "container_config": {"Cmd": ["/bin/sh", "-c", "#(nop) CMD python3"]},
    "created": "2024-01-02T03:04:05.123456789Z",
    "docker_version": "24.0.7",
    "history": [
        {"created": "2024-01-02T03:04:00Z", "created_by": "/bin/sh -c #(nop) ADD file:x in /"},
        {"created": "2024-01-02T03:04:05Z", "created_by": "CMD [python3]", "empty_layer": True},
        {"created": "2024-01-02T03:04:05Z", "created_by": "RUN make", "comment": "buildkit"},
    ],
    "os": "linux",
    "rootfs": {"type": "layers", "diff_ids": [L1, L2]},
}


def test_docker_config_round_trips_exactly() -> None:
    config = ImageConfig.from_dict(DOCKER_CONFIG)
    assert config.to_dict() == DOCKER_CONFIG
    assert config.to_json() == canonical_json(DOCKER_CONFIG)
    # from any spelling of the same JSON
    pretty = json.dumps(DOCKER_CONFIG, indent=4, ensure_ascii=True)
    assert ImageConfig.from_json(pretty) == config
    assert ImageConfig.from_json(config.to_json()) == config


def test_modelled_fields_are_typed() -> None:
    config = ImageConfig.from_dict(DOCKER_CONFIG)
    c = config.container
    assert c.user == "app"
    assert c.exposed_ports == ("53/udp", "8080/tcp")
    assert c.env_map == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    assert c.entrypoint is None
    assert c.cmd == ("python3",)
    assert c.volumes == ("/data",)
    assert c.labels == {"org.opencontainers.image.title": "démo"}
    assert c.healthcheck == Healthcheck(test=("CMD", "true"), interval=30_000_000_000, retries=3)
    assert c.shell == ("/bin/bash", "-c")
    assert config.diff_ids == (L1, L2)
    assert config.history is not None
    assert config.history[1].empty_layer is True
    assert config.extra["docker_version"] == "24.0.7"
    assert c.extra["Hostname"] == ""


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": [1, {"d": None, "c": "é"}], "a": True}) == (
        '{"a":true,"b":[1,{"c":"é","d":null}]}'.encode()
    )
    with pytest.raises(SpecError):
        canonical_json({"x": float("nan")})


def test_image_id_is_sha256_of_the_canonical_bytes() -> None:
    config = ImageConfig.from_dict(DOCKER_CONFIG)
    expected = "sha256:" + hashlib.sha256(canonical_json(DOCKER_CONFIG)).hexdigest()
    assert config.id == expected == image_id(config.to_json())


def test_changes_are_immutable_and_change_the_id() -> None:
    base = ImageConfig.from_dict(DOCKER_CONFIG)
    before = base.to_json()
    changed = base.with_env({"LANG": "en_US.UTF-8", "NEW": "1"})
    assert base.to_json() == before
    assert changed.container.env == (
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "LANG=en_US.UTF-8",
        "NEW=1",
    )
    assert changed.id != base.id
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.os = "windows"  # type: ignore[misc]


def test_setting_a_null_field_replaces_the_null() -> None:
    config = ImageConfig.from_dict(DOCKER_CONFIG).with_config(entrypoint=("/init",))
    assert config.to_dict()["config"]["Entrypoint"] == ["/init"]
    cleared = config.with_config(entrypoint=None)
    assert cleared.to_dict()["config"]["Entrypoint"] is None  # the original null again


def test_add_layer_and_history() -> None:
    config = ImageConfig.empty(architecture="arm64")
    assert config.to_dict() == {
        "architecture": "arm64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    config = config.add_layer(L1, created_by="COPY . /", created="2024-01-01T00:00:00Z")
    config = config.add_history(created_by='CMD ["x"]')
    config = config.with_config(cmd=("x",))
    assert config.diff_ids == (L1,)
    assert config.history == (
        HistoryEntry(created="2024-01-01T00:00:00Z", created_by="COPY . /"),
        HistoryEntry(created_by='CMD ["x"]', empty_layer=True),
    )
    assert config.created == "2024-01-01T00:00:00Z"
    # the number of non-empty history entries matches the layers, as the spec requires
    assert config.history is not None
    assert sum(not h.empty_layer for h in config.history) == len(config.diff_ids)
    with pytest.raises(SpecError, match="invalid digest"):
        config.add_layer("sha256:nope")


def test_with_labels_merges() -> None:
    config = ImageConfig.empty().with_labels({"a": "1", "b": "2"}).with_labels({"b": "3"})
    assert config.container.labels == {"a": "1", "b": "3"}


def test_with_config_rejects_unknown_fields() -> None:
    with pytest.raises(SpecError, match="nope"):
        ImageConfig.empty().with_config(nope=1)


def test_with_env_rejects_bad_names() -> None:
    with pytest.raises(SpecError, match="'A=B'"):
        ContainerConfig().with_env({"A=B": "x"})


def test_configs_pickle_and_hash() -> None:
    config = ImageConfig.from_dict(DOCKER_CONFIG)
    again = pickle.loads(pickle.dumps(config))
    assert again == config
    assert hash(again) == hash(config)
    assert again.to_json() == config.to_json()


def test_frozen_dict_is_read_only() -> None:
    labels = FrozenDict({"a": "1"})
    with pytest.raises(TypeError):
        labels["b"] = "2"  # type: ignore[index]
    assert labels.merged({"b": "2"}) == {"a": "1", "b": "2"}
    assert labels == {"a": "1"}


def test_unmodelled_json_is_frozen_too() -> None:
    config = ImageConfig.from_dict(DOCKER_CONFIG)
    nested = config.extra["container_config"]
    assert isinstance(nested, FrozenDict)
    assert nested["Cmd"] == ("/bin/sh", "-c", "#(nop) CMD python3")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("architecture"), "missing required key 'architecture'"),
        (lambda d: d.update(os=None), "os: expected a string, got null"),
        (lambda d: d["rootfs"].pop("diff_ids"), "rootfs: missing required key 'diff_ids'"),
        (lambda d: d["config"].update(Env="PATH=/bin"), r"config\.Env: expected a list"),
        (lambda d: d["config"].update(Env=["A=1", 2]), r"config\.Env\[1\]: expected a string"),
        (lambda d: d["config"].update(ExposedPorts=["80"]), r"config\.ExposedPorts: expected"),
        (lambda d: d["config"]["Healthcheck"].update(Retries="3"), r"Healthcheck\.Retries"),
        (lambda d: d["config"]["Healthcheck"].update(Retries=True), "an integer"),
        (lambda d: d["history"][1].update(empty_layer="yes"), r"history\[1\]\.empty_layer"),
        (lambda d: d["rootfs"].update(type="other"), "rootfs.type must be 'layers'"),
        (lambda d: d["rootfs"].update(diff_ids=["sha256:x"]), r"rootfs\.diff_ids\[0\]"),
        (lambda d: d["config"].update(Labels={"a": 1}), r"config\.Labels\.a"),
        (lambda d: d.update(config=[]), "config: expected an object"),
    ],
)
def test_validation_names_the_key(change: Any, message: str) -> None:
    data = json.loads(json.dumps(DOCKER_CONFIG))
    change(data)
    with pytest.raises(SpecError, match=message):
        ImageConfig.from_dict(data)


def test_not_json() -> None:
    with pytest.raises(SpecError, match="not valid JSON"):
        ImageConfig.from_json(b"{")
    with pytest.raises(SpecError, match="expected an object"):
        ImageConfig.from_json(b"[]")


def test_rootfs_and_history_defaults() -> None:
    assert RootFS().to_dict() == {"type": "layers", "diff_ids": []}
    assert HistoryEntry().to_dict() == {}


def test_host_architecture_uses_oci_names() -> None:
    assert host_architecture() in {"amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64"}
