"""What a Dockerfile says, as data: the frozen instructions the parser returns, and what docker
expands in each.

These types are what the rest of the builder reads (:mod:`.stages`, :mod:`.expand`,
:mod:`.builder`, the image config code); the text-to-data rules that make them live in
:mod:`.dockerfile`, which re-exports every name here. Kept apart so that code which only
*reads* instructions does not depend on how they are parsed, and the parser stays one job.

:data:`EXPANSION` is docker's table of which instructions (and flags) the builder expands, and
with which variables (:class:`Scope`); :mod:`.expand` applies it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Literal

__all__ = [
    "EXPANSION",
    "Add",
    "Arg",
    "ArgDecl",
    "Cmd",
    "CommandLine",
    "Copy",
    "Directive",
    "Dockerfile",
    "Entrypoint",
    "Env",
    "ExpansionRule",
    "Expose",
    "From",
    "Healthcheck",
    "Heredoc",
    "Instruction",
    "Label",
    "Maintainer",
    "Mount",
    "Onbuild",
    "ParseWarning",
    "Run",
    "Scope",
    "Shell",
    "Stage",
    "StopSignal",
    "User",
    "Volume",
    "Workdir",
    "expansion_rule",
]

# --------------------------------------------------------------------------------------------
# The data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Directive:
    """A parser directive from the top of the file (``# syntax=...``)."""

    name: str
    value: str
    line: int


@dataclass(frozen=True)
class ParseWarning:
    """Something docker accepts but warns about (e.g. an empty continuation line)."""

    line: int
    message: str


@dataclass(frozen=True)
class Heredoc:
    """An inline document: ``<<EOF`` ... ``EOF``.

    ``content`` is the body exactly as written (each line with its newline). ``chomp`` (``<<-``)
    means leading tabs are stripped, which :attr:`text` applies. ``expand`` is true when the
    delimiter was unquoted, so the builder expands ``$VAR`` in a COPY/ADD body (for RUN the
    shell does it).
    """

    name: str
    content: str
    expand: bool = True
    chomp: bool = False
    fd: int | None = None

    @property
    def text(self) -> str:
        """The body with ``<<-`` tab stripping applied."""
        if not self.chomp:
            return self.content
        return re.sub(r"(?m)^\t+", "", self.content)


@dataclass(frozen=True)
class CommandLine:
    """A RUN/CMD/ENTRYPOINT/HEALTHCHECK command.

    In exec (JSON) form ``args`` is the argv. In shell form ``args`` is one string, the command
    text as written, which the builder wraps in the SHELL (``/bin/sh -c``).
    """

    args: tuple[str, ...]
    exec_form: bool

    @property
    def shell_text(self) -> str:
        """The command text of a shell-form command (the args joined by spaces)."""
        return " ".join(self.args)


MountType = Literal["bind", "cache", "tmpfs", "secret", "ssh"]


@dataclass(frozen=True)
class Mount:
    """A ``RUN --mount=...`` spec, as written.

    Values other than ``from`` may use variables; the parser validates what it can see and
    keeps ``raw``, which :func:`runtime.build.expand.expand_instruction` parses again after
    expansion, as BuildKit does. ``from_`` is never expanded (docker refuses variables there).
    """

    raw: str
    type: MountType = "bind"
    target: str | None = None
    source: str | None = None
    from_: str | None = None
    readonly: bool = True
    id: str | None = None
    sharing: Literal["shared", "private", "locked"] | None = None
    required: bool = False
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: str | None = None
    env: str | None = None


@dataclass(frozen=True)
class ArgDecl:
    """One name of an ARG line, with its default (``None`` when it has none)."""

    name: str
    default: str | None = None


@dataclass(frozen=True, kw_only=True)
class Instruction:
    """Common to every instruction: where it is and how it was written.

    ``line``/``end_line`` are 1-based and span continuations and heredoc bodies. ``original``
    is the logical line (continuations joined), as docker records it in the image history.
    """

    keyword: ClassVar[str] = ""

    line: int
    end_line: int
    original: str


@dataclass(frozen=True, kw_only=True)
class From(Instruction):
    keyword: ClassVar[str] = "FROM"
    image: str
    name: str | None = None
    platform: str | None = None


@dataclass(frozen=True, kw_only=True)
class Run(Instruction):
    keyword: ClassVar[str] = "RUN"
    command: CommandLine
    heredocs: tuple[Heredoc, ...] = ()
    mounts: tuple[Mount, ...] = ()
    network: Literal["default", "none", "host"] | None = None
    security: Literal["sandbox", "insecure"] | None = None


@dataclass(frozen=True, kw_only=True)
class Cmd(Instruction):
    keyword: ClassVar[str] = "CMD"
    command: CommandLine


@dataclass(frozen=True, kw_only=True)
class Entrypoint(Instruction):
    keyword: ClassVar[str] = "ENTRYPOINT"
    command: CommandLine


@dataclass(frozen=True, kw_only=True)
class Shell(Instruction):
    keyword: ClassVar[str] = "SHELL"
    args: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Copy(Instruction):
    """COPY. ``sources`` are paths; inline sources (``<<EOF``) are in ``heredocs``."""

    keyword: ClassVar[str] = "COPY"
    sources: tuple[str, ...]
    dest: str
    heredocs: tuple[Heredoc, ...] = ()
    from_: str | None = None
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    parents: bool = False
    excludes: tuple[str, ...] = ()
    exec_form: bool = False


@dataclass(frozen=True, kw_only=True)
class Add(Instruction):
    keyword: ClassVar[str] = "ADD"
    sources: tuple[str, ...]
    dest: str
    heredocs: tuple[Heredoc, ...] = ()
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    keep_git_dir: bool = False
    checksum: str | None = None
    unpack: bool | None = None
    excludes: tuple[str, ...] = ()
    exec_form: bool = False


@dataclass(frozen=True, kw_only=True)
class Workdir(Instruction):
    keyword: ClassVar[str] = "WORKDIR"
    path: str


@dataclass(frozen=True, kw_only=True)
class Env(Instruction):
    """ENV; keys and values are raw words (quotes still in), expanded by the builder."""

    keyword: ClassVar[str] = "ENV"
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class Arg(Instruction):
    keyword: ClassVar[str] = "ARG"
    args: tuple[ArgDecl, ...]


@dataclass(frozen=True, kw_only=True)
class Label(Instruction):
    keyword: ClassVar[str] = "LABEL"
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class Expose(Instruction):
    keyword: ClassVar[str] = "EXPOSE"
    ports: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class User(Instruction):
    keyword: ClassVar[str] = "USER"
    user: str


@dataclass(frozen=True, kw_only=True)
class Volume(Instruction):
    keyword: ClassVar[str] = "VOLUME"
    paths: tuple[str, ...]
    exec_form: bool = False


@dataclass(frozen=True, kw_only=True)
class StopSignal(Instruction):
    keyword: ClassVar[str] = "STOPSIGNAL"
    signal: str


@dataclass(frozen=True, kw_only=True)
class Healthcheck(Instruction):
    """HEALTHCHECK. ``command`` is ``None`` for ``HEALTHCHECK NONE``; durations in nanoseconds
    (as the image config stores them), ``None`` when not given."""

    keyword: ClassVar[str] = "HEALTHCHECK"
    command: CommandLine | None
    interval: int | None = None
    timeout: int | None = None
    start_period: int | None = None
    start_interval: int | None = None
    retries: int | None = None

    @property
    def test(self) -> tuple[str, ...]:
        """The image config's ``Healthcheck.Test``: NONE, CMD argv, or CMD-SHELL text."""
        if self.command is None:
            return ("NONE",)
        if self.command.exec_form:
            return ("CMD", *self.command.args)
        return ("CMD-SHELL", self.command.shell_text)


@dataclass(frozen=True, kw_only=True)
class Onbuild(Instruction):
    """ONBUILD: ``trigger`` is the parsed instruction; ``expression`` the text docker stores in
    the image config (heredoc bodies included), to be parsed by :func:`parse_trigger` later."""

    keyword: ClassVar[str] = "ONBUILD"
    trigger: Instruction
    expression: str


@dataclass(frozen=True, kw_only=True)
class Maintainer(Instruction):
    keyword: ClassVar[str] = "MAINTAINER"
    name: str


@dataclass(frozen=True)
class Stage:
    """A build stage: its FROM and the instructions after it, up to the next FROM."""

    index: int
    from_: From
    instructions: tuple[Instruction, ...]

    @property
    def name(self) -> str | None:
        """The stage name (``FROM x AS name``), lower-cased as docker does."""
        return self.from_.name


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile.

    ``meta_args`` are the ARG lines before the first FROM (the only variables a FROM line
    sees); ``instructions`` is every instruction in order, ``stages`` the same split per FROM.
    """

    path: str
    escape: str
    directives: tuple[Directive, ...]
    meta_args: tuple[Arg, ...]
    stages: tuple[Stage, ...]
    instructions: tuple[Instruction, ...]
    warnings: tuple[ParseWarning, ...] = ()

    @property
    def syntax(self) -> str | None:
        """The ``# syntax=`` frontend, which this builder records but does not use."""
        for d in self.directives:
            if d.name == "syntax":
                return d.value
        return None


# --------------------------------------------------------------------------------------------
# What docker expands, and with which variables
# --------------------------------------------------------------------------------------------


class Scope(enum.Enum):
    """Which variables an expansion sees."""

    NONE = "none"  # not expanded by the builder (the shell may expand at run time)
    STAGE = "stage"  # ARG and ENV values of the stage at that point
    GLOBAL = "global"  # only the ARGs declared before the first FROM (and build args for them)


@dataclass(frozen=True)
class ExpansionRule:
    """How docker expands one instruction kind.

    ``args``: ``"none"``; ``"word"`` (each argument expanded to exactly one word, quotes
    removed, no splitting); ``"split"`` (each argument expanded then split on blanks, like
    EXPOSE); ``"pairs"`` (keys and values of ENV/LABEL/ARG, each as one word). ``flags`` maps
    a flag name to the scope its value is expanded in; flags not listed are not expanded.
    """

    args: Literal["none", "word", "split", "pairs"]
    scope: Scope
    flags: Mapping[str, Scope] = field(default_factory=lambda: MappingProxyType({}))
    note: str = ""


def _rule(
    args: Literal["none", "word", "split", "pairs"],
    scope: Scope,
    note: str = "",
    **flags: Scope,
) -> ExpansionRule:
    return ExpansionRule(args, scope, MappingProxyType(dict(flags)), note)


_NONE = _rule("none", Scope.NONE)

EXPANSION: Mapping[str, ExpansionRule] = MappingProxyType(
    {
        "ADD": _rule(
            "word",
            Scope.STAGE,
            "sources, destination and unquoted-heredoc bodies; --exclude is not expanded",
            chown=Scope.STAGE,
            chmod=Scope.STAGE,
            checksum=Scope.STAGE,
        ),
        "ARG": _rule("pairs", Scope.STAGE, "before the first FROM: global ARGs only"),
        "CMD": _NONE,
        "COPY": _rule(
            "word",
            Scope.STAGE,
            "--from is matched against stage names as written, else expanded with global ARGs",
            chown=Scope.STAGE,
            chmod=Scope.STAGE,
            **{"from": Scope.GLOBAL},
        ),
        "ENTRYPOINT": _NONE,
        "ENV": _rule("pairs", Scope.STAGE, "every pair sees the values from before this line"),
        "EXPOSE": _rule("split", Scope.STAGE),
        "FROM": _rule("word", Scope.GLOBAL, platform=Scope.GLOBAL),
        "HEALTHCHECK": _NONE,
        "LABEL": _rule("pairs", Scope.STAGE),
        "MAINTAINER": _NONE,
        "ONBUILD": _rule("none", Scope.NONE, "the trigger is expanded when it runs, downstream"),
        "RUN": _rule(
            "none",
            Scope.NONE,
            "--mount values are expanded except from=",
            mount=Scope.STAGE,
        ),
        "SHELL": _NONE,
        "STOPSIGNAL": _rule("word", Scope.STAGE),
        "USER": _rule("word", Scope.STAGE),
        "VOLUME": _rule("word", Scope.STAGE),
        "WORKDIR": _rule("word", Scope.STAGE),
    }
)


def expansion_rule(keyword: str) -> ExpansionRule:
    """The :class:`ExpansionRule` for an instruction keyword (any case)."""
    return EXPANSION[keyword.upper()]
