"""Container specs are validated when built; user-facing strings parse as docker's do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.errors import SpecError
from runtime.spec import (
    DEFAULT_PATH,
    BindMount,
    ContainerSpec,
    Rootfs,
    TmpfsMount,
    parse_env,
    parse_tmpfs,
    parse_volume,
)

HOST = Rootfs(host=True)


def test_a_minimal_spec_has_docker_like_defaults() -> None:
    spec = ContainerSpec(HOST)
    assert spec.argv is None and spec.cwd == "/" and spec.user is None
    assert dict(spec.env) == {"PATH": DEFAULT_PATH}
    assert spec.network == "none" and spec.init and not spec.read_only


def test_argv_becomes_a_tuple_and_env_a_frozen_copy() -> None:
    env = {"A": "1"}
    spec = ContainerSpec(HOST, argv=["echo", "hi"], env=env)  # type: ignore[arg-type]
    env["A"] = "2"
    assert spec.argv == ("echo", "hi")
    assert spec.env["A"] == "1"
    with pytest.raises(TypeError):
        spec.env["B"] = "x"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"argv": ()}, "command must not be empty"),
        ({"cwd": "work"}, "working directory must be absolute: 'work'"),
        ({"hostname": "-bad"}, "invalid hostname: '-bad'"),
        ({"hostname": "a" * 64}, "invalid hostname"),
        ({"hostname": "has_underscore"}, "invalid hostname"),
        ({"network": "bridge"}, "unsupported network mode 'bridge'"),
        ({"env": {"": "x"}}, "invalid environment variable name: ''"),
        ({"env": {"A=B": "x"}}, "invalid environment variable name: 'A=B'"),
        ({"env": {"A\0": "x"}}, "invalid environment variable name"),
        ({"env": {"A": "x\0y"}}, "environment variable 'A' contains a NUL character"),
        ({"argv": ("echo", "a\0b")}, "the command must not contain NUL characters"),
    ],
)
def test_invalid_specs_are_refused_with_the_offending_value(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        ContainerSpec(HOST, **kwargs)  # type: ignore[arg-type]


def test_the_supported_network_modes() -> None:
    assert ContainerSpec(HOST, network="none").network == "none"
    assert ContainerSpec(HOST, network="host").network == "host"


def test_spec_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        ContainerSpec(HOST, cwd="rel")


def test_a_valid_hostname_of_63_characters_is_accepted() -> None:
    assert ContainerSpec(HOST, hostname="a" + "-b" * 31).hostname.endswith("b")


def test_a_rootfs_needs_a_layer_or_the_host() -> None:
    with pytest.raises(SpecError, match="at least one layer"):
        Rootfs()
    with pytest.raises(SpecError, match="'layers/x'"):
        Rootfs(lowers=("layers/x",))
    assert Rootfs(lowers=("/l",), host=True).lowers == ("/l",)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: BindMount("rel", "/x"), "source must be an absolute path: 'rel'"),
        (lambda: BindMount("/x", "y"), "bind mount target must be an absolute path"),
        (lambda: BindMount("/x", "/a/../etc"), "must not contain '..'"),
        (lambda: TmpfsMount("scratch"), "tmpfs target must be an absolute path"),
        (lambda: TmpfsMount("/a/.."), "tmpfs target must not contain '..'"),
        (lambda: BindMount("/x", "/"), "must not be the root directory: '/'"),
        (lambda: TmpfsMount("//"), "must not be the root directory"),
    ],
)
def test_mounts_are_validated(make: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        make()  # type: ignore[operator]


def test_a_dotdot_inside_a_name_is_fine() -> None:
    assert BindMount("/x", "/a..b").target == "/a..b"


def test_parse_volume_forms() -> None:
    assert parse_volume("/src:/dst") == BindMount("/src", "/dst", readonly=False)
    assert parse_volume("/src:/dst:ro") == BindMount("/src", "/dst", readonly=True)
    assert parse_volume("/src:/dst:rw") == BindMount("/src", "/dst", readonly=False)


def test_parse_volume_makes_a_relative_source_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_volume("data:/data").source == os.path.join(str(tmp_path), "data")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/only", "invalid volume '/only': expected SRC:DST"),
        ("/a:/b:ro:x", "invalid volume '/a:/b:ro:x'"),
        ("/a:/b:rx", "mode must be 'ro' or 'rw', not 'rx'"),
        ("/a:rel", "target must be an absolute path"),
    ],
)
def test_parse_volume_errors(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_volume(text)


def test_parse_tmpfs_forms() -> None:
    assert parse_tmpfs("/scratch") == TmpfsMount("/scratch", "mode=1777")
    assert parse_tmpfs("/scratch:size=64m,mode=700") == TmpfsMount("/scratch", "size=64m,mode=700")


def test_parse_tmpfs_errors() -> None:
    with pytest.raises(SpecError, match="tmpfs target must be an absolute path"):
        parse_tmpfs("scratch:size=1m")
    with pytest.raises(SpecError):
        parse_tmpfs(":size=1m")


def test_parse_env_forms() -> None:
    base = {"HOME": "/root", "EMPTY": ""}
    items = ["A=1", "B=x=y", "C=", "HOME", "EMPTY", "MISSING"]
    assert parse_env(items, base) == {"A": "1", "B": "x=y", "C": "", "HOME": "/root", "EMPTY": ""}


def test_parse_env_without_a_base_drops_bare_names() -> None:
    assert parse_env(["A", "B=2"]) == {"B": "2"}


def test_parse_env_later_items_win() -> None:
    assert parse_env(["A=1", "A=2"]) == {"A": "2"}


def test_parse_env_refuses_an_empty_name() -> None:
    with pytest.raises(SpecError, match="invalid environment item '=value'"):
        parse_env(["=value"])
