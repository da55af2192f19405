"""Parse Dockerfile text into frozen instructions, with docker's (BuildKit's) rules.

The parser is pure: text in, :class:`Dockerfile` out. It does *not* expand variables, because
which variables an instruction sees depends on the stage, the build args and the ENV lines
before it; the builder expands each instruction when it reaches it (see :mod:`.expand`), using
:data:`EXPANSION` to know what docker expands and with which variables.

The data it returns (:class:`Dockerfile`, the instruction classes, :data:`EXPANSION`) is defined
in :mod:`.instructions` and re-exported here, so ``from runtime.build.dockerfile import Run``
keeps working; this module is the text-to-data rules only.

What it follows, line by line, like BuildKit:

* parser directives (``# escape=``, ``# syntax=``, ``# check=``) only at the very top; the first
  comment, blank line or instruction ends them; each may appear once;
* only lines whose first non-blank character is ``#`` are comments (``RUN echo # x`` keeps ``# x``);
* a line ending with the escape character continues on the next; inside a continuation, comment
  lines and blank lines are skipped (blank ones with a warning, as docker does);
* heredocs (``<<EOF``, ``<<-EOF``, quoted delimiters, several per line) for RUN, COPY, ADD and
  ONBUILD of those, never in JSON form;
* builder flags (``--name[=value]``) before the arguments; per instruction, the flags docker knows;
* JSON (exec) form when the arguments are a valid JSON array of strings, else shell form; a valid
  array with a non-string element is an error, not shell form.

Every error is a :class:`~runtime.errors.DockerfileSyntaxError` naming the file and the first line
of the instruction.
"""

from __future__ import annotations

import csv
import difflib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypedDict, cast

from runtime.build.instructions import (
    EXPANSION,
    Add,
    Arg,
    ArgDecl,
    Cmd,
    CommandLine,
    Copy,
    Directive,
    Dockerfile,
    Entrypoint,
    Env,
    ExpansionRule,
    Expose,
    From,
    Healthcheck,
    Heredoc,
    Instruction,
    Label,
    Maintainer,
    Mount,
    Onbuild,
    ParseWarning,
    Run,
    Scope,
    Shell,
    Stage,
    StopSignal,
    User,
    Volume,
    Workdir,
    expansion_rule,
)
from runtime.errors import DockerfileSyntaxError

__all__ = [
    "DEFAULT_ESCAPE",
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
    "parse",
    "parse_duration",
    "parse_mount",
    "parse_trigger",
]

DEFAULT_ESCAPE = "\\"

# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class _Err(Exception):
    """A parse problem; the loop turns it into DockerfileSyntaxError at the instruction's line."""


_WS = re.compile(r"[\t\v\f\r ]+")
_HEREDOC_WORD = re.compile(r"^(\d*)<<(-?)([^<]*)$")
_DIRECTIVE = re.compile(r"^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9\-_.]*$")
_VALID_DIRECTIVES = frozenset({"escape", "syntax", "check"})
_HEREDOC_KEYWORDS = frozenset({"RUN", "COPY", "ADD"})

_FlagKind = Literal["string", "bool", "list"]
_FLAGS: Mapping[str, Mapping[str, _FlagKind]] = {
    "FROM": {"platform": "string"},
    "RUN": {"mount": "list", "network": "string", "security": "string"},
    "COPY": {
        "from": "string",
        "chown": "string",
        "chmod": "string",
        "link": "bool",
        "parents": "bool",
        "exclude": "list",
    },
    "ADD": {
        "chown": "string",
        "chmod": "string",
        "link": "bool",
        "keep-git-dir": "bool",
        "checksum": "string",
        "unpack": "bool",
        "exclude": "list",
    },
    "HEALTHCHECK": {
        "interval": "string",
        "timeout": "string",
        "start-period": "string",
        "start-interval": "string",
        "retries": "string",
    },
}
_FlagValues = dict[str, str | bool | list[str]]


class _Lines:
    """Physical lines, split on ``\\n`` only (as Go's scanner), each kept with its ending."""

    def __init__(self, text: str) -> None:
        text = text.removeprefix("\ufeff")
        parts = text.split("\n")
        self._lines = [p + "\n" for p in parts[:-1]]
        if parts[-1]:
            self._lines.append(parts[-1])
        self._pos = 0

    def next(self) -> tuple[int, str] | None:
        if self._pos >= len(self._lines):
            return None
        self._pos += 1
        return self._pos, self._lines[self._pos - 1]

    @property
    def last_line(self) -> int:
        return max(len(self._lines), 1)


@dataclass
class _Ctx:
    path: str
    escape: str
    line: int
    end_line: int
    original: str


def _strip_newline(raw: str) -> str:
    return raw.rstrip("\r\n")


def _trim_continuation(line: str, escape: str) -> tuple[str, bool]:
    """Remove a trailing escape char (plus blanks); an escaped escape char does not continue."""
    s = line.rstrip(" \t")
    if s.endswith(escape) and (len(s) == 1 or s[-2] != escape):
        return s[:-1], True
    return line, False


def _parse_words(rest: str, escape: str) -> list[str]:
    """Split on blanks, honouring quotes and the escape char, keeping both in the words.

    This is docker's ``parseWords``: ENV/LABEL/ARG words keep their quotes, which the builder's
    expansion removes later.
    """
    words: list[str] = []
    word: list[str] = []
    blank_ok = False
    quote = ""
    i = 0
    n = len(rest)
    in_word = False
    while i < n:
        ch = rest[i]
        if quote:
            if ch == quote:
                quote = ""
            elif ch == escape and quote != "'":
                if i + 1 == n:
                    i += 1
                    continue
                word.append(ch)
                i += 1
                ch = rest[i]
            word.append(ch)
            i += 1
            continue
        if ch.isspace():
            if in_word and (blank_ok or word):
                words.append("".join(word))
            word, blank_ok, in_word = [], False, False
            i += 1
            continue
        in_word = True
        if ch in "'\"":
            quote = ch
            blank_ok = True
        elif ch == escape:
            if i + 1 == n:
                i += 1
                continue
            word.append(ch)
            i += 1
            ch = rest[i]
        word.append(ch)
        i += 1
    if in_word and (blank_ok or word):
        words.append("".join(word))
    return words


def _extract_flags(line: str) -> tuple[list[str], str]:
    """Take the leading ``--flag[=value]`` words off an instruction's arguments.

    Quotes and backslashes inside a flag are processed (``--mount="type=cache,..."``); a lone
    ``--`` ends the flags; the first word not starting with ``--`` starts the arguments.
    """
    words: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return words, ""
        if not line.startswith("--", i):
            return words, line[i:]
        word: list[str] = []
        quote = ""
        blank_ok = False
        while i < n:
            ch = line[i]
            if quote:
                if ch == quote:
                    quote = ""
                    i += 1
                    continue
                if ch == "\\":
                    if i + 1 == n:
                        i += 1
                        quote = ""
                        continue
                    i += 1
                    ch = line[i]
                word.append(ch)
                i += 1
                continue
            if ch.isspace():
                break
            if ch in "'\"":
                quote, blank_ok = ch, True
                i += 1
                continue
            if ch == "\\":
                if i + 1 == n:
                    i += 1
                    continue
                i += 1
                ch = line[i]
            word.append(ch)
            i += 1
        text = "".join(word)
        if text == "--":
            return words, line[i:]
        if blank_ok or text:
            words.append(text)


def _parse_flags(keyword: str, words: list[str]) -> _FlagValues:
    """Validate flags against what docker accepts for ``keyword``; return name -> value."""
    allowed = _FLAGS.get(keyword, {})
    values: _FlagValues = {}
    for word in words:
        if not word.startswith("--"):
            raise _Err(f"{keyword}: flag {word!r} must start with --")
        body = word[2:]
        name, has_value, value = body.partition("=")
        kind = allowed.get(name)
        if kind is None:
            if allowed:
                known = ", ".join(f"--{k}" for k in sorted(allowed))
                raise _Err(f"{keyword}: unknown flag --{name} (known: {known})")
            raise _Err(f"{keyword}: unknown flag --{name} ({keyword} takes no flags)")
        if kind == "list":
            if not has_value:
                raise _Err(f"{keyword}: missing a value on flag --{name}")
            current = values.setdefault(name, [])
            assert isinstance(current, list)
            current.append(value)
            continue
        if name in values:
            raise _Err(f"{keyword}: duplicate flag specified: --{name}")
        if kind == "bool":
            if not has_value:
                values[name] = True
            elif value.lower() in ("true", "false"):
                values[name] = value.lower() == "true"
            else:
                raise _Err(f"{keyword}: expecting boolean value for flag --{name}, not: {value}")
        else:
            if not has_value:
                raise _Err(f"{keyword}: missing a value on flag --{name}")
            values[name] = value
    return values


def _flag_str(flags: _FlagValues, name: str) -> str | None:
    value = flags.get(name)
    if isinstance(value, str) and value != "":
        return value
    return None


def _flag_bool(flags: _FlagValues, name: str) -> bool | None:
    value = flags.get(name)
    return value if isinstance(value, bool) else None


def _flag_list(flags: _FlagValues, name: str) -> tuple[str, ...]:
    value = flags.get(name)
    return tuple(value) if isinstance(value, list) else ()


def _reject_constant(name: str) -> object:
    raise ValueError(name)


def _try_json(rest: str) -> list[str] | None:
    """The JSON array in ``rest``, or ``None`` if it is not valid JSON (then: shell form).

    A valid array holding anything but strings is an error, as in docker.
    """
    text = rest.lstrip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    if not all(isinstance(v, str) for v in value):
        raise _Err("when using JSON array syntax, arrays must be comprised of strings only")
    return value


def _split_ws(rest: str) -> list[str]:
    return [w for w in _WS.split(rest) if w] if rest else []


def _maybe_json_list(rest: str) -> tuple[list[str], bool]:
    parsed = _try_json(rest)
    if parsed is not None:
        return parsed, True
    return _split_ws(rest), False


def _command_line(rest: str) -> CommandLine:
    parsed = _try_json(rest)
    if parsed is not None:
        return CommandLine(tuple(parsed), True)
    return CommandLine((rest,) if rest else (), False)


# ---- heredocs ------------------------------------------------------------------------------


def _unquote_heredoc_name(rest: str) -> tuple[str | None, bool]:
    """Shell-process a heredoc delimiter: drop quotes and backslashes.

    Returns the name (``None`` unless it is exactly one non-empty word) and whether any part
    was quoted: a quoted delimiter means the body is not expanded.
    """
    out: list[str] = []
    quoted = False
    i, n = 0, len(rest)
    while i < n:
        ch = rest[i]
        if ch.isspace():
            return None, quoted
        if ch == "\\":
            out.append(rest[i + 1 : i + 2])
            i += 2
            continue
        if ch in "'\"":
            quoted = True
            j = i + 1
            while j < n and rest[j] != ch:
                if ch == '"' and rest[j] == "\\" and j + 1 < n and rest[j + 1] in '"\\$':
                    j += 1
                out.append(rest[j])
                j += 1
            if j >= n:
                kind = "single-quote" if ch == "'" else "double-quote"
                raise _Err(f"unexpected end of statement while looking for matching {kind}")
            i = j + 1
            continue
        out.append(ch)
        i += 1
    return "".join(out) or None, quoted


def _heredoc_marker(word: str) -> Heredoc | None:
    """If ``word`` is a heredoc marker (``<<EOF``, ``2<<-'EOF'``), its (empty) Heredoc."""
    m = _HEREDOC_WORD.match(word)
    if m is None or not m.group(3):
        return None
    fd_text, dash, rest = m.groups()
    name, quoted = _unquote_heredoc_name(rest)
    if name is None:
        return None
    return Heredoc(
        name=name,
        content="",
        expand=not quoted,
        chomp=dash == "-",
        fd=int(fd_text) if fd_text else None,
    )


def _read_heredocs(line: str, lines: _Lines, end_line: int) -> tuple[tuple[Heredoc, ...], int]:
    """Read the bodies of the heredocs named on ``line`` from the following physical lines."""
    markers = [h for h in (_heredoc_marker(w) for w in _parse_words(line, "\\")) if h]
    docs: list[Heredoc] = []
    for marker in markers:
        body: list[str] = []
        while True:
            item = lines.next()
            if item is None:
                raise _Err(f"unterminated heredoc: no line {marker.name!r} before end of file")
            end_line, raw = item
            candidate = _strip_newline(raw)
            if marker.chomp:
                candidate = candidate.lstrip("\t")
            if candidate == marker.name:
                break
            body.append(raw)
        docs.append(
            Heredoc(marker.name, "".join(body), marker.expand, marker.chomp, marker.fd),
        )
    return tuple(docs), end_line


def _may_hold_heredoc(keyword: str, rest: str, escape: str) -> bool:
    """Docker reads heredoc bodies for RUN/COPY/ADD (and ONBUILD of them), not in JSON form."""
    if keyword == "ONBUILD":
        sub_keyword, sub_rest = _split_keyword(rest)
        _, sub_args = _extract_flags(sub_rest)
        return _may_hold_heredoc(sub_keyword.upper(), sub_args.strip(), escape)
    if keyword not in _HEREDOC_KEYWORDS:
        return False
    try:
        return _try_json(rest) is None
    except _Err:
        return False


# ---- mounts and durations ------------------------------------------------------------------

_MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret", "ssh")
_SHARING = ("shared", "private", "locked")
_MOUNT_KEYS = (
    "type",
    "from",
    "source",
    "src",
    "target",
    "dst",
    "destination",
    "readonly",
    "ro",
    "readwrite",
    "rw",
    "required",
    "id",
    "sharing",
    "mode",
    "uid",
    "gid",
    "size",
    "env",
)


def _parse_bool(key: str, value: str) -> bool:
    # Go's strconv.ParseBool
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f"invalid value for {key}: {value}")


def _parse_uint(key: str, value: str, base: int) -> int:
    try:
        number = int(value, base)
    except ValueError:
        number = -1
    if number < 0 or number > 0xFFFFFFFF or value.startswith(("+", "-")):
        raise ValueError(f"invalid value {value} for {key}")
    return number


def parse_mount(text: str, expand: Callable[[str], str] | None = None) -> Mount:
    """Parse one ``--mount`` value (CSV of ``key=value``) into a :class:`Mount`.

    With ``expand`` (the builder's word expander) every value but ``from`` is expanded first,
    which is how docker treats mounts at build time. Without it (parse time), a value holding
    ``$`` is left for later and not validated. Raises ``ValueError`` with docker's message.
    """
    try:
        fields = next(csv.reader([text], strict=True))
    except (csv.Error, StopIteration) as e:
        raise ValueError(f"failed to parse csv mounts: {e}") from e
    kw: dict[str, object] = {}
    mtype = "bind"
    ro_auto = True
    for item in fields:
        key, has_value, value = item.partition("=")
        key = key.lower()
        if not has_value:
            if key in ("readonly", "ro"):
                kw["readonly"], ro_auto = True, False
                continue
            if key in ("readwrite", "rw"):
                kw["readonly"], ro_auto = False, False
                continue
            if key == "required":
                if mtype not in ("secret", "ssh"):
                    raise ValueError(f"unexpected key '{key}' for mount type '{mtype}'")
                kw["required"] = True
                continue
            raise ValueError(f"invalid field '{item}' must be a key=value pair")
        if key == "from" and re.search(r"\$.", value):
            raise ValueError(
                "'from' doesn't support variable expansion, define alias stage instead"
            )
        if key != "from":
            if expand is not None:
                value = expand(value)
            elif "$" in value:
                continue  # deferred: validated when the builder expands it
        if key == "type":
            if value.lower() not in _MOUNT_TYPES:
                raise ValueError(
                    f"unsupported mount type {value!r} (one of: {', '.join(_MOUNT_TYPES)})"
                )
            mtype = value.lower()
        elif key == "from":
            kw["from_"] = value
        elif key in ("source", "src"):
            kw["source"] = value
        elif key in ("target", "dst", "destination"):
            kw["target"] = value
        elif key in ("readonly", "ro"):
            kw["readonly"], ro_auto = _parse_bool(key, value), False
        elif key in ("readwrite", "rw"):
            kw["readonly"], ro_auto = not _parse_bool(key, value), False
        elif key == "required":
            if mtype not in ("secret", "ssh"):
                raise ValueError(f"unexpected key '{key}' for mount type '{mtype}'")
            kw["required"] = _parse_bool(key, value)
        elif key == "id":
            kw["id"] = value
        elif key == "sharing":
            if value.lower() not in _SHARING:
                raise ValueError(f"unsupported sharing value {value!r}")
            kw["sharing"] = value.lower()
        elif key == "mode":
            kw["mode"] = _parse_uint(key, value, 8)
        elif key in ("uid", "gid"):
            kw[key] = _parse_uint(key, value, 10)
        elif key == "size":
            kw["size"] = value
        elif key == "env":
            kw["env"] = value
        else:
            near = difflib.get_close_matches(key, _MOUNT_KEYS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"unexpected key '{key}' in '{item}'{hint}")
    file_info = mtype in ("secret", "ssh", "cache")
    for key in ("mode", "uid", "gid"):
        if key in kw and not file_info:
            raise ValueError(f"{key} not allowed for {mtype!r} type mounts")
    if ro_auto:
        kw["readonly"] = mtype not in ("cache", "tmpfs")
    if "sharing" in kw and mtype != "cache":
        raise ValueError(f"invalid cache sharing set for {mtype} mount")
    if "size" in kw and mtype != "tmpfs":
        raise ValueError(f"size not allowed for {mtype!r} type mounts")
    if "env" in kw and mtype != "secret":
        raise ValueError(f"env not allowed for {mtype!r} type mounts")
    if mtype == "secret":
        if "from_" in kw:
            raise ValueError("secret mount should not have a from")
        if not any(k in kw for k in ("source", "target", "id", "env")) and "$" not in text:
            raise ValueError("invalid secret mount. one of source, target required")
        if "source" in kw and "id" in kw:
            raise ValueError("both source and id can't be set")
    elif mtype in ("bind", "cache", "tmpfs") and "target" not in kw and "$" not in text:
        raise ValueError(f"mount type {mtype} requires a target (target=/path)")
    return Mount(raw=text, type=mtype, **kw)  # type: ignore[arg-type]


_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?([a-z\u00b5\u03bc]+)")


def parse_duration(text: str) -> int:
    """Parse a Go duration (``30s``, ``1m30s``, ``1.5h``, ``300ms``) into nanoseconds."""
    s = text
    sign = 1
    if s[:1] in "+-" and s:
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None or (not m.group(1) and not m.group(2)):
            raise ValueError(f"invalid duration {text!r}")
        whole, frac, unit = m.groups()
        scale = _DURATION_UNITS.get(unit)
        if scale is None:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        total += int(whole or "0") * scale
        if frac:
            total += int(frac) * scale // 10 ** len(frac)
        pos = m.end()
    return sign * total


# ---- one instruction -------------------------------------------------------------------------


class _Where(TypedDict):
    line: int
    end_line: int
    original: str


def _common(ctx: _Ctx) -> _Where:
    return {"line": ctx.line, "end_line": ctx.end_line, "original": ctx.original}


def _no_flags(keyword: str, flags: list[str]) -> None:
    _parse_flags(keyword, flags)


def _p_from(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> From:
    values = _parse_flags("FROM", flags)
    args = _split_ws(rest)
    name: str | None = None
    if len(args) == 3 and args[1].lower() == "as":
        name = args[2].lower()
        if not _STAGE_NAME.match(name):
            raise _Err(
                f"invalid name for build stage: {args[2]!r}, "
                "name can't start with a number or contain symbols"
            )
    elif len(args) != 1:
        raise _Err("FROM requires either one or three arguments (FROM image [AS name])")
    return From(image=args[0], name=name, platform=_flag_str(values, "platform"), **_common(ctx))


def _p_run(ctx: _Ctx, flags: list[str], rest: str, heredocs: tuple[Heredoc, ...]) -> Run:
    values = _parse_flags("RUN", flags)
    mounts: list[Mount] = []
    for text in _flag_list(values, "mount"):
        try:
            mounts.append(parse_mount(text))
        except ValueError as e:
            raise _Err(f"RUN --mount={text}: {e}") from e
    network = _flag_str(values, "network")
    if network is not None and network not in ("default", "none", "host"):
        raise _Err(f"RUN: invalid --network={network} (one of: default, none, host)")
    security = _flag_str(values, "security")
    if security is not None and security not in ("sandbox", "insecure"):
        raise _Err(f"RUN: invalid --security={security} (one of: sandbox, insecure)")
    command = _command_line(rest)
    if not command.args and not command.exec_form:
        raise _Err("RUN requires at least one argument")
    return Run(
        command=command,
        heredocs=heredocs,
        mounts=tuple(mounts),
        network=cast(Literal["default", "none", "host"] | None, network),
        security=cast(Literal["sandbox", "insecure"] | None, security),
        **_common(ctx),
    )


def _command(keyword: str, flags: list[str], rest: str, empty: str) -> CommandLine:
    """CMD and ENTRYPOINT: shell or exec form, and ``[]`` the only way to say "nothing"."""
    _no_flags(keyword, flags)
    command = _command_line(rest)
    if not command.args and not command.exec_form:
        raise _Err(f"{keyword} requires at least one argument (use {keyword} [] {empty})")
    return command


def _p_cmd(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Cmd:
    return Cmd(command=_command("CMD", flags, rest, "for an empty command"), **_common(ctx))


def _p_entrypoint(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Entrypoint:
    command = _command("ENTRYPOINT", flags, rest, "to reset it")
    return Entrypoint(command=command, **_common(ctx))


def _p_shell(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Shell:
    _no_flags("SHELL", flags)
    parsed = _try_json(rest)
    if parsed is None:
        if not rest:
            raise _Err("SHELL requires at least one argument")
        raise _Err('SHELL requires the arguments to be in JSON form, e.g. SHELL ["/bin/sh", "-c"]')
    if not parsed:
        raise _Err("SHELL requires at least one argument")
    return Shell(args=tuple(parsed), **_common(ctx))


def _sources_and_dest(
    keyword: str, rest: str, heredocs: tuple[Heredoc, ...]
) -> tuple[tuple[str, ...], str, tuple[Heredoc, ...], bool]:
    args, exec_form = _maybe_json_list(rest)
    if len(args) < 2:
        raise _Err(
            f"{keyword} requires at least two arguments, but only one was provided. "
            "Destination could not be determined."
        )
    *srcs, dest = args
    if not exec_form and _heredoc_marker(dest) is not None:
        raise _Err(f"{keyword} cannot accept a heredoc as a destination")
    by_name = {h.name: h for h in heredocs}
    paths: list[str] = []
    inline: list[Heredoc] = []
    for src in srcs:
        marker = None if exec_form else _heredoc_marker(src)
        if marker is None:
            paths.append(src)
            continue
        doc = by_name.get(marker.name)
        if doc is None:  # pragma: no cover - the reader saw the same words
            raise _Err(f"{keyword}: heredoc {marker.name!r} has no body")
        inline.append(doc)
    return tuple(paths), dest, tuple(inline), exec_form


def _p_copy(ctx: _Ctx, flags: list[str], rest: str, heredocs: tuple[Heredoc, ...]) -> Copy:
    values = _parse_flags("COPY", flags)
    srcs, dest, inline, exec_form = _sources_and_dest("COPY", rest, heredocs)
    return Copy(
        sources=srcs,
        dest=dest,
        heredocs=inline,
        from_=_flag_str(values, "from"),
        chown=_flag_str(values, "chown"),
        chmod=_flag_str(values, "chmod"),
        link=bool(_flag_bool(values, "link")),
        parents=bool(_flag_bool(values, "parents")),
        excludes=_flag_list(values, "exclude"),
        exec_form=exec_form,
        **_common(ctx),
    )


def _p_add(ctx: _Ctx, flags: list[str], rest: str, heredocs: tuple[Heredoc, ...]) -> Add:
    values = _parse_flags("ADD", flags)
    srcs, dest, inline, exec_form = _sources_and_dest("ADD", rest, heredocs)
    return Add(
        sources=srcs,
        dest=dest,
        heredocs=inline,
        chown=_flag_str(values, "chown"),
        chmod=_flag_str(values, "chmod"),
        link=bool(_flag_bool(values, "link")),
        keep_git_dir=bool(_flag_bool(values, "keep-git-dir")),
        checksum=_flag_str(values, "checksum"),
        unpack=_flag_bool(values, "unpack"),
        excludes=_flag_list(values, "exclude"),
        exec_form=exec_form,
        **_common(ctx),
    )


def _one_string(keyword: str, flags: list[str], rest: str) -> str:
    _no_flags(keyword, flags)
    if not rest:
        raise _Err(f"{keyword} requires exactly one argument")
    return rest


def _p_workdir(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Workdir:
    return Workdir(path=_one_string("WORKDIR", flags, rest), **_common(ctx))


def _p_user(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> User:
    return User(user=_one_string("USER", flags, rest), **_common(ctx))


def _p_stopsignal(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> StopSignal:
    return StopSignal(signal=_one_string("STOPSIGNAL", flags, rest), **_common(ctx))


def _p_maintainer(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Maintainer:
    return Maintainer(name=_one_string("MAINTAINER", flags, rest), **_common(ctx))


def _name_values(keyword: str, rest: str, escape: str) -> tuple[tuple[str, str], ...]:
    """ENV/LABEL: ``key value`` (old form, the rest of the line is the value) or ``k=v ...``."""
    words = _parse_words(rest, escape)
    if not words:
        raise _Err(f"{keyword} requires at least one argument")
    if "=" not in words[0]:
        parts = _WS.split(rest, maxsplit=1)
        if len(parts) < 2 or not parts[1]:
            raise _Err(f"{keyword} must have two arguments ({keyword} key=value)")
        return ((parts[0], parts[1]),)
    pairs: list[tuple[str, str]] = []
    for word in words:
        key, has_eq, value = word.partition("=")
        if not has_eq:
            raise _Err(f"Syntax error - can't find = in {word!r}. Must be of the form: name=value")
        if not key:
            raise _Err(f"{keyword} names can not be blank")
        pairs.append((key, value))
    return tuple(pairs)


def _p_env(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Env:
    _no_flags("ENV", flags)
    return Env(pairs=_name_values("ENV", rest, ctx.escape), **_common(ctx))


def _p_label(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Label:
    _no_flags("LABEL", flags)
    return Label(pairs=_name_values("LABEL", rest, ctx.escape), **_common(ctx))


def _p_arg(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Arg:
    _no_flags("ARG", flags)
    words = _parse_words(rest, ctx.escape)
    if not words:
        raise _Err("ARG requires at least one argument")
    decls: list[ArgDecl] = []
    for word in words:
        name, has_eq, value = word.partition("=")
        if not name:
            raise _Err("ARG names can not be blank")
        decls.append(ArgDecl(name, value if has_eq else None))
    return Arg(args=tuple(decls), **_common(ctx))


def _p_expose(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Expose:
    _no_flags("EXPOSE", flags)
    ports = _split_ws(rest)
    if not ports:
        raise _Err("EXPOSE requires at least one argument")
    return Expose(ports=tuple(ports), **_common(ctx))


def _p_volume(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Volume:
    _no_flags("VOLUME", flags)
    args, exec_form = _maybe_json_list(rest)
    if not args:
        raise _Err("VOLUME requires at least one argument")
    paths = tuple(a.strip() for a in args)
    if any(p == "" for p in paths):
        raise _Err("VOLUME specified can not be an empty string")
    return Volume(paths=paths, exec_form=exec_form, **_common(ctx))


def _p_healthcheck(ctx: _Ctx, flags: list[str], rest: str, _h: tuple[Heredoc, ...]) -> Healthcheck:
    values = _parse_flags("HEALTHCHECK", flags)
    parts = rest.split(None, 1)
    kind = parts[0] if parts else ""
    tail = parts[1].strip() if len(parts) > 1 else ""
    if not kind:
        raise _Err("HEALTHCHECK requires at least one argument")
    kind = kind.upper()
    if kind == "NONE":
        if tail:
            raise _Err("HEALTHCHECK NONE takes no arguments")
        return Healthcheck(command=None, **_common(ctx))
    if kind != "CMD":
        raise _Err(f'Unknown type "{kind}" in HEALTHCHECK (try CMD)')
    command = _command_line(tail)
    if not command.args:
        raise _Err("Missing command after HEALTHCHECK CMD")
    durations: dict[str, int | None] = {}
    for flag in ("interval", "timeout", "start-period", "start-interval"):
        text = _flag_str(values, flag)
        if text is None:
            durations[flag] = None
            continue
        try:
            ns = parse_duration(text)
        except ValueError as e:
            raise _Err(f"HEALTHCHECK --{flag}: {e}") from e
        if ns != 0 and ns < 1_000_000:
            raise _Err(f"HEALTHCHECK: Interval {flag!r} cannot be less than 1ms")
        if ns < 0:
            raise _Err(f"HEALTHCHECK: --{flag} cannot be negative")
        durations[flag] = ns
    retries: int | None = None
    retries_text = _flag_str(values, "retries")
    if retries_text is not None:
        try:
            retries = int(retries_text, 10)
        except ValueError as e:
            raise _Err(f"HEALTHCHECK: invalid --retries={retries_text}") from e
        if retries < 1:
            raise _Err(f"HEALTHCHECK: --retries must be at least 1 (not {retries})")
    return Healthcheck(
        command=command,
        interval=durations["interval"],
        timeout=durations["timeout"],
        start_period=durations["start-period"],
        start_interval=durations["start-interval"],
        retries=retries,
        **_common(ctx),
    )


def _p_onbuild(ctx: _Ctx, flags: list[str], rest: str, heredocs: tuple[Heredoc, ...]) -> Onbuild:
    _no_flags("ONBUILD", flags)
    if not rest:
        raise _Err("ONBUILD requires at least one argument")
    sub_keyword = _split_keyword(rest)[0].upper()
    if sub_keyword == "ONBUILD":
        raise _Err("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if sub_keyword in ("MAINTAINER", "FROM"):
        raise _Err(f"{sub_keyword} isn't allowed as an ONBUILD trigger")
    sub = _Ctx(ctx.path, ctx.escape, ctx.line, ctx.end_line, rest)
    trigger = _instruction(rest, sub, heredocs)
    expression = re.sub(r"(?i)^\s*ONBUILD\s*", "", ctx.original)
    for doc in heredocs:
        expression += "\n" + doc.content + doc.name
    return Onbuild(trigger=trigger, expression=expression, **_common(ctx))


_Parser = Callable[[_Ctx, list[str], str, tuple[Heredoc, ...]], Instruction]

_PARSERS: Mapping[str, _Parser] = {
    "ADD": _p_add,
    "ARG": _p_arg,
    "CMD": _p_cmd,
    "COPY": _p_copy,
    "ENTRYPOINT": _p_entrypoint,
    "ENV": _p_env,
    "EXPOSE": _p_expose,
    "FROM": _p_from,
    "HEALTHCHECK": _p_healthcheck,
    "LABEL": _p_label,
    "MAINTAINER": _p_maintainer,
    "ONBUILD": _p_onbuild,
    "RUN": _p_run,
    "SHELL": _p_shell,
    "STOPSIGNAL": _p_stopsignal,
    "USER": _p_user,
    "VOLUME": _p_volume,
    "WORKDIR": _p_workdir,
}


def _split_keyword(line: str) -> tuple[str, str]:
    parts = _WS.split(line.strip(), maxsplit=1)
    return parts[0], (parts[1] if len(parts) > 1 else "")


def _instruction(line: str, ctx: _Ctx, heredocs: tuple[Heredoc, ...]) -> Instruction:
    """Parse one logical line (heredoc bodies already read) into its instruction."""
    keyword_text, remainder = _split_keyword(line)
    keyword = keyword_text.upper()
    parser = _PARSERS.get(keyword)
    if parser is None:
        near = difflib.get_close_matches(keyword, list(_PARSERS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise _Err(f"unknown instruction: {keyword_text}{hint}")
    flags, rest = _extract_flags(remainder)
    return parser(ctx, flags, rest.strip(), heredocs)


class _Directives:
    """The parser-directive state at the top of a file."""

    def __init__(self, enabled: bool, escape: str) -> None:
        self.done = not enabled
        self.escape = escape
        self.found: list[Directive] = []

    def feed(self, trimmed: str, line: int) -> None:
        if self.done:
            return
        if not trimmed.startswith("#"):
            self.done = True
            return
        m = _DIRECTIVE.match(trimmed[1:].lstrip())
        if m is None or m.group(1).lower() not in _VALID_DIRECTIVES:
            self.done = True
            return
        name, value = m.group(1).lower(), m.group(2)
        if any(d.name == name for d in self.found):
            raise _Err(f"only one {name} parser directive can be used")
        if name == "escape":
            if value not in ("`", "\\"):
                raise _Err(f"invalid escape token '{value}' does not match ` or \\")
            self.escape = value
        self.found.append(Directive(name, value, line))


def _read(
    text: str, path: str, *, directives: bool, escape: str = DEFAULT_ESCAPE
) -> tuple[list[Instruction], _Directives, list[ParseWarning], int]:
    lines = _Lines(text)
    state = _Directives(directives, escape)
    out: list[Instruction] = []
    warnings: list[ParseWarning] = []
    while (item := lines.next()) is not None:
        start, raw = item
        trimmed = _strip_newline(raw).lstrip()
        try:
            state.feed(trimmed, start)
        except _Err as e:
            raise DockerfileSyntaxError(path, start, str(e)) from e
        if trimmed.startswith("#"):
            continue
        line, cont = _trim_continuation(trimmed, state.escape)
        if not cont and line == "":
            continue
        end = start
        empty_continuation = False
        while cont:
            nxt = lines.next()
            if nxt is None:
                break
            end, raw = nxt
            body = _strip_newline(raw)
            if body.lstrip().startswith("#"):
                continue
            if body.strip() == "":
                empty_continuation = True
                continue
            piece, cont = _trim_continuation(body, state.escape)
            line += piece
        if empty_continuation:
            warnings.append(
                ParseWarning(start, "empty continuation line (docker will make this an error)")
            )
        try:
            keyword, remainder = _split_keyword(line)
            _, args = _extract_flags(remainder)
            heredocs: tuple[Heredoc, ...] = ()
            if _may_hold_heredoc(keyword.upper(), args.strip(), state.escape):
                heredocs, end = _read_heredocs(line, lines, end)
            ctx = _Ctx(path, state.escape, start, end, line.strip())
            out.append(_instruction(line, ctx, heredocs))
        except _Err as e:
            raise DockerfileSyntaxError(path, start, str(e)) from e
    return out, state, warnings, lines.last_line


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """Parse a whole Dockerfile.

    Raises :class:`~runtime.errors.DockerfileSyntaxError` for an unknown instruction, a bad
    flag, missing arguments, an unterminated heredoc, a file without instructions or without
    FROM, an instruction other than ARG before the first FROM, or a duplicate stage name.
    """
    instructions, state, warnings, last_line = _read(text, path, directives=True)
    if not instructions:
        raise DockerfileSyntaxError(path, last_line, "file with no instructions")
    meta: list[Arg] = []
    stages: list[tuple[From, list[Instruction]]] = []
    names: dict[str, int] = {}
    for instr in instructions:
        if isinstance(instr, From):
            if instr.name is not None:
                if instr.name in names:
                    raise DockerfileSyntaxError(
                        path,
                        instr.line,
                        f"duplicate stage name {instr.name!r} "
                        f"(first used on line {names[instr.name]})",
                    )
                names[instr.name] = instr.line
            stages.append((instr, []))
        elif not stages:
            if not isinstance(instr, Arg):
                raise DockerfileSyntaxError(
                    path,
                    instr.line,
                    f"no build stage in current context: {instr.keyword} before the first FROM "
                    "(only ARG may come before FROM)",
                )
            meta.append(instr)
        else:
            stages[-1][1].append(instr)
    if not stages:
        raise DockerfileSyntaxError(
            path, instructions[-1].line, "no FROM instruction: a Dockerfile needs a build stage"
        )
    return Dockerfile(
        path=path,
        escape=state.escape,
        directives=tuple(state.found),
        meta_args=tuple(meta),
        stages=tuple(Stage(i, f, tuple(body)) for i, (f, body) in enumerate(stages)),
        instructions=tuple(instructions),
        warnings=tuple(warnings),
    )


def parse_trigger(
    expression: str, path: str = "<ONBUILD>", escape: str = DEFAULT_ESCAPE
) -> Instruction:
    """Parse one ONBUILD trigger taken from a base image's config (heredocs allowed).

    The escape char of the downstream Dockerfile does not apply to a trigger; docker parses it
    with the default one unless told otherwise.
    """
    instructions, _, _, _ = _read(expression, path, directives=False, escape=escape)
    if len(instructions) != 1:
        raise DockerfileSyntaxError(
            path, 1, f"an ONBUILD trigger must be one instruction, got {len(instructions)}"
        )
    trigger = instructions[0]
    if isinstance(trigger, (From, Onbuild, Maintainer)):
        raise DockerfileSyntaxError(
            path, 1, f"{trigger.keyword} isn't allowed as an ONBUILD trigger"
        )
    return trigger
