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
    state = StatePaths("/state")  # a container's state must lie outside the split host paths
    hidden = Path(os.path.commonpath(lowers))
    top = (*TOP, (hidden.parts[1], "dir", None)) if hidden.parts[1] not in ("etc", "tmp") else TOP
    return plan_overlays(lowers, True, [], top, split, state, list_dir=lister(hidden))


def test_a_directory_holding_the_store_is_one_overlay_with_the_store_whited_out(
    layers: tuple[str, str], tmp_path: Path
) -> None:
    layout = plan(layers, tmp_path)
    store = tmp_path / "store"
    top = "/" + store.parts[1]  # e.g. /tmp: no layer has anything there
    by = {ov.target: ov for ov in layout.overlays}
    (mask,) = layout.masks
    assert by[top].lowers == (mask.directory, top)
    assert mask.hidden == (os.path.relpath(store, top),)
    assert not any(t.startswith(str(store)) for t in by)
    assert SkeletonEntry("/bin", "link", "usr/bin") in layout.skeleton
    assert "/proc" not in by


def test_a_directory_holding_the_state_too_is_split(
    layers: tuple[str, str], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    top = "/" + store.parts[1]
    hidden = Path(os.path.commonpath(layers))
    layout = plan_overlays(
        layers,
        True,
        [],
        (*TOP, (store.parts[1], "dir", None)),
        False,
        StatePaths(f"{top}/state"),
        list_dir=lister(hidden),
    )
    assert top not in [ov.target for ov in layout.overlays]  # its mask would lie inside it


def test_a_directory_holding_the_store_that_a_layer_changes_is_split(
    layers: tuple[str, str], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    top_dir = "/" + store.parts[1]
    Path(layers[0] + top_dir).mkdir(parents=True)  # the image wrote into e.g. /tmp
    layout = plan(layers, tmp_path)
    targets = [ov.target for ov in layout.overlays]
    assert top_dir not in targets  # split, not a lower: the layers lie inside it
    assert layout.masks or any(t.startswith(top_dir + "/") for t in targets)
    assert not any(t == str(store) or t.startswith(f"{store}/") for t in targets)
    assert SkeletonEntry(f"{top_dir}/notes.txt", "file") in layout.skeleton
    assert f"{top_dir}/sibling" in targets
    split = [ov for ov in layout.overlays if ov.target == f"{top_dir}/sibling"]
    assert split[0].optional  # found by listing: may vanish before the mount


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


def test_data_mounts_under_a_view_of_the_host_stack_the_layers_own_directories(
    layers: tuple[str, str], tmp_path: Path
) -> None:
    top, base = layers
    Path(f"{base}/srv").mkdir()  # the image wrote into a data filesystem's directory
    Path(f"{top}/opt").write_text("a file now")  # and replaced another one
    layout = plan_overlays(
        layers,
        True,
        ["/opt", "/srv"],
        TOP,
        False,
        StatePaths("/state"),
        host_mount_points=["/", "/opt", "/srv", "/state"],
    )
    by = {ov.target: ov for ov in layout.overlays}
    assert by["/"].host_view == "/state/host" and layout.skeleton == []
    assert by["/srv"].lowers == (f"{base}/srv", "/srv")
    assert "/opt" not in by  # the root overlay shows the layer's file in its place
