"""Image references: docker's normalization, the familiar form, and errors that name the input."""

from __future__ import annotations

import pytest

from runtime.errors import SpecError
from runtime.image import reference
from runtime.image.reference import Reference, check_digest, is_special, normalize, parse

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
        ("user/img:tag", "docker.io/user/img:tag"),
        ("user/deep/img", "docker.io/user/deep/img:latest"),
        ("localhost/img", "localhost/img:latest"),
        ("localhost:5000/x/y:1", "localhost:5000/x/y:1"),
        ("registry.example.com/team/app:v2.0-rc_1", "registry.example.com/team/app:v2.0-rc_1"),
        ("127.0.0.1:5000/img", "127.0.0.1:5000/img:latest"),
        ("[::1]:5000/img:t", "[::1]:5000/img:t"),
        (f"host:5000/img@{D1}", f"host:5000/img@{D1}"),
        (f"name:tag@{D1}", f"docker.io/library/name:tag@{D1}"),
        (f"busybox@{D2}", f"docker.io/library/busybox@{D2}"),
        ("a__b-c---d/e_f.g", "docker.io/a__b-c---d/e_f.g:latest"),
        # a dot makes the first component a registry
        ("a.b/c", "a.b/c:latest"),
        # capitals make the first component a registry, as in docker
        ("Registry/img", "Registry/img:latest"),
        # without a slash, host:port is a name and a tag (docker agrees)
        ("localhost:5000", "docker.io/library/localhost:5000"),
    ],
)
def test_normalizes_like_docker(text: str, canonical: str) -> None:
    assert normalize(text) == canonical
    assert str(parse(text)) == canonical
    # normalizing is idempotent
    assert normalize(canonical) == canonical


def test_parts_of_a_reference() -> None:
    ref = parse(f"localhost:5000/x/y:1@{D1}")
    assert ref == Reference("localhost:5000", "x/y", "1", D1)
    assert ref.name == "localhost:5000/x/y"


@pytest.mark.parametrize(
    ("text", "familiar"),
    [
        ("busybox", "busybox:latest"),
        ("docker.io/library/busybox:1", "busybox:1"),
        ("docker.io/user/img", "user/img:latest"),
        # only one-component official names lose library/
        ("docker.io/library/a/b", "library/a/b:latest"),
        ("localhost:5000/x", "localhost:5000/x:latest"),
        (f"busybox@{D1}", f"busybox@{D1}"),
    ],
)
def test_familiar_form(text: str, familiar: str) -> None:
    assert parse(text).familiar == familiar
    assert normalize(familiar) == normalize(text)


def test_default_tag_can_be_left_off() -> None:
    assert parse("busybox", default_tag=False).tag is None
    assert parse("busybox", default_tag=False).familiar == "busybox"
    assert parse(f"busybox@{D1}").tag is None


def test_with_tag_and_with_digest() -> None:
    ref = parse(f"busybox@{D1}")
    assert ref.with_tag("1.0").canonical == "docker.io/library/busybox:1.0"
    assert parse("busybox:1").with_digest(D1).canonical == f"docker.io/library/busybox:1@{D1}"
    with pytest.raises(SpecError, match="bad tag"):
        ref.with_tag("-bad")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Busybox", "must be lowercase"),
        ("user/Img", "must be lowercase"),
        ("busybox:", "bad tag"),
        ("busybox:-x", "bad tag"),
        ("busybox:" + "t" * 129, "bad tag"),
        ("bus box", "white space"),
        (" busybox", "white space"),
        ("busybox@sha256:abc", "64 lowercase hexadecimal"),
        ("busybox@sha256:" + "A" * 64, "64 lowercase hexadecimal"),
        ("busybox@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("busybox@" + "a" * 64, "expected algorithm:hex"),
        ("a//b", "bad repository path component ''"),
        ("a/b_", "bad repository path component 'b_'"),
        ("a/.b", "bad repository path component '.b'"),
        ("-host.com/a", "bad registry domain"),
        (":tag", "repository name is empty"),
        ("a" * 64, "image id"),
        ("x/" + "a" * 300, "longer than 255"),
    ],
)
def test_invalid_references_name_the_input(text: str, why: str) -> None:
    with pytest.raises(SpecError) as info:
        parse(text)
    message = str(info.value)
    assert repr(text) in message
    assert why in message


@pytest.mark.parametrize("name", ["scratch", "host"])
def test_special_names_are_not_registry_references(name: str) -> None:
    assert is_special(name)
    with pytest.raises(SpecError, match="reserved name"):
        parse(name)


@pytest.mark.parametrize("name", ["scratch:1", "library/scratch", "hosted", "Scratch"])
def test_only_the_exact_special_names_are_special(name: str) -> None:
    assert not is_special(name)


def test_special_constants() -> None:
    assert {reference.SCRATCH, reference.HOST} == {"scratch", "host"}


def test_check_digest() -> None:
    assert check_digest(D1) == D1
    assert check_digest("sha512:" + "b" * 128).startswith("sha512:")
    with pytest.raises(SpecError, match=r"invalid digest 'sha256:xyz'"):
        check_digest("sha256:xyz")
    with pytest.raises(SpecError, match="unsupported"):
        check_digest("crc32:" + "a" * 8)
