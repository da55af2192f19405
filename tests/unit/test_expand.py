"""Docker's word expansion: the lexer, the variables it used, and expanding whole instructions."""

from __future__ import annotations

import dataclasses

import pytest

from runtime.build import dockerfile as df
from runtime.build.dockerfile import (
    Add,
    Arg,
    ArgDecl,
    Copy,
    Env,
    Expose,
    From,
    Instruction,
    Label,
    Run,
    StopSignal,
    User,
    Volume,
    Workdir,
)
from runtime.build.expand import Expander, ExpansionError, expand_instruction
from runtime.errors import DockerfileSyntaxError
from runtime.image.images import history_text

ENV = {
    "a": "hello world",
    "empty": "",
    "p": "/usr/local/bin/python3.11",
    "v": "1.2.3",
    "spaces": "  x  y  ",
}


@pytest.mark.parametrize(
    ("text", "word", "words"),
    [
        ("plain", "plain", ["plain"]),
        ("$a", "hello world", ["hello", "world"]),
        ("${a}", "hello world", ["hello", "world"]),
        ("x${a}y", "xhello worldy", ["xhello", "worldy"]),
        ('"$a"', "hello world", ["hello world"]),
        ("'$a'", "$a", ["$a"]),
        ("\\$a", "$a", ["$a"]),
        ("a\\ b", "a b", ["a b"]),
        ("a  b", "a  b", ["a", "b"]),
        ('"a  b" c', "a  b c", ["a  b", "c"]),
        ('""', "", []),
        ("$unset", "", []),
        ("$", "$", ["$"]),
        ("$$", "", []),  # a special parameter, empty as in docker
        ("$1x", "x", ["x"]),
        ("a$", "a$", ["a$"]),
        ("${a:-def}", "hello world", ["hello", "world"]),
        ("${empty:-def}", "def", ["def"]),
        ("${empty-def}", "", []),
        ("${unset-def}", "def", ["def"]),
        ("${unset:-$v}", "1.2.3", ["1.2.3"]),
        ('${unset:-"x y"}', "x y", ["x", "y"]),
        ("${a:+alt}", "alt", ["alt"]),
        ("${empty:+alt}", "", []),
        ("${empty+alt}", "alt", ["alt"]),
        ("${unset+alt}", "", []),
        ("${v:?}", "1.2.3", ["1.2.3"]),
        ("${empty?}", "", []),
        ("${p#*/}", "usr/local/bin/python3.11", ["usr/local/bin/python3.11"]),
        ("${p##*/}", "python3.11", ["python3.11"]),
        ("${p%/*}", "/usr/local/bin", ["/usr/local/bin"]),
        ("${p%%/*}", "", []),
        ("${v%.*}", "1.2", ["1.2"]),
        ("${v%%.*}", "1", ["1"]),
        ("${v#[0-9].}", "2.3", ["2.3"]),
        ("${v#?}", ".2.3", [".2.3"]),
        ("${p#\\*}", "/usr/local/bin/python3.11", ["/usr/local/bin/python3.11"]),
        ("${v#}", "1.2.3", ["1.2.3"]),
        ("${unset#x}", "", []),
        ("${p/python/py}", "/usr/local/bin/py3.11", ["/usr/local/bin/py3.11"]),
        ("${v//./-}", "1-2-3", ["1-2-3"]),
        ("${v/./}", "12.3", ["12.3"]),
        ("${v/#/x}", "1.2.3", ["1.2.3"]),
        ("${spaces}", "  x  y  ", ["x", "y"]),
        ('"${spaces}"', "  x  y  ", ["  x  y  "]),
        ('"a\\"b"', 'a"b', ['a"b']),
        ('"a\\b"', "a\\b", ["a\\b"]),
        ('"a\\$v"', "a$v", ["a$v"]),
        ('"it\'s"', "it's", ["it's"]),
        ("'a\"b'", 'a"b', ['a"b']),
        ("a\\", "a", ["a"]),
    ],
)
def test_word_and_words(text: str, word: str, words: list[str]) -> None:
    ex = Expander(ENV)
    assert ex.word(text) == word
    assert ex.words(text) == words


@pytest.mark.parametrize(
    ("text", "fragment", "variable"),
    [
        ("${unset:?must be set}", "unset: must be set", "unset"),
        ("${unset?}", "unset: is not allowed to be unset", "unset"),
        ("${empty:?}", "empty: is not allowed to be empty", "empty"),
        ("${a", "syntax error: missing '}'", None),
        ("${a:-x", "syntax error: missing '}'", None),
        ("${", "syntax error: missing '}'", None),
        ("${}", "bad substitution", None),
        ("${:-x}", "bad substitution", None),
        ("${a:#x}", "unsupported modifier (:#)", None),
        ("${a!x}", "unsupported modifier (!)", None),
        ("${#a}", "unsupported modifier (a)", None),
        ('"abc', "matching double-quote", None),
        ("'abc", "matching single-quote", None),
    ],
)
def test_errors_name_the_variable(text: str, fragment: str, variable: str | None) -> None:
    with pytest.raises(ExpansionError) as info:
        Expander(ENV).word(text)
    assert fragment in str(info.value)
    assert text in str(info.value)  # the word being processed is named
    assert info.value.variable == variable
    assert isinstance(info.value, ValueError)


def test_used_and_missing_variables() -> None:
    ex = Expander(ENV)
    ex.word("$a ${empty:-$v} '$quoted' \\$escaped $1 $@ ${nope:+x}")
    assert ex.used == {"a", "empty", "v", "nope"}
    assert ex.missing == {"nope"}
    ex.words('"$p"')
    assert "p" in ex.used  # accumulates across calls


def test_backtick_escape() -> None:
    ex = Expander({"x": "1"}, escape="`")
    assert ex.word("`$x") == "$x"
    assert ex.word("c:\\dir\\$x") == "c:\\dir\\1"
    assert ex.word('"a`"b"') == 'a"b'
    with pytest.raises(ValueError):
        Expander({}, escape="!")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("echo $a\n", "echo hello world\n"),
        ("'$v' \"$v\"\n", "'1.2.3' \"1.2.3\"\n"),  # quotes are plain characters in a heredoc
        ("\\$v \\\\ \\n\n", "$v \\ \\n\n"),
        ("a \\\nb\n", "a b\n"),
        ("${unset:-d} $(cmd)\n", "d $(cmd)\n"),
    ],
)
def test_heredoc_expansion(body: str, expected: str) -> None:
    assert Expander(ENV).heredoc(body) == expected


# ---- whole instructions ------------------------------------------------------------------------


def instruction(line: str) -> Instruction:
    parsed = df.parse("FROM base\n" + line + "\n")
    return parsed.stages[0].instructions[0]


def test_env_pairs_see_values_from_before_the_line() -> None:
    # docker: ENV abc=bye def=$abc gives def the value abc had before the line
    result = expand_instruction(
        instruction('ENV abc=bye def=$abc "g h"="$abc x"'), {"abc": "hello"}
    )
    assert isinstance(result.instruction, Env)
    assert result.instruction.pairs == (("abc", "bye"), ("def", "hello"), ("g h", "hello x"))
    assert result.used == {"abc"}


def test_env_old_form_value_is_one_word() -> None:
    result = expand_instruction(instruction('ENV A "quoted  value" $B'), {"B": "b"})
    assert isinstance(result.instruction, Env)
    assert result.instruction.pairs == (("A", "quoted  value b"),)


def test_label_and_arg() -> None:
    label = expand_instruction(instruction('LABEL "org.$N"="v $V"'), {"N": "x", "V": "1"})
    assert isinstance(label.instruction, Label)
    assert label.instruction.pairs == (("org.x", "v 1"),)
    arg = expand_instruction(instruction('ARG A=$B C D="x y"'), {"B": "b"})
    assert isinstance(arg.instruction, Arg)
    assert arg.instruction.args == (ArgDecl("A", "b"), ArgDecl("C"), ArgDecl("D", "x y"))


def test_copy_expands_paths_and_owner_not_from_or_exclude() -> None:
    env = {"SRC": "app dir", "DST": "/opt", "U": "1000", "M": "0644", "S": "build", "X": "*.pyc"}
    result = expand_instruction(
        instruction("COPY --from=$S --chown=$U:$U --chmod=$M --exclude=$X $SRC ${DST}/app"), env
    )
    copy = result.instruction
    assert isinstance(copy, Copy)
    assert copy.sources == ("app dir",)
    assert copy.dest == "/opt/app"
    assert copy.chown == "1000:1000" and copy.chmod == "0644"
    assert copy.from_ == "$S"  # resolved by the stage planner, with global ARGs only
    assert copy.excludes == ("$X",)  # docker does not expand --exclude
    assert result.used == {"SRC", "DST", "U", "M"}


def test_copy_json_form_is_expanded_too() -> None:
    result = expand_instruction(instruction('COPY ["$A", "/d/$A"]'), {"A": "f"})
    assert isinstance(result.instruction, Copy)
    assert result.instruction.sources == ("f",) and result.instruction.dest == "/d/f"


def test_heredoc_bodies_expand_unless_the_delimiter_is_quoted() -> None:
    copy = instruction("COPY <<A <<-'B' /d/\n$X 'q'\nA\n\t$X\n\tB")
    result = expand_instruction(copy, {"X": "1"})
    assert isinstance(result.instruction, Copy)
    first, second = result.instruction.heredocs
    assert first.text == "1 'q'\n" and not first.expand
    assert second.text == "$X\n" and second.content == "\t$X\n"
    assert result.used == {"X"}


def test_add_expands_checksum() -> None:
    add = expand_instruction(
        instruction("ADD --checksum=$C $URL /x"), {"C": "sha256:1", "URL": "u"}
    )
    assert isinstance(add.instruction, Add)
    assert add.instruction.checksum == "sha256:1" and add.instruction.sources == ("u",)


def test_expose_splits_words() -> None:
    result = expand_instruction(instruction('EXPOSE $PORTS "$P"/tcp 53/udp'), {"PORTS": "80 443"})
    assert isinstance(result.instruction, Expose)
    assert result.instruction.ports == ("80", "443", "/tcp", "53/udp")
    # the parser splits EXPOSE on blanks before expansion, so quotes cannot hold one
    with pytest.raises(DockerfileSyntaxError, match="matching double-quote"):
        expand_instruction(instruction('EXPOSE "8 9"'), {})


@pytest.mark.parametrize(
    ("line", "cls", "attr", "value"),
    [
        ("USER $U:$G", User, "user", "app:staff"),
        ("WORKDIR ${HOME:-/root}/src", Workdir, "path", "/home/app/src"),
        ("STOPSIGNAL $SIG", StopSignal, "signal", "SIGINT"),
        ("VOLUME $HOME /data", Volume, "paths", ("/home/app", "/data")),
        ('VOLUME ["$HOME"]', Volume, "paths", ("/home/app",)),
    ],
)
def test_single_word_instructions(line: str, cls: type, attr: str, value: object) -> None:
    env = {"U": "app", "G": "staff", "HOME": "/home/app", "SIG": "SIGINT"}
    result = expand_instruction(instruction(line), env)
    assert isinstance(result.instruction, cls)
    assert getattr(result.instruction, attr) == value


def test_from_is_expanded_with_whatever_scope_the_caller_gives() -> None:
    parsed = df.parse("FROM --platform=$P ${REG:-docker.io}/img:$TAG AS b\n")
    result = expand_instruction(parsed.stages[0].from_, {"TAG": "1", "P": "linux/amd64"})
    assert isinstance(result.instruction, From)
    assert result.instruction.image == "docker.io/img:1"
    assert result.instruction.platform == "linux/amd64"
    assert result.instruction.name == "b"


def test_run_command_is_left_to_the_shell_but_mounts_expand() -> None:
    run = instruction("RUN --mount=type=cache,target=$CACHE,id=$ID,from=base echo $CACHE")
    result = expand_instruction(run, {"CACHE": "/c", "ID": "pip"})
    assert isinstance(result.instruction, Run)
    assert result.instruction.command.args == ("echo $CACHE",)
    (mount,) = result.instruction.mounts
    assert (mount.target, mount.id, mount.from_) == ("/c", "pip", "base")
    assert result.used == {"CACHE", "ID"}


def test_mount_invalid_after_expansion_is_a_syntax_error() -> None:
    run = instruction("RUN --mount=type=$T,target=/x true")
    with pytest.raises(DockerfileSyntaxError, match="unsupported mount type 'nfs'") as info:
        expand_instruction(run, {"T": "nfs"}, path="Dfile")
    assert info.value.line == 2 and info.value.path == "Dfile"


def test_errors_become_syntax_errors_at_the_instruction_line() -> None:
    parsed = df.parse("FROM base\nRUN x\nWORKDIR ${DIR:?set DIR with --build-arg}\n")
    workdir = parsed.stages[0].instructions[1]
    with pytest.raises(DockerfileSyntaxError) as info:
        expand_instruction(workdir, {}, path="ctx/Dockerfile")
    assert info.value.line == 3
    assert "WORKDIR" in str(info.value) and "DIR: set DIR with --build-arg" in str(info.value)
    assert isinstance(info.value.__cause__, ExpansionError)
    assert info.value.__cause__.variable == "DIR"


def test_blank_env_name_after_expansion_is_an_error() -> None:
    with pytest.raises(DockerfileSyntaxError, match="ENV names can not be blank"):
        expand_instruction(instruction("ENV $NOPE=1"), {})


def test_escape_directive_is_honoured() -> None:
    parsed = df.parse("# escape=`\nFROM base\nWORKDIR c:\\$D\\`$D\n")
    result = expand_instruction(parsed.stages[0].instructions[0], {"D": "x"}, escape=parsed.escape)
    assert isinstance(result.instruction, Workdir)
    assert result.instruction.path == "c:\\x\\$D"


# For each instruction kind, a line that refers to $V in its arguments: the table in
# dockerfile.EXPANSION says whether docker expands it, and expand_instruction must agree.
SAMPLES: dict[str, str] = {
    "ADD": "ADD $V /d",
    "ARG": "ARG A=$V",
    "CMD": "CMD echo $V",
    "COPY": "COPY $V /d",
    "ENTRYPOINT": "ENTRYPOINT echo $V",
    "ENV": "ENV A=$V",
    "EXPOSE": "EXPOSE $V",
    "FROM": "",  # FROM is the stage's first line: built below
    "HEALTHCHECK": "HEALTHCHECK CMD echo $V",
    "LABEL": "LABEL a=$V",
    "MAINTAINER": "MAINTAINER $V",
    "ONBUILD": "ONBUILD WORKDIR $V",
    "RUN": "RUN echo $V",
    "SHELL": 'SHELL ["/bin/$V"]',
    "STOPSIGNAL": "STOPSIGNAL $V",
    "USER": "USER $V",
    "VOLUME": "VOLUME $V",
    "WORKDIR": "WORKDIR $V",
}


@pytest.mark.parametrize("keyword", sorted(df.EXPANSION))
def test_implementation_agrees_with_the_table(keyword: str) -> None:
    if keyword == "FROM":
        instr: Instruction = df.parse("FROM img:$V\n").stages[0].from_
    else:
        instr = instruction(SAMPLES[keyword])
    result = expand_instruction(instr, {"V": "80"})
    changed = result.instruction != instr
    assert changed == (df.expansion_rule(keyword).args != "none")
    assert (result.used == {"V"}) == changed


def test_expanded_instruction_keeps_its_location() -> None:
    instr = instruction("USER $U")
    result = expand_instruction(instr, {"U": "x"})
    assert isinstance(result.instruction, User)
    assert dataclasses.replace(result.instruction, user="$U") == instr


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ('ENV B="$A/x" C=${A:-z}', "ENV B=/a/x C=/a"),
        ("LABEL where=$A", "LABEL where=/a"),
        ("WORKDIR $A/w", "WORKDIR /a/w"),
        ("USER ${A#/}", "USER a"),
        ('CMD ["echo", "$A"]', 'CMD ["echo", "$A"]'),  # exec form: never expanded
    ],
)
def test_history_shows_values_after_expansion(line: str, shown: str) -> None:
    expanded = expand_instruction(instruction(line), {"A": "/a"}).instruction
    assert history_text(expanded) == shown
