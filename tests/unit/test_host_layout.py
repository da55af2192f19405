"""The split host layout under image layers: the store is never a lower of the host, and layer
whiteouts, opaque and replaced directories decide what of the host shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime import rootfs
from runtime.rootfs import SkeletonEntry, StatePaths, plan_overlays

TOP = (
    ("etc", "dir", None),
    ("tmp", "dir", None),
    ("bin", "link", "usr/bin"),
    ("proc", "dir", None),
)


def lister(hidden: Path):
    """A host whose only deep path is ``hidden``: each ancestor holds it, a file and a sibling."""
    parts = hidden.parts

    def list_dir(path: str):
        depth = len(Path(path).parts)
        entries = [("notes.txt", "file", None), ("sibling", "dir", None)]
        if depth < len(parts):
            entries.append((parts[depth], "dir", None))
        return entries

    return list_dir


@pytest.fixture
def layers(tmp_path: Path) -> tuple[str, str]:
    top, base = tmp_path / "store" / "top", tmp_path / "store" / "base"
    (top / "etc").mkdir(parents=True)
    (base / "etc").mkdir(parents=True)
    return str(top), str(base)


def plan(lowers: tuple[str, ...], tmp_path: Path, split: bool = False) -> rootfs.Layout:
    state = StatePaths(str(tmp_path / "state"))
    hidden = Path(os.path.commonpath(lowers))
    top = (*TOP, (hidden.parts[1], "dir", None)) if hidden.parts[1] not in ("etc", "tmp") else TOP
    return plan_overlays(lowers, True, [], top, split, state, list_dir=lister(hidden))


def test_the_directories_holding_the_store_are_split_and_the_store_is_not_shown(
    layers: tuple[str, str], tmp_path: Path
) -> None:
    layout = plan(layers, tmp_path)
    store = str(tmp_path / "store")
    targets = [ov.target for ov in layout.overlays]
    assert store not in targets and not any(t.startswith(store + "/") for t in targets)
    for ancestor in Path(store).parents:
        if str(ancestor) != "/":
            assert str(ancestor) not in targets  # split, not a lower
            assert SkeletonEntry(str(ancestor), "dir") in layout.skeleton
            assert SkeletonEntry(f"{ancestor}/notes.txt", "file") in layout.skeleton
            assert f"{ancestor}/sibling" in targets  # what lies beside the store still shows
    assert SkeletonEntry("/bin", "link", "usr/bin") in layout.skeleton
    assert "/proc" not in targets


def test_a_layer_directory_stacks_over_the_hosts_in_one_overlay(
    layers: tuple[str, str], tmp_path: Path
) -> None:
    by = {ov.target: ov for ov in plan(layers, tmp_path).overlays}
    assert by["/etc"].lowers == (f"{layers[0]}/etc", f"{layers[1]}/etc", "/etc")


def test_a_whiteout_or_a_file_in_place_of_a_directory_ends_the_stack(
    layers: tuple[str, str], tmp_path: Path
) -> None:
    top, _base = layers
    os.rmdir(f"{top}/etc")
    Path(f"{top}/etc").write_text("now a file")  # the top layer replaced /etc
    by = {ov.target: ov for ov in plan(layers, tmp_path).overlays}
    assert "/etc" not in by  # the root overlay shows the file; the host's /etc is gone


def test_an_opaque_directory_hides_the_hosts_below_it(
    layers: tuple[str, str], tmp_path: Path
) -> None:
    top, _base = layers
    try:
        os.setxattr(f"{top}/etc", "user.overlay.opaque", b"y")
    except OSError as e:
        pytest.skip(f"no user xattrs here: {e}")
    by = {ov.target: ov for ov in plan(layers, tmp_path).overlays}
    assert by["/etc"].lowers == (f"{top}/etc",)


def test_the_plain_host_image_as_root_stays_one_overlay(tmp_path: Path) -> None:
    layout = plan_overlays((), True, ["/home"], TOP, False, StatePaths(str(tmp_path)))
    assert [(ov.target, ov.lowers) for ov in layout.overlays] == [
        ("/", ("/",)),
        ("/home", ("/home",)),
    ]
    assert layout.skeleton == []
