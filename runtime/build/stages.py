"""Multi-stage planning: which stages a target needs, in which order, from what.

Pure: a parsed :class:`~runtime.build.dockerfile.Dockerfile`, the ``--target`` and the build
args in; a :class:`BuildPlan` out. BuildKit semantics:

* global ARGs (before the first FROM) take their defaults in order, each default expanded with
  the ones before it; a build arg overrides a declared ARG. Only they (and the builder's
  built-in args such as ``TARGETPLATFORM``) are visible in FROM lines and ``COPY --from``;
* ``FROM <name>`` names another stage (case-insensitively) after expansion, else an image;
  ``scratch`` is the empty image;
* ``COPY --from=`` and ``RUN --mount=from=`` name a stage by name or index *as written*;
  otherwise they name an image, expanded with the global ARGs. A stage may use a stage defined
  after it, but never itself, and dependencies must not form a cycle;
* only the stages the target reaches are built, dependencies first (by index among equals);
  the default target is the last stage.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from runtime.build.dockerfile import Arg, Copy, Dockerfile, Instruction, Run, Stage
from runtime.build.expand import Expander, ExpansionError
from runtime.errors import BuildError, DockerfileSyntaxError

__all__ = [
    "PREDEFINED_ARGS",
    "BuildPlan",
    "ImageRef",
    "PlannedStage",
    "Scratch",
    "Source",
    "StageRef",
    "global_args",
    "plan",
]

#: Build args docker accepts without an ARG line (proxies), never reported as unused.
PREDEFINED_ARGS = frozenset(
    {
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "FTP_PROXY",
        "ftp_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "SOURCE_DATE_EPOCH",
    }
)


@dataclass(frozen=True)
class StageRef:
    """Another stage of this Dockerfile."""

    index: int
    name: str | None = None


@dataclass(frozen=True)
class ImageRef:
    """An image reference (expanded, not yet normalised or resolved)."""

    ref: str


@dataclass(frozen=True)
class Scratch:
    """The empty image (``FROM scratch``)."""


Source = StageRef | ImageRef | Scratch


@dataclass(frozen=True)
class PlannedStage:
    """A stage to build, with every reference it makes resolved.

    ``copy_from`` maps the position of a ``COPY --from`` in ``stage.instructions`` to its
    source; ``mount_from`` maps (position, mount index) of a ``RUN --mount=from=`` likewise.
    ``deps`` are the stage indexes this one needs built first.
    """

    stage: Stage
    base: Source
    platform: str | None
    copy_from: Mapping[int, Source] = field(default_factory=lambda: MappingProxyType({}))
    mount_from: Mapping[tuple[int, int], Source] = field(
        default_factory=lambda: MappingProxyType({})
    )
    deps: tuple[int, ...] = ()

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def name(self) -> str | None:
        return self.stage.name


@dataclass(frozen=True)
class BuildPlan:
    """The stages to build in order (the target last), and the global ARG values.

    ``global_env`` holds the global ARGs that have a value (plus the built-in args), which the
    builder offers to ``ARG NAME`` lines inside stages. ``unused_build_args`` are build args no
    ARG of the global scope or of a needed stage declares (docker warns about them).
    """

    stages: tuple[PlannedStage, ...]
    global_env: Mapping[str, str]
    unused_build_args: tuple[str, ...] = ()

    @property
    def target(self) -> PlannedStage:
        return self.stages[-1]

    def stage(self, index: int) -> PlannedStage:
        """The planned stage with this Dockerfile index (``KeyError`` if not needed)."""
        for planned in self.stages:
            if planned.index == index:
                return planned
        raise KeyError(index)


def global_args(
    dockerfile: Dockerfile,
    build_args: Mapping[str, str] | None = None,
    builtin_args: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables a FROM line sees: built-in args, then each global ARG in order.

    A global ARG takes the build arg of its name if given, else its default expanded with the
    variables before it; one with neither stays unset.
    """
    env = dict(builtin_args or {})
    overrides = build_args or {}
    for arg in dockerfile.meta_args:
        for decl in arg.args:
            ex = Expander(env, dockerfile.escape)
            try:
                name = ex.word(decl.name)
                if name in overrides:
                    env[name] = overrides[name]
                elif decl.default is not None:
                    env[name] = ex.word(decl.default)
            except ExpansionError as e:
                raise DockerfileSyntaxError(dockerfile.path, arg.line, f"ARG: {e}") from e
    return env


def _expand_ref(
    dockerfile: Dockerfile, text: str, env: Mapping[str, str], instr: Instruction
) -> str:
    try:
        value = Expander(env, dockerfile.escape).word(text)
    except ExpansionError as e:
        raise DockerfileSyntaxError(dockerfile.path, instr.line, f"{instr.keyword}: {e}") from e
    if not value:
        raise DockerfileSyntaxError(
            dockerfile.path,
            instr.line,
            f"{instr.keyword}: base name ({text}) should not be blank",
        )
    return value


def _image_or_scratch(ref: str) -> Source:
    return Scratch() if ref == "scratch" else ImageRef(ref)


def _resolve_from_flag(
    dockerfile: Dockerfile,
    ref: str,
    current: int,
    names: Mapping[str, int],
    env: Mapping[str, str],
    instr: Instruction,
) -> Source:
    """Resolve ``COPY --from`` / ``--mount=from=``: stage index, stage name, else image."""
    if ref.isdecimal():
        index = int(ref)
        if index >= len(dockerfile.stages):
            raise DockerfileSyntaxError(
                dockerfile.path,
                instr.line,
                f"{instr.keyword}: invalid stage index {index}: the Dockerfile has "
                f"{len(dockerfile.stages)} stage(s)",
            )
    elif ref.lower() in names:
        index = names[ref.lower()]
    else:
        return _image_or_scratch(_expand_ref(dockerfile, ref, env, instr))
    if index == current:
        raise DockerfileSyntaxError(
            dockerfile.path,
            instr.line,
            f"{instr.keyword}: circular dependency detected on stage: "
            f"{dockerfile.stages[index].name or index} refers to itself",
        )
    return StageRef(index, dockerfile.stages[index].name)


def _plan_stage(
    dockerfile: Dockerfile, stage: Stage, names: Mapping[str, int], env: Mapping[str, str]
) -> PlannedStage:
    image = _expand_ref(dockerfile, stage.from_.image, env, stage.from_)
    platform = None
    if stage.from_.platform is not None:
        try:
            platform = Expander(env, dockerfile.escape).word(stage.from_.platform)
        except ExpansionError as e:
            raise DockerfileSyntaxError(
                dockerfile.path, stage.from_.line, f"FROM --platform: {e}"
            ) from e
    base: Source
    other = names.get(image.lower())
    if other is not None and other != stage.index:
        base = StageRef(other, dockerfile.stages[other].name)
    else:
        base = _image_or_scratch(image)
    copy_from: dict[int, Source] = {}
    mount_from: dict[tuple[int, int], Source] = {}
    for pos, instr in enumerate(stage.instructions):
        if isinstance(instr, Copy) and instr.from_ is not None:
            copy_from[pos] = _resolve_from_flag(
                dockerfile, instr.from_, stage.index, names, env, instr
            )
        elif isinstance(instr, Run):
            for k, mount in enumerate(instr.mounts):
                if mount.from_:
                    mount_from[(pos, k)] = _resolve_from_flag(
                        dockerfile, mount.from_, stage.index, names, env, instr
                    )
    refs = [base, *copy_from.values(), *mount_from.values()]
    deps = sorted({r.index for r in refs if isinstance(r, StageRef)})
    return PlannedStage(
        stage=stage,
        base=base,
        platform=platform,
        copy_from=MappingProxyType(copy_from),
        mount_from=MappingProxyType(mount_from),
        deps=tuple(deps),
    )


def _needed(dockerfile: Dockerfile, planned: list[PlannedStage], target: int) -> list[int]:
    """The stages reachable from ``target``, dependencies first; a cycle is an error."""
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done

    def visit(index: int, path: list[int]) -> None:
        if state.get(index) == 2:
            return
        if state.get(index) == 1:
            cycle = [*path[path.index(index) :], index]
            shown = " -> ".join(dockerfile.stages[i].name or str(i) for i in cycle)
            raise DockerfileSyntaxError(
                dockerfile.path,
                dockerfile.stages[index].from_.line,
                f"circular dependency detected on stage: {shown}",
            )
        state[index] = 1
        for dep in planned[index].deps:
            visit(dep, [*path, index])
        state[index] = 2

    visit(target, [])
    needed = set(state)
    # Kahn's algorithm over the needed subgraph, smallest index first among the ready ones.
    waiting = {i: {d for d in planned[i].deps if d in needed} for i in needed}
    ready = [i for i, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for other, deps in waiting.items():
            if index in deps:
                deps.discard(index)
                if not deps:
                    heapq.heappush(ready, other)
    return order


def plan(
    dockerfile: Dockerfile,
    target: str | None = None,
    build_args: Mapping[str, str] | None = None,
    builtin_args: Mapping[str, str] | None = None,
) -> BuildPlan:
    """Plan the build of ``target`` (a stage name, any case; default: the last stage).

    Raises :class:`~runtime.errors.BuildError` for an unknown target and
    :class:`~runtime.errors.DockerfileSyntaxError` (with the line) for a bad stage index, a
    stage that refers to itself, a dependency cycle, or a FROM that expands to nothing.
    """
    build_args = build_args or {}
    env = global_args(dockerfile, build_args, builtin_args)
    names = {s.name: s.index for s in dockerfile.stages if s.name is not None}
    planned = [_plan_stage(dockerfile, stage, names, env) for stage in dockerfile.stages]
    if target is None:
        target_index = len(dockerfile.stages) - 1
    elif target.lower() in names:
        target_index = names[target.lower()]
    else:
        known = ", ".join(sorted(names)) or "none (no stage has a name: use FROM image AS name)"
        raise BuildError(
            f"{dockerfile.path}: target stage {target!r} could not be found; named stages: {known}"
        )
    order = _needed(dockerfile, planned, target_index)
    stages = tuple(planned[i] for i in order)
    declared = {d.name for a in dockerfile.meta_args for d in a.args}
    for planned_stage in stages:
        for instr in planned_stage.stage.instructions:
            if isinstance(instr, Arg):
                declared.update(d.name for d in instr.args)
    unused = tuple(
        sorted(
            name
            for name in build_args
            if name not in declared
            and name not in PREDEFINED_ARGS
            and not name.startswith("BUILDKIT_")
        )
    )
    return BuildPlan(stages=stages, global_env=MappingProxyType(env), unused_build_args=unused)
