"""The Dockerfile parser: directives, comments, continuations, heredocs, flags, every instruction."""

from __future__ import annotations

import re

import pytest

from runtime.build import dockerfile as df
from runtime.build.dockerfile import (
    Add,
    Arg,
    ArgDecl,
    Cmd,
    CommandLine,
    Copy,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    Heredoc,
    Instruction,
    Label,
    Maintainer,
    Mount,
    Onbuild,
    Run,
    Scope,
    Shell,
    StopSignal,
    User,
    Volume,
    Workdir,
)
from runtime.errors import DockerfileSyntaxError


def body(text: str) -> tuple[Instruction, ...]:
    """The instructions of the first stage of ``FROM base`` + text."""
    return df.parse("FROM base\n" + text).stages[0].instructions


def one(text: str) -> Instruction:
    (instr,) = body(text)
    return instr


def error(text: str) -> DockerfileSyntaxError:
    with pytest.raises(DockerfileSyntaxError) as info:
        df.parse(text)
    return info.value


# ---- directives --------------------------------------------------------------------------------


def test_escape_directive_backtick_changes_continuation_and_escaping() -> None:
    parsed = df.parse("# escape=`\nFROM base\nRUN echo a `\n  b\nWORKDIR c:\\dir\\\nUSER x\n")
    run, workdir, user = parsed.stages[0].instructions
    assert parsed.escape == "`"
    assert isinstance(run, Run) and run.command.args == ("echo a   b",)
    assert (run.line, run.end_line) == (3, 4)
    assert isinstance(workdir, Workdir) and workdir.path == "c:\\dir\\"
    assert isinstance(user, User) and user.line == 6


@pytest.mark.parametrize(
    ("top", "escape", "names"),
    [
        ("# syntax=docker/dockerfile:1\n# escape=`\n", "`", ["syntax", "escape"]),
        ("#ESCAPE = `\n", "`", ["escape"]),
        ("# check=skip=all;error=true\n", "\\", ["check"]),
        ("# a comment\n# escape=`\n", "\\", []),  # a comment ends the directives
        ("\n# escape=`\n", "\\", []),  # so does a blank line
        ("# unknown=1\n# escape=`\n", "\\", []),  # an unknown directive is a comment
    ],
)
def test_directives_only_at_the_top(top: str, escape: str, names: list[str]) -> None:
    parsed = df.parse(top + "FROM base\n")
    assert parsed.escape == escape
    assert [d.name for d in parsed.directives] == names


def test_syntax_directive_is_recorded() -> None:
    parsed = df.parse("# syntax=docker/dockerfile:1.7-labs\nFROM base\n")
    assert parsed.syntax == "docker/dockerfile:1.7-labs"
    assert parsed.directives[0] == df.Directive("syntax", "docker/dockerfile:1.7-labs", 1)
    assert df.parse("FROM base\n").syntax is None


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("# escape=`\n# escape=\\\nFROM x\n", 2, "only one escape parser directive"),
        ("# syntax=a\n# syntax=b\nFROM x\n", 2, "only one syntax parser directive"),
        ("# escape=x\nFROM x\n", 1, "invalid escape token"),
    ],
)
def test_directive_errors(text: str, line: int, fragment: str) -> None:
    err = error(text)
    assert err.line == line and fragment in str(err)


# ---- comments and continuations --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("RUN echo # not a comment\n", "echo # not a comment"),
        ("   # indented comment\nRUN a\n", "a"),
        ("RUN a \\\n    b\n", "a     b"),
        ("RUN a \\   \n b\n", "a  b"),  # blanks after the escape char still continue
        ("RUN a \\\n# a comment inside\n  # indented one\n b\n", "a  b"),
        ("RUN a \\\n\n   \n b\n", "a  b"),  # empty continuation lines are skipped
        ("RUN a \\", "a"),  # continuation at end of file
        ("RUN a \\\r\n b\r\n", "a  b"),  # CRLF
    ],
)
def test_comments_and_continuations(text: str, expected: str) -> None:
    instr = one(text)
    assert isinstance(instr, Run)
    assert instr.command.args == (expected,)


def test_byte_order_mark_is_ignored() -> None:
    parsed = df.parse("\ufeff# escape=`\nFROM base\n")
    assert parsed.escape == "`" and parsed.stages[0].from_.image == "base"


def test_escaped_escape_char_does_not_continue() -> None:
    first, second = body("RUN echo foo\\\\\nRUN b\n")
    assert isinstance(first, Run) and first.command.args == ("echo foo\\\\",)
    assert isinstance(second, Run) and second.line == 3


def test_line_numbers_span_continuations_comments_and_blank_lines() -> None:
    parsed = df.parse("\n# c\nFROM base\n\nRUN a \\\n# c\n\n  b\nUSER me\n")
    run, user = parsed.stages[0].instructions
    assert (run.line, run.end_line) == (5, 8)
    assert (user.line, user.end_line) == (9, 9)
    assert parsed.warnings == (df.ParseWarning(5, parsed.warnings[0].message),)


# ---- heredocs ----------------------------------------------------------------------------------


def test_run_heredoc() -> None:
    run = one("RUN <<EOF\necho $A\n# kept\nRUN not parsed\nEOF\n")
    assert isinstance(run, Run)
    assert run.command == CommandLine(("<<EOF",), False)
    assert run.heredocs == (Heredoc("EOF", "echo $A\n# kept\nRUN not parsed\n"),)
    assert (run.line, run.end_line) == (2, 6)


@pytest.mark.parametrize(
    ("marker", "name", "expand", "chomp", "fd"),
    [
        ("<<EOF", "EOF", True, False, None),
        ("<<-EOF", "EOF", True, True, None),
        ("<<'EOF'", "EOF", False, False, None),
        ('<<"EOF"', "EOF", False, False, None),
        ("<<-'EOF'", "EOF", False, True, None),
        ("3<<EOF", "EOF", True, False, 3),
    ],
)
def test_heredoc_markers(marker: str, name: str, expand: bool, chomp: bool, fd: int | None) -> None:
    run = one(f"RUN cat {marker} > /f\n\tline\n{name}\n")
    assert isinstance(run, Run)
    (doc,) = run.heredocs
    assert (doc.name, doc.expand, doc.chomp, doc.fd) == (name, expand, chomp, fd)
    assert doc.content == "\tline\n"
    assert doc.text == ("line\n" if chomp else "\tline\n")


@pytest.mark.parametrize("word", ["<<", "<<-", "<EOF", "<<<EOF", "EOF", "x<<EOF"])
def test_words_that_are_not_heredoc_markers(word: str) -> None:
    first, second = body(f"RUN cat {word}\nUSER x\n")
    assert isinstance(first, Run) and first.heredocs == ()
    assert isinstance(second, User)


@pytest.mark.parametrize(("word", "name"), [("<<E'O'F", "EOF"), ('<<"E O"', "E O")])
def test_partly_quoted_delimiters(word: str, name: str) -> None:
    run = one(f"RUN cat {word}\nbody\n{name}\n")
    assert isinstance(run, Run)
    assert (run.heredocs[0].name, run.heredocs[0].expand) == (name, False)


@pytest.mark.parametrize("word", ["<<'EOF", '<<"EOF', "<<EOF'", '<<EOF"'])
def test_badly_quoted_delimiters_are_errors(word: str) -> None:
    err = error(f"FROM x\nRUN cat {word}\nEOF\n")
    assert err.line == 2 and "unexpected end of statement" in str(err)


def test_chomp_also_strips_tabs_before_the_terminator() -> None:
    run, user = body("RUN <<-EOF\n\t\tdo\n\tEOF\nUSER x\n")
    assert isinstance(run, Run) and run.heredocs[0].text == "do\n"
    assert isinstance(user, User) and user.line == 5


def test_several_heredocs_on_one_line_are_read_in_order() -> None:
    copy = one("COPY <<X <<Y /dest/\nY\nX\nX\nY\n")
    assert isinstance(copy, Copy)
    assert [(h.name, h.content) for h in copy.heredocs] == [("X", "Y\n"), ("Y", "X\n")]
    assert copy.sources == () and copy.dest == "/dest/"


def test_copy_heredoc_mixed_with_paths() -> None:
    copy = one("COPY a.txt <<EOF b.txt /dst/\nhello\nEOF\n")
    assert isinstance(copy, Copy)
    assert copy.sources == ("a.txt", "b.txt")
    assert copy.heredocs == (Heredoc("EOF", "hello\n"),)


def test_add_heredoc_and_continuation_before_it() -> None:
    add = one("ADD \\\n  <<EOF /dst\nx\nEOF\n")
    assert isinstance(add, Add)
    assert add.heredocs == (Heredoc("EOF", "x\n"),)
    assert (add.line, add.end_line) == (2, 5)


@pytest.mark.parametrize(
    "text",
    [
        'RUN ["<<EOF"]\nUSER x\n',  # JSON form: no heredoc
        'RUN echo "<<EOF"\nUSER x\n',  # quoted: not a marker
        "RUN echo '<<EOF'\nUSER x\n",
        "RUN cat <<<here\nUSER x\n",  # a here-string
        "USER <<EOF\nWORKDIR /x\n",  # USER takes no heredoc: the next line is an instruction
    ],
)
def test_not_heredocs(text: str) -> None:
    first, second = body(text)
    assert getattr(first, "heredocs", ()) == ()
    assert second.line == 3


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("FROM x\nRUN <<EOF\nno end\n", 2, "unterminated heredoc"),
        ("FROM x\nRUN <<A <<B\na\nA\n", 2, "unterminated heredoc"),
        ("FROM x\nCOPY a <<EOF\nx\nEOF\n", 2, "heredoc as a destination"),
        ("FROM x\nRUN <<'EOF\nx\nEOF\n", 2, "matching single-quote"),
    ],
)
def test_heredoc_errors(text: str, line: int, fragment: str) -> None:
    err = error(text)
    assert err.line == line and fragment in str(err)


# ---- flags -------------------------------------------------------------------------------------


def test_copy_flags() -> None:
    copy = one(
        "COPY --from=build --chown=app:app --chmod=0644 --link --parents "
        "--exclude=*.tmp --exclude=docs/ src/ /app/\n"
    )
    assert isinstance(copy, Copy)
    assert copy.from_ == "build" and copy.chown == "app:app" and copy.chmod == "0644"
    assert copy.link and copy.parents
    assert copy.excludes == ("*.tmp", "docs/")
    assert copy.sources == ("src/",) and copy.dest == "/app/"


def test_add_flags() -> None:
    add = one(
        "ADD --keep-git-dir=true --checksum=sha256:abc --link=false --unpack=false "
        "--chown=1 https://example.com/x.tar /x\n"
    )
    assert isinstance(add, Add)
    assert add.keep_git_dir and not add.link and add.unpack is False
    assert add.checksum == "sha256:abc" and add.chown == "1"


def test_flag_quotes_and_double_dash() -> None:
    copy = one('COPY --chown="a b" x y\n')
    assert isinstance(copy, Copy) and copy.chown == "a b"
    run = one("RUN -- --version\n")
    assert isinstance(run, Run) and run.command.args == ("--version",)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("COPY --frm=x a b", "unknown flag --frm"),
        ("COPY --from=a --from=b a b", "duplicate flag specified: --from"),
        ("COPY --from a b", "missing a value on flag --from"),
        ("COPY --link=yes a b", "expecting boolean value for flag --link"),
        ("ENV --x=1 A=b", "ENV takes no flags"),
        ("RUN --network=bridge x", "invalid --network=bridge"),
        ("RUN --security=x y", "invalid --security=x"),
        ("FROM --platfrom=linux/amd64 x", "unknown flag --platfrom"),
    ],
)
def test_flag_errors(line: str, fragment: str) -> None:
    err = error(f"FROM x\n\n{line}\n" if not line.startswith("FROM") else f"\n\n{line}\n")
    assert err.line == 3
    assert fragment in str(err)
    assert str(err).startswith("Dockerfile:3: ")


def test_run_flags() -> None:
    run = one("RUN --network=none --security=insecure --mount=type=tmpfs,target=/t true\n")
    assert isinstance(run, Run)
    assert run.network == "none" and run.security == "insecure"
    assert run.mounts == (Mount("type=tmpfs,target=/t", type="tmpfs", target="/t", readonly=False),)


# ---- mounts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("target=/src", {"type": "bind", "target": "/src", "readonly": True}),
        ("type=bind,source=.,target=/src,rw", {"readonly": False, "source": "."}),
        ("type=bind,from=build,src=/out,dst=/in", {"from_": "build", "source": "/out"}),
        (
            "type=cache,target=/root/.cache,id=pip,sharing=locked,mode=0755,uid=1000,gid=2",
            {
                "type": "cache",
                "readonly": False,
                "id": "pip",
                "sharing": "locked",
                "mode": 0o755,
                "uid": 1000,
                "gid": 2,
            },
        ),
        ("type=cache,target=/c,ro", {"readonly": True}),
        ("type=tmpfs,target=/t,size=64m", {"readonly": False, "size": "64m"}),
        ("type=secret,id=tok,required", {"id": "tok", "required": True, "readonly": True}),
        ("type=secret,id=tok,env=TOKEN", {"env": "TOKEN"}),
        ("type=ssh", {"type": "ssh"}),
        ("TYPE=Cache,Target=/c", {"type": "cache", "target": "/c"}),
        ("type=cache,target=$DIR", {"target": None}),  # deferred until expansion
    ],
)
def test_parse_mount(text: str, expected: dict[str, object]) -> None:
    mount = df.parse_mount(text)
    assert mount.raw == text
    for key, value in expected.items():
        assert getattr(mount, key) == value, key


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("type=nfs,target=/x", "unsupported mount type"),
        ("type=bind,target=/x,from=$STAGE", "doesn't support variable expansion"),
        ("type=bind,target=/x,mode=0755", "mode not allowed"),
        ("type=bind,target=/x,sharing=locked", "invalid cache sharing"),
        ("type=cache,target=/x,sharing=maybe", "unsupported sharing value"),
        ("type=cache,target=/x,mode=9", "invalid value 9 for mode"),
        ("type=cache,target=/x,uid=-1", "invalid value -1 for uid"),
        ("type=bind,target=/x,readonly=maybe", "invalid value for readonly"),
        ("type=bind,target=/x,required", "unexpected key 'required'"),
        ("type=bind,targte=/x", "did you mean target"),
        ("type=bind,target", "must be a key=value pair"),
        ("type=secret", "one of source, target required"),
        ("type=secret,id=a,source=b", "both source and id"),
        ("type=secret,id=a,from=b", "secret mount should not have a from"),
        ("type=bind", "requires a target"),
        ("type=bind,target=/x,size=1", "size not allowed"),
    ],
)
def test_parse_mount_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        df.parse_mount(text)


def test_bad_mount_is_a_syntax_error_at_its_line() -> None:
    err = error("FROM x\nRUN --mount=type=nfs,target=/x true\n")
    assert err.line == 2 and "unsupported mount type" in str(err)


# ---- JSON (exec) form vs shell form ------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "args", "exec_form"),
    [
        ('CMD ["a", "b c"]', ("a", "b c"), True),
        ("CMD a b", ("a b",), False),
        ("CMD [a, b]", ("[a, b]",), False),  # invalid JSON falls back to shell form
        ("CMD ['a']", ("['a']",), False),
        ('CMD ["a"] extra', ('["a"] extra',), False),
        ("CMD []", (), True),
        ('CMD   ["a\\"q", "\\u00e9"]', ('a"q', "\u00e9"), True),
    ],
)
def test_exec_and_shell_form(line: str, args: tuple[str, ...], exec_form: bool) -> None:
    cmd = one(line + "\n")
    assert isinstance(cmd, Cmd)
    assert cmd.command == CommandLine(args, exec_form)


@pytest.mark.parametrize(
    "line",
    ['CMD ["a", 1]', 'RUN ["a", null]', 'ENTRYPOINT [["a"]]', 'COPY ["a", true]'],
)
def test_json_array_of_non_strings_is_an_error(line: str) -> None:
    err = error(f"FROM x\n{line}\n")
    assert err.line == 2 and "arrays must be comprised of strings only" in str(err)


# ---- every instruction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM alpine\n", {"image": "alpine", "name": None, "platform": None}),
        ("FROM alpine AS Build\n", {"name": "build"}),
        ("from alpine as b-1.x_y\n", {"name": "b-1.x_y"}),
        ("FROM --platform=$BUILDPLATFORM golang:1 AS b\n", {"platform": "$BUILDPLATFORM"}),
        ("FROM ${REGISTRY}/img:${TAG}\n", {"image": "${REGISTRY}/img:${TAG}"}),
    ],
)
def test_from(text: str, expected: dict[str, object]) -> None:
    instr = df.parse(text).stages[0].from_
    for key, value in expected.items():
        assert getattr(instr, key) == value


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("ENV A=1", (("A", "1"),)),
        ('ENV A=1 B="two words" C=x\\ y', (("A", "1"), ("B", '"two words"'), ("C", "x\\ y"))),
        ("ENV A hello  world", (("A", "hello  world"),)),  # old form: the rest is the value
        ('ENV A "quoted value"', (("A", '"quoted value"'),)),
        ("ENV A=", (("A", ""),)),
        ("ENV A=$B", (("A", "$B"),)),  # kept raw; the builder expands
        ("env a=b=c", (("a", "b=c"),)),
    ],
)
def test_env(line: str, expected: tuple[tuple[str, str], ...]) -> None:
    env = one(line + "\n")
    assert isinstance(env, Env) and env.pairs == expected


def test_label() -> None:
    label = one('LABEL "com.example.vendor"="ACME Inc" version=1.0 description="a \\"b\\""\n')
    assert isinstance(label, Label)
    assert label.pairs == (
        ('"com.example.vendor"', '"ACME Inc"'),
        ("version", "1.0"),
        ("description", '"a \\"b\\""'),
    )
    old = one("LABEL maintainer someone@example.com\n")
    assert isinstance(old, Label) and old.pairs == (("maintainer", "someone@example.com"),)


def test_arg() -> None:
    arg = one('ARG A B=2 C="x y" D=\n')
    assert isinstance(arg, Arg)
    assert arg.args == (ArgDecl("A"), ArgDecl("B", "2"), ArgDecl("C", '"x y"'), ArgDecl("D", ""))


@pytest.mark.parametrize(
    ("line", "cls", "attr", "value"),
    [
        ("EXPOSE 80 443/tcp  53/udp", Expose, "ports", ("80", "443/tcp", "53/udp")),
        ("EXPOSE $PORT", Expose, "ports", ("$PORT",)),
        ("USER app:app", User, "user", "app:app"),
        ("USER $U", User, "user", "$U"),
        ("WORKDIR /app dir", Workdir, "path", "/app dir"),
        ("STOPSIGNAL SIGTERM", StopSignal, "signal", "SIGTERM"),
        ("MAINTAINER Jane <j@x.org>", Maintainer, "name", "Jane <j@x.org>"),
        ('VOLUME ["/a", "/b c"]', Volume, "paths", ("/a", "/b c")),
        ("VOLUME /a /b", Volume, "paths", ("/a", "/b")),
        ('SHELL ["/bin/bash", "-o", "pipefail", "-c"]', Shell, "args",
         ("/bin/bash", "-o", "pipefail", "-c")),
        ('ENTRYPOINT ["tini", "--"]', Entrypoint, "command", CommandLine(("tini", "--"), True)),
        ("ENTRYPOINT []", Entrypoint, "command", CommandLine((), True)),
        ("ENTRYPOINT exec app", Entrypoint, "command", CommandLine(("exec app",), False)),
        ("RUN apt-get update && apt-get install -y x", Run, "command",
         CommandLine(("apt-get update && apt-get install -y x",), False)),
        ('RUN ["/bin/true"]', Run, "command", CommandLine(("/bin/true",), True)),
        ("COPY a b c /d/", Copy, "sources", ("a", "b", "c")),
        ('COPY ["a b", "/d/"]', Copy, "dest", "/d/"),
        ("ADD a.tar.gz /x", Add, "sources", ("a.tar.gz",)),
    ],
)  # fmt: skip
def test_simple_instructions(line: str, cls: type, attr: str, value: object) -> None:
    instr = one(line + "\n")
    assert isinstance(instr, cls)
    assert getattr(instr, attr) == value


def test_keywords_are_case_insensitive_and_original_is_kept() -> None:
    parsed = df.parse("from base\nrUn echo hi\nCoPy a b\n")
    run, copy = parsed.stages[0].instructions
    assert isinstance(run, Run) and isinstance(copy, Copy)
    assert run.original == "rUn echo hi"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("HEALTHCHECK NONE", {"command": None, "test": ("NONE",)}),
        ("healthcheck none", {"command": None}),
        (
            "HEALTHCHECK CMD curl -f http://localhost/ || exit 1",
            {"test": ("CMD-SHELL", "curl -f http://localhost/ || exit 1"), "interval": None},
        ),
        (
            "HEALTHCHECK --interval=5m --timeout=3s --start-period=1m30s --start-interval=500ms "
            '--retries=3 CMD ["/check", "-v"]',
            {
                "test": ("CMD", "/check", "-v"),
                "interval": 300_000_000_000,
                "timeout": 3_000_000_000,
                "start_period": 90_000_000_000,
                "start_interval": 500_000_000,
                "retries": 3,
            },
        ),
        ("HEALTHCHECK --interval=0s CMD true", {"interval": 0}),
    ],
)
def test_healthcheck(line: str, expected: dict[str, object]) -> None:
    instr = one(line + "\n")
    assert isinstance(instr, Healthcheck)
    for key, value in expected.items():
        assert getattr(instr, key) == value, key


def test_onbuild() -> None:
    instr = one("ONBUILD COPY --chown=1 . /app\n")
    assert isinstance(instr, Onbuild)
    assert isinstance(instr.trigger, Copy) and instr.trigger.chown == "1"
    assert instr.trigger.original == "COPY --chown=1 . /app"
    assert instr.expression == "COPY --chown=1 . /app"


def test_onbuild_heredoc_expression_round_trips_through_parse_trigger() -> None:
    instr = one("onbuild RUN <<EOF\necho hi\nEOF\n")
    assert isinstance(instr, Onbuild)
    assert instr.expression == "RUN <<EOF\necho hi\nEOF"
    trigger = df.parse_trigger(instr.expression)
    assert isinstance(trigger, Run)
    assert trigger.heredocs == (Heredoc("EOF", "echo hi\n"),)
    assert isinstance(instr.trigger, Run) and trigger.command == instr.trigger.command


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("FROM x", "FROM isn't allowed"),
        ("RUN a\nRUN b", "must be one instruction"),
        ("BOGUS x", "unknown instruction"),
    ],
)
def test_parse_trigger_errors(expression: str, fragment: str) -> None:
    with pytest.raises(DockerfileSyntaxError, match=fragment):
        df.parse_trigger(expression)


# ---- errors with the right line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("FROM x\nRUN a\nRUNN b\n", 3, "unknown instruction: RUNN (did you mean RUN?)"),
        ("FROM x\n\nFOO bar\n", 3, "unknown instruction: FOO"),
        ("", 1, "file with no instructions"),
        ("# only a comment\n\n", 2, "file with no instructions"),
        ("ARG A=1\nARG B\n", 2, "no FROM instruction"),
        ("ARG A\nRUN x\nFROM y\n", 2, "no build stage in current context"),
        ("FROM a AS x\nFROM b AS X\n", 2, "duplicate stage name 'x'"),
        ("FROM\n", 1, "FROM requires either one or three arguments"),
        ("FROM a b\n", 1, "FROM requires either one or three arguments"),
        ("FROM a AS 1st\n", 1, "invalid name for build stage"),
        ("FROM a AS b c\n", 1, "FROM requires either one or three arguments"),
        ("FROM x\nRUN\n", 2, "RUN requires at least one argument"),
        ("FROM x\nCMD\n", 2, "CMD requires at least one argument"),
        ("FROM x\nENTRYPOINT\n", 2, "ENTRYPOINT requires at least one argument"),
        ("FROM x\nCOPY a\n", 2, "COPY requires at least two arguments"),
        ("FROM x\nADD\n", 2, "ADD requires at least two arguments"),
        ("FROM x\nENV\n", 2, "ENV requires at least one argument"),
        ("FROM x\nENV A\n", 2, "ENV must have two arguments"),
        ("FROM x\nENV A=1 B\n", 2, "can't find = in 'B'"),
        ("FROM x\nENV =1\n", 2, "ENV names can not be blank"),
        ("FROM x\nLABEL\n", 2, "LABEL requires at least one argument"),
        ("FROM x\nARG\n", 2, "ARG requires at least one argument"),
        ("FROM x\nARG =v\n", 2, "ARG names can not be blank"),
        ("FROM x\nEXPOSE\n", 2, "EXPOSE requires at least one argument"),
        ("FROM x\nUSER\n", 2, "USER requires exactly one argument"),
        ("FROM x\nWORKDIR\n", 2, "WORKDIR requires exactly one argument"),
        ("FROM x\nSTOPSIGNAL\n", 2, "STOPSIGNAL requires exactly one argument"),
        ("FROM x\nMAINTAINER\n", 2, "MAINTAINER requires exactly one argument"),
        ("FROM x\nVOLUME\n", 2, "VOLUME requires at least one argument"),
        ('FROM x\nVOLUME ["/a", " "]\n', 2, "VOLUME specified can not be an empty string"),
        ("FROM x\nSHELL /bin/sh -c\n", 2, "SHELL requires the arguments to be in JSON form"),
        ("FROM x\nSHELL []\n", 2, "SHELL requires at least one argument"),
        ("FROM x\nHEALTHCHECK\n", 2, "HEALTHCHECK requires at least one argument"),
        ("FROM x\nHEALTHCHECK NONE x\n", 2, "HEALTHCHECK NONE takes no arguments"),
        ("FROM x\nHEALTHCHECK CMD\n", 2, "Missing command after HEALTHCHECK CMD"),
        ("FROM x\nHEALTHCHECK RUN x\n", 2, 'Unknown type "RUN" in HEALTHCHECK'),
        ("FROM x\nHEALTHCHECK --interval=5 CMD x\n", 2, "invalid duration"),
        ("FROM x\nHEALTHCHECK --interval=5d CMD x\n", 2, "unknown unit"),
        ("FROM x\nHEALTHCHECK --timeout=10us CMD x\n", 2, "cannot be less than 1ms"),
        ("FROM x\nHEALTHCHECK --retries=0 CMD x\n", 2, "--retries must be at least 1"),
        ("FROM x\nHEALTHCHECK --retries=x CMD x\n", 2, "invalid --retries"),
        ("FROM x\nONBUILD\n", 2, "ONBUILD requires at least one argument"),
        ("FROM x\nONBUILD ONBUILD RUN x\n", 2, "Chaining ONBUILD via `ONBUILD ONBUILD`"),
        ("FROM x\nONBUILD FROM y\n", 2, "FROM isn't allowed as an ONBUILD trigger"),
        ("FROM x\nONBUILD maintainer y\n", 2, "MAINTAINER isn't allowed as an ONBUILD trigger"),
        ("FROM x\nONBUILD BOGUS y\n", 2, "unknown instruction: BOGUS"),
        ("FROM x\nONBUILD COPY a\n", 2, "COPY requires at least two arguments"),
        ("FROM x\nRUN a \\\n  b\nCOPY a\n", 4, "COPY requires at least two arguments"),
    ],
)
def test_errors_name_file_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(DockerfileSyntaxError) as info:
        df.parse(text, path="ctx/Dockerfile.test")
    assert info.value.path == "ctx/Dockerfile.test"
    assert info.value.line == line
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"ctx/Dockerfile.test:{line}: ")


# ---- structure ---------------------------------------------------------------------------------


def test_meta_args_and_stages() -> None:
    parsed = df.parse(
        "ARG BASE=alpine\nARG V\nFROM $BASE AS one\nARG V\nRUN a\nFROM one\nCOPY --from=one a b\n"
    )
    assert [a.args for a in parsed.meta_args] == [(ArgDecl("BASE", "alpine"),), (ArgDecl("V"),)]
    assert [s.name for s in parsed.stages] == ["one", None]
    assert [s.index for s in parsed.stages] == [0, 1]
    assert [type(i) for i in parsed.stages[0].instructions] == [Arg, Run]
    assert isinstance(parsed.stages[1].from_, From) and parsed.stages[1].from_.line == 6
    assert len(parsed.instructions) == 7


def test_instructions_are_frozen() -> None:
    run = one("RUN x\n")
    with pytest.raises(AttributeError):
        run.line = 5  # type: ignore[misc]


# ---- the expansion table and durations ---------------------------------------------------------

# From docker's reference ("Environment replacement"): these instructions have variables
# expanded by the builder; ARG is expanded too (BuildKit). RUN, CMD, ENTRYPOINT are left to the
# shell; the others are not expanded at all.
DOCUMENTED_EXPANDED = {
    "ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
    "ARG",
}  # fmt: skip


@pytest.mark.parametrize("keyword", sorted(df.EXPANSION))
def test_expansion_table_matches_docker_reference(keyword: str) -> None:
    rule = df.expansion_rule(keyword.lower())
    assert (rule.args != "none") == (keyword in DOCUMENTED_EXPANDED)
    assert (rule.scope is not Scope.NONE) == (keyword in DOCUMENTED_EXPANDED)


def test_expansion_table_covers_every_instruction_and_flag_scopes() -> None:
    parsed_keywords = {
        "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
        "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME",
        "WORKDIR",
    }  # fmt: skip
    assert set(df.EXPANSION) == parsed_keywords
    assert df.EXPANSION["FROM"].scope is Scope.GLOBAL
    assert df.EXPANSION["FROM"].flags["platform"] is Scope.GLOBAL
    assert df.EXPANSION["COPY"].flags["from"] is Scope.GLOBAL
    assert df.EXPANSION["COPY"].flags["chown"] is Scope.STAGE
    assert "exclude" not in df.EXPANSION["COPY"].flags
    assert df.EXPANSION["RUN"].flags == {"mount": Scope.STAGE}
    assert df.EXPANSION["EXPOSE"].args == "split"
    assert df.EXPANSION["ENV"].args == "pairs"


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("1ns", 1),
        ("1.5s", 1_500_000_000),
        ("1m30s", 90_000_000_000),
        ("2h", 7_200_000_000_000),
        ("10us", 10_000),
        ("10\u00b5s", 10_000),
        ("-1s", -1_000_000_000),
        (".5ms", 500_000),
    ],
)
def test_parse_duration(text: str, ns: int) -> None:
    assert df.parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "5", "s", "1x", "1.s.", "--1s"])
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(ValueError):
        df.parse_duration(text)
