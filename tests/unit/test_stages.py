"""Multi-stage planning: targets, pruning, stage references, global ARGs."""

from __future__ import annotations

import pytest

from runtime.build import dockerfile as df
from runtime.build.stages import ImageRef, Scratch, StageRef, global_args, plan
from runtime.errors import BuildError, DockerfileSyntaxError

MULTI = """\
ARG PY=3.12
FROM python:${PY}-slim AS base
RUN pip install x

FROM base AS test
COPY --from=builder /wheels /w
RUN pytest

FROM node:20 AS assets
RUN npm ci

FROM base AS builder
RUN --mount=type=cache,target=/root/.cache,from=assets,source=/x build

FROM scratch AS final
COPY --from=builder /app /app
COPY --from=0 /etc/os-release /
"""


def order(text: str, target: str | None = None, **build_args: str) -> list[str | int]:
    result = plan(df.parse(text), target, build_args)
    return [s.name if s.name is not None else s.index for s in result.stages]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, ["base", "assets", "builder", "final"]),
        ("final", ["base", "assets", "builder", "final"]),
        ("FINAL", ["base", "assets", "builder", "final"]),
        ("test", ["base", "assets", "builder", "test"]),  # refers to a later stage
        ("builder", ["base", "assets", "builder"]),
        ("assets", ["assets"]),
        ("base", ["base"]),
    ],
)
def test_target_needs_only_what_it_reaches(target: str | None, expected: list[str]) -> None:
    assert order(MULTI, target) == expected


def test_resolved_references() -> None:
    result = plan(df.parse(MULTI), build_args={"PY": "3.11"})
    base, assets, builder, final = result.stages
    assert base.base == ImageRef("python:3.11-slim")
    assert assets.base == ImageRef("node:20")
    assert builder.base == StageRef(0, "base")
    assert builder.mount_from == {(0, 0): StageRef(2, "assets")}
    assert builder.deps == (0, 2)
    assert final.base == Scratch()
    assert final.copy_from == {0: StageRef(3, "builder"), 1: StageRef(0, "base")}
    assert result.target is final
    assert result.stage(2) is assets
    with pytest.raises(KeyError):
        result.stage(1)  # "test" is not needed


def test_unknown_target_lists_the_stages() -> None:
    with pytest.raises(BuildError) as info:
        plan(df.parse(MULTI), "tset")
    assert "'tset' could not be found" in str(info.value)
    assert "assets, base, builder, final, test" in str(info.value)
    with pytest.raises(BuildError, match="no stage has a name"):
        plan(df.parse("FROM a\nFROM b\n"), "x")


def test_independent_stages_are_pruned_and_ties_keep_dockerfile_order() -> None:
    text = "FROM a AS one\nFROM b AS two\nFROM c AS three\nFROM d\nCOPY --from=three x y\n"
    text += "COPY --from=one x y\n"
    assert order(text) == ["one", "three", 3]


@pytest.mark.parametrize(
    ("text", "build_args", "image"),
    [
        ("ARG V=1\nFROM img:$V\n", {}, "img:1"),
        ("ARG V=1\nFROM img:$V\n", {"V": "2"}, "img:2"),
        ("ARG A=1\nARG B=${A}.0\nFROM img:$B\n", {"A": "3"}, "img:3.0"),
        ("ARG A=1 B=$A\nFROM img:$B\n", {}, "img:1"),
        ("ARG V\nFROM img${V:+:}$V\n", {}, "img"),
        ("ARG REG=docker.io\nFROM ${REG}/lib/x\n", {}, "docker.io/lib/x"),
        ("FROM img:$V\n", {"V": "2"}, "img:"),  # a build arg without a global ARG is not seen
        ("ARG V=1\nFROM a\nARG V=2\nFROM img:$V\n", {}, "img:1"),  # stage ARGs are not global
    ],
)
def test_from_sees_only_global_args(text: str, build_args: dict[str, str], image: str) -> None:
    result = plan(df.parse(text), build_args=build_args)
    assert result.target.base == ImageRef(image)


def test_builtin_args_are_visible_to_from_and_platform() -> None:
    parsed = df.parse("FROM --platform=$BUILDPLATFORM golang AS b\nFROM b\n")
    result = plan(parsed, builtin_args={"BUILDPLATFORM": "linux/amd64"})
    assert result.stages[0].platform == "linux/amd64"
    assert result.global_env["BUILDPLATFORM"] == "linux/amd64"


def test_global_args_values() -> None:
    parsed = df.parse("ARG A=1\nARG B\nARG C=$A$B\nFROM x\n")
    assert global_args(parsed) == {"A": "1", "C": "1"}
    assert global_args(parsed, {"B": "2"}) == {"A": "1", "B": "2", "C": "12"}


def test_from_expanded_name_refers_to_a_stage() -> None:
    text = "ARG FLAVOR=dev\nFROM a AS dev\nFROM b AS prod\nFROM ${FLAVOR}\n"
    assert plan(df.parse(text)).target.base == StageRef(0, "dev")
    assert plan(df.parse(text), build_args={"FLAVOR": "PROD"}).target.base == StageRef(1, "prod")
    assert order(text, FLAVOR="prod") == ["prod", 2]


def test_copy_from_is_matched_as_written_then_expanded_as_an_image() -> None:
    text = "ARG IMG=busybox:1\nARG S=build\nFROM a AS build\nFROM b\nCOPY --from=$IMG / /\n"
    text += "COPY --from=$S / /\nCOPY --from=Build / /\nCOPY --from=scratch / /\n"
    target = plan(df.parse(text)).target
    assert target.copy_from == {
        0: ImageRef("busybox:1"),
        1: ImageRef("build"),  # docker does not look up stage names after expansion
        2: StageRef(0, "build"),
        3: Scratch(),
    }
    assert target.deps == (0,)


def test_stage_named_like_its_base_image_is_not_a_self_reference() -> None:
    result = plan(df.parse("FROM alpine AS alpine\nRUN x\n"))
    assert result.target.base == ImageRef("alpine")


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("FROM a\nCOPY --from=5 x y\n", 2, "invalid stage index 5"),
        ("FROM a AS x\nCOPY --from=x a b\n", 2, "circular dependency detected on stage: x"),
        ("FROM a\nCOPY --from=0 a b\n", 2, "refers to itself"),
        ("FROM a\nRUN --mount=from=0,target=/x true\n", 2, "refers to itself"),
        (
            "FROM a AS x\nCOPY --from=y a b\nFROM b AS y\nCOPY --from=x a b\n",
            3,
            "circular dependency detected on stage: y -> x -> y",
        ),
        ("ARG E\nFROM $E\n", 2, "base name ($E) should not be blank"),
        ("FROM a\nCOPY --from=$NOPE a b\n", 2, "base name ($NOPE) should not be blank"),
        ("FROM ${X:?need_X}\n", 1, "X: need_X"),
    ],
)
def test_reference_errors(text: str, line: int, fragment: str) -> None:
    with pytest.raises(DockerfileSyntaxError) as info:
        plan(df.parse(text, path="Dfile"))
    assert info.value.line == line and info.value.path == "Dfile"
    assert fragment in str(info.value)


def test_cycle_outside_the_target_does_not_matter() -> None:
    text = "FROM a AS x\nCOPY --from=y a b\nFROM b AS y\nCOPY --from=x a b\nFROM c AS ok\n"
    assert order(text) == ["ok"]


def test_unused_build_args() -> None:
    text = "ARG G\nFROM a AS one\nARG USED\nFROM b AS two\nARG OTHER\n"
    result = plan(
        df.parse(text),
        "one",
        {"G": "1", "USED": "1", "OTHER": "1", "TYPO": "1", "HTTP_PROXY": "p", "BUILDKIT_X": "1"},
    )
    assert result.unused_build_args == ("OTHER", "TYPO")
