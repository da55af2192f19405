"""Docker's shell-word processing of Dockerfile arguments, and which variables it used.

Docker does not run a shell to expand ``$VAR`` in ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL,
USER, VOLUME and WORKDIR: the builder does it with its own small lexer (BuildKit's
``shell.Lex``). This module is that lexer:

* ``$v``, ``${v}``; ``${v:-w}`` / ``${v-w}`` (default when unset-or-empty / unset);
  ``${v:+w}`` / ``${v+w}`` (alternative); ``${v:?msg}`` / ``${v?msg}`` (error);
  ``${v#p}`` ``${v##p}`` ``${v%p}`` ``${v%%p}`` (trim a glob, shortest/longest);
  ``${v/p/r}`` ``${v//p/r}`` (replace first/all);
* the escape character (``\\`` or the ``# escape=`` one) escapes the next character;
  single quotes take everything literally; double quotes allow ``$`` and escape ``"``, ``$`` and
  the escape character only;
* :meth:`Expander.word` keeps blanks (one word, like ENV values); :meth:`Expander.words`
  splits unquoted blanks after expansion (like EXPOSE).

An :class:`Expander` remembers every variable an expansion referred to, because the build
cache key of an instruction must include the values it used, and only those.
:func:`expand_instruction` applies :data:`runtime.build.dockerfile.EXPANSION` to one parsed
instruction.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from runtime.build.dockerfile import (
    DEFAULT_ESCAPE,
    Add,
    Arg,
    ArgDecl,
    Copy,
    Env,
    Expose,
    From,
    Heredoc,
    Instruction,
    Label,
    Run,
    StopSignal,
    User,
    Volume,
    Workdir,
    parse_mount,
)
from runtime.errors import DockerfileSyntaxError

__all__ = ["Expanded", "Expander", "ExpansionError", "expand_instruction"]

_SPECIAL_PARAMS = "@*#?-$!0"
_IDENTIFIER = re.compile(r"[^\W\d]\w*")


class ExpansionError(ValueError):
    """A word could not be expanded; ``variable`` names the variable when one is to blame.

    It is a plain ``ValueError`` so the lexer can be used on its own; the builder (or
    :func:`expand_instruction`) turns it into a DockerfileSyntaxError with file and line.
    """

    def __init__(self, message: str, variable: str | None = None) -> None:
        self.variable = variable
        self.message = message
        super().__init__(message)


class Expander:
    """Expands words against ``env`` and records which variables were referred to.

    ``used`` holds every variable name an expansion looked up (set or not); ``missing`` the
    ones that were not set. Special and positional parameters (``$1``, ``$@``) expand to
    nothing and are not recorded.
    """

    def __init__(self, env: Mapping[str, str], escape: str = DEFAULT_ESCAPE) -> None:
        if escape not in ("\\", "`"):
            raise ValueError(f"escape must be \\ or `, not {escape!r}")
        self._env = env
        self.escape = escape
        self._used: set[str] = set()
        self._missing: set[str] = set()

    @property
    def used(self) -> frozenset[str]:
        return frozenset(self._used)

    @property
    def missing(self) -> frozenset[str]:
        return frozenset(self._missing)

    def word(self, text: str) -> str:
        """Expand ``text`` to one word: quotes and escapes removed, blanks kept."""
        return self._process(text)[0]

    def words(self, text: str) -> list[str]:
        """Expand ``text`` and split it into words on unquoted blanks."""
        return self._process(text)[1]

    def heredoc(self, text: str) -> str:
        """Expand a heredoc body as a shell does for an unquoted delimiter.

        Only ``$`` expansions happen; quotes are ordinary characters; a backslash escapes
        ``$``, a backquote, a backslash and a newline (which it removes), and is kept before
        anything else.
        """
        lexer = _Lexer(text, self, "\\")
        try:
            return lexer.heredoc_body()
        except ExpansionError as e:
            raise ExpansionError(f"in heredoc: {e.message}", e.variable) from None

    def lookup(self, name: str) -> str | None:
        """The value of ``name`` (``None`` if unset), recorded as used."""
        if not _IDENTIFIER.fullmatch(name):
            return None
        self._used.add(name)
        value = self._env.get(name)
        if value is None:
            self._missing.add(name)
        return value

    def _process(self, text: str) -> tuple[str, list[str]]:
        lexer = _Lexer(text, self, self.escape)
        try:
            result, words, _ = lexer.until("")
        except ExpansionError as e:
            raise ExpansionError(f"failed to process {text!r}: {e.message}", e.variable) from None
        return result, words


class _Words:
    """Collects words while expanding (docker's ``wordsStruct``)."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.current: list[str] = []
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if ch.isspace():
            if self.in_word and self.current:
                self.words.append("".join(self.current))
                self.current = []
                self.in_word = False
        else:
            self.add_raw(ch)

    def add_raw(self, text: str) -> None:
        self.current.append(text)
        self.in_word = True

    def add_expanded(self, text: str) -> None:
        for ch in text:
            self.add_char(ch)

    def done(self) -> list[str]:
        if self.current and "".join(self.current):
            self.words.append("".join(self.current))
            self.current = []
        return self.words


class _Lexer:
    def __init__(self, text: str, expander: Expander, escape: str) -> None:
        self.s = text
        self.i = 0
        self.ex = expander
        self.esc = escape

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self) -> str:
        ch = self.peek()
        if ch:
            self.i += 1
        return ch

    def until(self, stops: str, raw_escapes: bool = False) -> tuple[str, list[str], str]:
        """Process up to a stop character (consumed and returned) or the end of the text."""
        result: list[str] = []
        words = _Words()
        while ch := self.peek():
            if stops and ch in stops:
                self.take()
                return "".join(result), words.done(), ch
            if ch == "'":
                text = self.single_quote()
                result.append(text)
                words.add_raw(text)
            elif ch == '"':
                text = self.double_quote()
                result.append(text)
                words.add_raw(text)
            elif ch == "$":
                text = self.dollar()
                result.append(text)
                words.add_expanded(text)
            else:
                self.take()
                if ch == self.esc:
                    if raw_escapes:
                        words.add_raw(ch)
                        result.append(ch)
                    ch = self.take()
                    if not ch:
                        break
                    words.add_raw(ch)
                else:
                    words.add_char(ch)
                result.append(ch)
        if stops:
            raise ExpansionError(f"unexpected end of statement while looking for matching {stops}")
        return "".join(result), words.done(), ""

    def single_quote(self) -> str:
        self.take()
        end = self.s.find("'", self.i)
        if end < 0:
            raise ExpansionError(
                "unexpected end of statement while looking for matching single-quote"
            )
        text = self.s[self.i : end]
        self.i = end + 1
        return text

    def double_quote(self) -> str:
        self.take()
        out: list[str] = []
        while True:
            ch = self.peek()
            if not ch:
                raise ExpansionError(
                    "unexpected end of statement while looking for matching double-quote"
                )
            if ch == '"':
                self.take()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            self.take()
            if ch == self.esc:
                nxt = self.peek()
                if not nxt:
                    continue
                if nxt in ('"', "$", self.esc):
                    ch = self.take()
            out.append(ch)

    def name(self) -> str:
        ch = self.peek()
        if ch.isdecimal():
            start = self.i
            while self.peek().isdecimal():
                self.take()
            return self.s[start : self.i]
        if ch and ch in _SPECIAL_PARAMS:
            return self.take()
        start = self.i
        while (c := self.peek()) and (c.isalpha() or c.isdecimal() or c == "_"):
            self.take()
        return self.s[start : self.i]

    def braced_word(self, stops: str, raw_escapes: bool) -> tuple[str, str]:
        try:
            word, _, stop = self.until(stops, raw_escapes)
        except ExpansionError as e:
            if e.variable is None and not self.peek():
                raise ExpansionError("syntax error: missing '}'") from None
            raise
        return word, stop

    def dollar(self) -> str:
        self.take()  # the $
        if self.peek() != "{":
            name = self.name()
            if not name:
                return "$"
            return self.ex.lookup(name) or ""
        self.take()  # the {
        ch = self.peek()
        if not ch:
            raise ExpansionError("syntax error: missing '}'")
        if ch in "{}:":
            raise ExpansionError("syntax error: bad substitution")
        name = self.name()
        ch = self.take()
        if ch == "}":
            return self.ex.lookup(name) or ""
        if not ch:
            raise ExpansionError("syntax error: missing '}'")
        modifier = ch
        null_is_unset = False
        if ch == ":":
            null_is_unset = True
            ch = self.take()
            modifier += ch
            if not ch:
                raise ExpansionError("syntax error: missing '}'")
        if ch in "+-?#%":
            pattern_like = ch in "#%"
            if null_is_unset and pattern_like:
                raise ExpansionError(f"unsupported modifier ({modifier}) in substitution")
            word, _ = self.braced_word("}", pattern_like)
            value = self.ex.lookup(name)
            unset = value is None or (null_is_unset and value == "")
            if ch == "-":
                return word if unset else (value or "")
            if ch == "+":
                return "" if unset else word
            if ch == "?":
                if value is None:
                    raise ExpansionError(f"{name}: {word or 'is not allowed to be unset'}", name)
                if unset:
                    raise ExpansionError(f"{name}: {word or 'is not allowed to be empty'}", name)
                return value
            greedy = word.startswith(ch)
            if greedy:
                word = word[1:]
            regex = _glob_regex(word, self.esc)
            if ch == "#":
                return _trim_prefix(regex, value or "", greedy)
            return _trim_suffix(regex, value or "", greedy)
        if ch == "/" and not null_is_unset:
            replace_all = self.peek() == "/"
            if replace_all:
                self.take()
            pattern, stop = self.braced_word("/}", True)
            replacement = ""
            if stop == "/":
                replacement, _ = self.braced_word("}", False)
            value = self.ex.lookup(name) or ""
            return _replace(
                _glob_regex(pattern, self.esc), pattern, replacement, value, replace_all
            )
        raise ExpansionError(f"unsupported modifier ({modifier}) in substitution")

    def heredoc_body(self) -> str:
        out: list[str] = []
        while ch := self.peek():
            if ch == "\\":
                self.take()
                nxt = self.peek()
                if nxt in ("$", "`", "\\"):
                    out.append(self.take())
                elif nxt == "\n":
                    self.take()
                else:
                    out.append("\\")
            elif ch == "$":
                out.append(self.dollar())
            else:
                out.append(self.take())
        return "".join(out)


def _glob_regex(pattern: str, escape: str) -> re.Pattern[str]:
    """A shell glob (``*``, ``?``, ``[...]``, escaped chars literal) as a regex."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == escape and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] in "!^"
            if negate:
                j += 1
            k = j + 1 if j < n and pattern[j] == "]" else j
            while k < n and pattern[k] != "]":
                k += 1
            if k >= n:
                out.append(re.escape(c))
            else:
                body = "".join("-" if x == "-" else re.escape(x) for x in pattern[j:k])
                out.append(f"[{'^' if negate else ''}{body}]")
                i = k + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _trim_prefix(regex: re.Pattern[str], value: str, greedy: bool) -> str:
    ends = range(len(value), -1, -1) if greedy else range(len(value) + 1)
    for end in ends:
        if regex.fullmatch(value, 0, end):
            return value[end:]
    return value


def _trim_suffix(regex: re.Pattern[str], value: str, greedy: bool) -> str:
    starts = range(len(value) + 1) if greedy else range(len(value), -1, -1)
    for start in starts:
        if regex.fullmatch(value, start):
            return value[:start]
    return value


def _replace(
    regex: re.Pattern[str], pattern: str, replacement: str, value: str, replace_all: bool
) -> str:
    """Replace the first (or every) longest match of the glob, left to right, like bash."""
    if not pattern:
        return value
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        end = next((j for j in range(n, i, -1) if regex.fullmatch(value, i, j)), None)
        if end is None:
            out.append(value[i])
            i += 1
            continue
        out.append(replacement)
        i = end
        if not replace_all:
            out.append(value[i:])
            return "".join(out)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Expanding one instruction, per docker's table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expanded:
    """An instruction with its variables expanded, and the variables that expansion used."""

    instruction: Instruction
    used: frozenset[str]
    missing: frozenset[str]


def _opt(ex: Expander, value: str | None) -> str | None:
    return None if value is None else ex.word(value)


def _docs(ex: Expander, docs: tuple[Heredoc, ...]) -> tuple[Heredoc, ...]:
    """Expand the bodies of unquoted-delimiter heredocs; the result is final text."""
    return tuple(
        dataclasses.replace(d, content=ex.heredoc(d.text), chomp=False, expand=False)
        if d.expand
        else d
        for d in docs
    )


def _pairs(
    ex: Expander, keyword: str, pairs: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for key, value in pairs:
        name = ex.word(key)
        if not name:
            raise ExpansionError(f"{keyword} names can not be blank (from {key!r})", None)
        out.append((name, ex.word(value)))
    return tuple(out)


def _expand(instr: Instruction, ex: Expander) -> Instruction:
    replace = dataclasses.replace
    if isinstance(instr, (Env, Label)):
        return replace(instr, pairs=_pairs(ex, instr.keyword, instr.pairs))
    if isinstance(instr, Arg):
        decls = tuple(ArgDecl(ex.word(a.name), _opt(ex, a.default)) for a in instr.args)
        return replace(instr, args=decls)
    if isinstance(instr, Copy):
        return replace(
            instr,
            sources=tuple(ex.word(s) for s in instr.sources),
            dest=ex.word(instr.dest),
            chown=_opt(ex, instr.chown),
            chmod=_opt(ex, instr.chmod),
            heredocs=_docs(ex, instr.heredocs),
        )
    if isinstance(instr, Add):
        return replace(
            instr,
            sources=tuple(ex.word(s) for s in instr.sources),
            dest=ex.word(instr.dest),
            chown=_opt(ex, instr.chown),
            chmod=_opt(ex, instr.chmod),
            checksum=_opt(ex, instr.checksum),
            heredocs=_docs(ex, instr.heredocs),
        )
    if isinstance(instr, Expose):
        return replace(instr, ports=tuple(w for p in instr.ports for w in ex.words(p)))
    if isinstance(instr, User):
        return replace(instr, user=ex.word(instr.user))
    if isinstance(instr, Workdir):
        return replace(instr, path=ex.word(instr.path))
    if isinstance(instr, StopSignal):
        return replace(instr, signal=ex.word(instr.signal))
    if isinstance(instr, Volume):
        return replace(instr, paths=tuple(ex.word(p) for p in instr.paths))
    if isinstance(instr, From):
        return replace(instr, image=ex.word(instr.image), platform=_opt(ex, instr.platform))
    if isinstance(instr, Run) and instr.mounts:
        return replace(instr, mounts=tuple(parse_mount(m.raw, ex.word) for m in instr.mounts))
    return instr


def expand_instruction(
    instr: Instruction,
    env: Mapping[str, str],
    *,
    escape: str = DEFAULT_ESCAPE,
    path: str = "Dockerfile",
) -> Expanded:
    """Expand what docker expands in ``instr``, with the variables ``env`` holds.

    ``env`` is the caller's choice of scope (see :data:`~runtime.build.dockerfile.EXPANSION`):
    the stage's ARG and ENV values before this instruction, or only the global ARGs for a FROM.
    Every ENV pair sees the values from before the line, as in docker. ``COPY --from`` and a
    mount's ``from=`` are left alone: :mod:`.stages` resolves them. Errors become
    :class:`~runtime.errors.DockerfileSyntaxError` at the instruction's line.
    """
    ex = Expander(env, escape)
    try:
        result = _expand(instr, ex)
    except ExpansionError as e:
        raise DockerfileSyntaxError(path, instr.line, f"{instr.keyword}: {e}") from e
    except ValueError as e:  # a mount that is invalid once expanded
        raise DockerfileSyntaxError(path, instr.line, f"{instr.keyword} --mount: {e}") from e
    return Expanded(result, ex.used, ex.missing)
