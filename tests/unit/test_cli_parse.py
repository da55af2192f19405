"""The command line without containers or a store: parsing, docker's formats, the pure planners."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pytest_isolate.cli import _parser
from pytest_isolate.cli_build import build_options, parse_build_args, parse_secret
from pytest_isolate.cli_format import (
    human_age,
    human_duration,
    human_size,
    parse_created,
    parse_duration,
    parse_size,
    table,
    truncate,
)
from pytest_isolate.cli_images import history_rows, image_rows, inspect_image, plan_rmi
from pytest_isolate.cli_run import plan_process
from pytest_isolate.progress import PlainProgress, TtyProgress, make_progress
from runtime.build.builder import BuildEvent
from runtime.errors import ImageError, SpecError
from runtime.image.config import ImageConfig
from runtime.image.images import RunnableImage
from runtime.image.store import Image, LayerRecord
from runtime.spec import DEFAULT_PATH, Rootfs

L1 = "sha256:" + "1" * 64
L2 = "sha256:" + "2" * 64


def parse(*argv: str) -> object:
    return _parser().parse_args(list(argv))


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# --- parsing ---------------------------------------------------------------------------------


def test_run_keeps_its_options_and_passes_the_command_through() -> None:
    args = parse("run", "-e", "A=1", "-w", "/x", "busybox", "sh", "-c", "echo --rm")
    assert (args.command, args.image, args.cmd) == ("run", "busybox", ["sh", "-c", "echo --rm"])
    assert (args.env, args.workdir) == (["A=1"], "/x")


def test_images_options() -> None:
    args = parse("images")
    assert (args.reference, args.quiet, args.no_trunc, args.format) == (None, False, False, "table")
    args = parse("images", "-q", "--no-trunc", "--format", "json", "busybox:1")
    assert (args.reference, args.quiet, args.no_trunc, args.format) == (
        "busybox:1",
        True,
        True,
        "json",
    )


def test_format_accepts_only_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'yaml'" in usage_error(capsys, "images", "--format", "yaml")


def test_rmi_and_inspect_take_several_images(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("rmi", "-f", "a", "b:2")
    assert (args.force, args.images) == (True, ["a", "b:2"])
    assert parse("inspect", "a", "b").images == ["a", "b"]
    assert "the following arguments are required: IMAGE" in usage_error(capsys, "rmi")


def test_tag_needs_source_and_target(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("tag", "a", "b:c")
    assert (args.source, args.target) == ("a", "b:c")
    assert "TARGET_IMAGE" in usage_error(capsys, "tag", "a")


def test_import_reference_is_optional() -> None:
    args = parse("import", "root.tar.xz")
    assert (args.file, args.reference, args.message) == ("root.tar.xz", None, None)
    args = parse("import", "-m", "base", "-c", 'CMD ["bash"]', "root.tar", "debian:bookworm")
    assert (args.file, args.reference, args.message) == ("root.tar", "debian:bookworm", "base")
    assert args.changes == ['CMD ["bash"]']


def test_prune_limits_are_parsed_into_bytes_and_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse("prune", "--all", "--max-size", "10G", "--max-age", "7d")
    assert (args.all, args.max_size, args.max_age) == (True, 10 << 30, 7 * 86400.0)
    args = parse("prune")
    assert (args.all, args.max_size, args.max_age) == (False, None, None)
    assert "invalid size '10Q'" in usage_error(capsys, "prune", "--max-size", "10Q")
    assert "invalid duration '7'" in usage_error(capsys, "prune", "--max-age", "7")


def test_check_and_history() -> None:
    assert parse("check").format == "table"
    args = parse("history", "--no-trunc", "img")
    assert (args.image, args.no_trunc) == ("img", True)


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'frobnicate'" in usage_error(capsys, "frobnicate")


# --- docker's human formats ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (999, "999B"),
        (1000, "1kB"),
        (1234, "1.23kB"),
        (12_345, "12.3kB"),
        (999_499, "999kB"),
        (999_999, "1MB"),
        (4_260_000, "4.26MB"),
        (1_500_000_000, "1.5GB"),
    ],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "Less than a second"),
        (1, "1 second"),
        (59, "59 seconds"),
        (60, "About a minute"),
        (119, "About a minute"),
        (120, "2 minutes"),
        (3599, "59 minutes"),
        (3600, "About an hour"),
        (5 * 3600, "5 hours"),
        (47 * 3600, "47 hours"),
        (3 * 86400, "3 days"),
        (15 * 86400, "2 weeks"),
        (90 * 86400, "3 months"),
        (3 * 365 * 86400, "3 years"),
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_created_timestamps() -> None:
    now = datetime(2024, 5, 15, 12, 0, 0, tzinfo=UTC)
    assert parse_created("2024-05-15T11:59:00.123456789Z") == datetime(
        2024, 5, 15, 11, 59, 0, 123456, tzinfo=UTC
    )
    assert human_age("2024-05-01T12:00:00Z", now) == "2 weeks ago"
    assert human_age("2024-05-15T13:00:00+01:00", now) == "Less than a second ago"
    assert human_age(None, now) == "N/A"
    assert human_age("yesterday", now) == "N/A"


@pytest.mark.parametrize(
    ("text", "size"),
    [("2048", 2048), ("10G", 10 << 30), ("512m", 512 << 20), ("1.5GiB", 3 << 29), ("3kb", 3072)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "10Q", "-1G", "1..5G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SpecError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("7d", 604800), ("1h30m", 5400), ("2w", 1209600)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "1h 30m", "h1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(SpecError, match="invalid duration"):
        parse_duration(text)


def test_table_pads_like_docker_and_truncate_marks_the_cut() -> None:
    text = table(("REPOSITORY", "TAG", "SIZE"), [("busybox", "latest", "4MB"), ("a", "b", "")])
    assert text.splitlines() == [
        "REPOSITORY   TAG       SIZE",
        "busybox      latest    4MB",
        "a            b",
    ]
    assert truncate("abcdef", 4) == "abc…"
    assert truncate("abcd", 4) == "abcd"


# --- the pure planners of the image commands -------------------------------------------------


def image(tags: tuple[str, ...] = (), *, layers: tuple[str, ...] = (L1,)) -> Image:
    config = ImageConfig.empty(architecture="amd64")
    for i, diff_id in enumerate(layers):
        config = config.add_layer(diff_id, created=f"2024-05-0{i + 1}T00:00:00Z", created_by="x")
    config = config.add_history(created_by='CMD ["sh"]', comment="note")
    return Image(config.id, config, tags)


def test_image_rows_one_per_tag_and_none_when_untagged() -> None:
    tagged = image(("docker.io/library/busybox:latest", "ghcr.io/me/tool:1"), layers=(L1, L2))
    untagged = image(layers=(L2,))
    rows = image_rows([tagged, untagged], {L1: 100, L2: 20})
    assert [(r.repository, r.tag, r.image_id, r.size) for r in rows] == [
        ("busybox", "latest", tagged.id, 120),
        ("ghcr.io/me/tool", "1", tagged.id, 120),
        ("<none>", "<none>", untagged.id, 20),
    ]
    assert [r.tag for r in image_rows([tagged, untagged], {}, reference="busybox")] == ["latest"]
    assert image_rows([tagged], {}, reference="busybox:1") == []


def test_image_rows_show_a_repository_digest_beside_its_tags_or_alone() -> None:
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    pushed = image(("reg:5000/app:1", f"reg:5000/app@{d1}", f"reg:5000/other@{d2}"))
    rows = image_rows([pushed], {})
    assert [(r.repository, r.tag, r.digest) for r in rows] == [
        ("reg:5000/app", "1", d1),
        ("reg:5000/other", "<none>", d2),
    ]


def test_history_rows_newest_first_with_layer_sizes() -> None:
    img = image(layers=(L1, L2))
    rows = history_rows(img, {L1: 100, L2: 20})
    assert [(r.image_id, r.created_by, r.size, r.comment) for r in rows] == [
        (img.id, 'CMD ["sh"]', 0, "note"),
        ("<missing>", "x", 20, ""),
        ("<missing>", "x", 100, ""),
    ]


def test_inspect_names_tags_layers_and_config(tmp_path: Path) -> None:
    img = image(("docker.io/library/busybox:latest",), layers=(L1, L2))
    layers = [
        LayerRecord(L1, tmp_path / "1", 100, None, ""),
        LayerRecord(L2, tmp_path / "2", 20, L1, ""),
    ]
    out = inspect_image(img, layers)
    assert out["Id"] == img.id
    assert out["RepoTags"] == ["busybox:latest"]
    assert out["RootFS"] == {"Type": "layers", "Layers": [L1, L2]}
    assert out["Size"] == 120
    assert out["GraphDriver"]["Data"]["LowerDir"] == f"{tmp_path}/2:{tmp_path}/1"
    assert out["Comment"] == "note"
    assert [h["created_by"] for h in out["History"]] == ["x", "x", 'CMD ["sh"]']


def test_rmi_by_tag_untags_and_deletes_with_the_last_tag() -> None:
    two = image(("docker.io/library/a:latest", "docker.io/library/b:latest"))
    plan = plan_rmi("a", two, force=False)
    assert (plan.untag, plan.delete) == (("docker.io/library/a:latest",), False)
    one = image(("docker.io/library/a:latest",))
    plan = plan_rmi("a:latest", one, force=False)
    assert (plan.untag, plan.delete) == (("docker.io/library/a:latest",), True)


def test_rmi_by_id_of_an_image_with_several_tags_needs_force() -> None:
    two = image(("docker.io/library/a:latest", "docker.io/library/b:latest"))
    with pytest.raises(ImageError, match=r"must be forced.*a:latest, b:latest"):
        plan_rmi(two.short_id, two, force=False)
    plan = plan_rmi(two.short_id, two, force=True)
    assert (plan.untag, plan.delete) == (two.tags, True)
    untagged = image()
    assert plan_rmi(untagged.id, untagged, force=False) == type(plan)((), True)


def test_created_ago_is_relative_to_now() -> None:
    now = datetime.now(UTC)
    stamp = (now - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert human_age(stamp, now) == "3 hours ago"


# --- run IMAGE: docker's entrypoint/cmd/env rules ------------------------------------------


def container(**changes: object) -> RunnableImage:
    config = ImageConfig.empty().with_config(**changes)
    return RunnableImage("img", config.id, config, Rootfs(lowers=("/layer",)))


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "command", "flag", "argv"),
    [
        (None, ("sh",), (), None, ("sh",)),  # CMD alone
        (None, ("sh",), ("echo", "x"), None, ("echo", "x")),  # the command replaces CMD
        (("tini", "--"), ("sh",), (), None, ("tini", "--", "sh")),  # ENTRYPOINT + CMD
        (("tini", "--"), ("sh",), ("ls",), None, ("tini", "--", "ls")),  # ... CMD replaced
        (("tini",), ("sh",), (), "env", ("env",)),  # --entrypoint drops the image's CMD
        (("tini",), ("sh",), ("-i",), "env", ("env", "-i")),
        (("tini",), ("sh",), ("ls",), "", ("ls",)),  # --entrypoint '' clears it
        (None, None, ("true",), None, ("true",)),
    ],
)
def test_entrypoint_and_cmd_interplay(
    entrypoint: tuple[str, ...] | None,
    cmd: tuple[str, ...] | None,
    command: tuple[str, ...],
    flag: str | None,
    argv: tuple[str, ...],
) -> None:
    config = container(entrypoint=entrypoint, cmd=cmd)
    assert plan_process(config, command=command, entrypoint=flag).argv == argv


def test_nothing_to_run_is_an_error() -> None:
    with pytest.raises(SpecError, match="no ENTRYPOINT or CMD"):
        plan_process(container(), command=())
    with pytest.raises(SpecError, match="no ENTRYPOINT or CMD"):
        plan_process(container(cmd=("sh",)), command=(), entrypoint="")
    bare = RunnableImage("./rootfs", None, ImageConfig.empty(), Rootfs(lowers=("/rootfs",)))
    with pytest.raises(SpecError, match="run needs a COMMAND"):
        plan_process(bare, command=())


def test_env_workdir_and_user_from_the_image_and_the_command_line() -> None:
    config = container(
        env=("PATH=/opt/bin:/bin", "A=image", "B=image"), working_dir="/srv", user="app"
    )
    plan = plan_process(
        config, command=("x",), env_items=["B=cli", "C"], caller_env={"C": "caller", "D": "no"}
    )
    assert plan.env == {"PATH": "/opt/bin:/bin", "A": "image", "B": "cli", "C": "caller"}
    assert (plan.cwd, plan.user) == ("/srv", "app")
    plan = plan_process(config, command=("x",), workdir="/tmp", user="0:0")
    assert (plan.cwd, plan.user) == ("/tmp", "0:0")
    bare = plan_process(container(), command=("x",))
    assert bare.env == {"PATH": DEFAULT_PATH}
    assert (bare.cwd, bare.user) == ("/", None)


# --- build: options and the progress display -------------------------------------------------


def test_build_options_parse() -> None:
    args = parse(
        "build",
        "-t",
        "a:1",
        "-t",
        "b",
        "-f",
        "x/Dockerfile",
        "--build-arg",
        "A=1",
        "--build-arg",
        "HOME",
        "--target",
        "test",
        "--no-cache-filter",
        "base,deps",
        "--no-cache-filter",
        "app",
        "--network",
        "none",
        "--progress",
        "plain",
        "ctx",
    )
    assert (args.tags, args.file, args.target, args.context) == (
        ["a:1", "b"],
        "x/Dockerfile",
        "test",
        "ctx",
    )
    assert (args.network, args.progress, args.no_cache, args.quiet) == (
        "none",
        "plain",
        False,
        False,
    )
    assert args.no_cache_filter == ["base,deps", "app"]
    defaults = parse("build", ".")
    assert (defaults.network, defaults.progress, defaults.tags) == ("host", "auto", [])


def test_build_rejects_unknown_network_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'bridge'" in usage_error(capsys, "build", "--network", "bridge", ".")
    assert "invalid choice: 'fancy'" in usage_error(capsys, "build", "--progress", "fancy", ".")
    assert "CONTEXT" in usage_error(capsys, "build")


def test_build_args_from_the_command_line_and_the_environment() -> None:
    environ = {"HOME": "/root"}
    assert parse_build_args(["A=1", "B=", "HOME", "UNSET", "C=x=y"], environ) == {
        "A": "1",
        "B": "",
        "HOME": "/root",
        "C": "x=y",
    }
    with pytest.raises(SpecError, match="--build-arg '=1'"):
        parse_build_args(["=1"], environ)


def test_secret_option(tmp_path: Path) -> None:
    assert parse_secret("id=tok,src=/run/tok.txt") == ("tok", Path("/run/tok.txt"))
    assert parse_secret("source=/x/npmrc") == ("npmrc", Path("/x/npmrc"))
    for bad in ("id=tok", "id=tok,src=", "id=a,src=/x,color=red", "type=env,id=a,src=/x"):
        with pytest.raises(SpecError, match="--secret"):
            parse_secret(bad)


def test_build_options_check_the_context_and_tags_before_building(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret")
    args = parse(
        "build", "-t", "app:1", "--secret", f"id=tok,src={tmp_path / 'token'}", str(tmp_path)
    )
    opts = build_options(args, {}, None)
    assert (opts.context, opts.tags, dict(opts.secrets)) == (
        tmp_path,
        ("app:1",),
        {"tok": tmp_path / "token"},
    )
    with pytest.raises(SpecError, match="is not a directory"):
        build_options(parse("build", str(tmp_path / "nope")), {}, None)
    with pytest.raises(SpecError, match="invalid image reference 'App'"):
        build_options(parse("build", "-t", "App", str(tmp_path)), {}, None)
    with pytest.raises(SpecError, match="is not a file"):
        build_options(parse("build", "--secret", "id=a,src=/nonexistent", str(tmp_path)), {}, None)


def event(
    kind: str, step: int, text: str = "", seconds: float = 0.0, stage: str = "stage-0"
) -> BuildEvent:
    return BuildEvent(kind, stage, step, 3, f"RUN step{step}", step, text, seconds)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_is_buildkits_plain_format() -> None:
    out, clock = io.StringIO(), FakeClock()
    show = PlainProgress(out, clock=clock)
    show(event("step", 1, stage="builder"))
    clock.now += 0.25
    show(event("output", 1, "compiling"))
    show(event("done", 1, seconds=1.26))
    show(event("step", 2))
    show(event("cached", 2))
    show(BuildEvent("warning", "", 0, 3, "", 0, "build arg 'X' was given but no ARG uses it"))
    assert out.getvalue().splitlines() == [
        "#1 [builder 1/3] RUN step1",
        "#1 0.250 compiling",
        "#1 DONE 1.3s",
        "#2 [2/3] RUN step2",
        "#2 CACHED",
        "WARNING: build arg 'X' was given but no ARG uses it",
    ]


def test_tty_progress_rewrites_one_line_per_step() -> None:
    out, clock = io.StringIO(), FakeClock()
    show = TtyProgress(out, clock=clock, width=lambda: 40, tick=None)
    show(event("step", 1))
    clock.now += 2.0
    show(event("output", 1, "a very long line of compiler output that will not fit"))
    show(event("done", 1, seconds=2.04))
    show(event("step", 2))
    show(event("cached", 2))
    show(event("step", 3))
    clock.now += 0.5
    show.close(failed=True)
    screen = out.getvalue()
    # what stays on the screen: the last paint of each line
    final = [part.rpartition("\r\x1b[K")[2] for part in screen.split("\n")]
    assert final == [
        " => [1/3] RUN step1                 2.0s",
        " => CACHED [2/3] RUN step2          0.0s",
        " => ERROR [3/3] RUN step3           0.5s",
        "",
    ]
    running = screen.split("\n")[0].split("\r\x1b[K")[2]
    assert running == " => [1/3] RUN step1  | a very long… 2.0s"
    assert all(len(line) == 40 for line in final[:3])


def test_tty_progress_ticks_while_a_step_runs() -> None:
    out = io.StringIO()
    show = TtyProgress(out, width=lambda: 60, tick=0.01)
    show(event("step", 1))
    deadline = time.monotonic() + 2
    while out.getvalue().count("\r") < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    show(event("done", 1, seconds=0.1))
    show.close()
    assert out.getvalue().count("\r") >= 5
    assert out.getvalue().endswith("0.1s\n")


def test_auto_progress_is_plain_off_a_terminal() -> None:
    assert isinstance(make_progress("auto", io.StringIO(), {}), PlainProgress)
    assert isinstance(make_progress("plain", io.StringIO(), {}), PlainProgress)
    tty = make_progress("tty", io.StringIO(), {})
    assert isinstance(tty, TtyProgress)
    tty.close()
