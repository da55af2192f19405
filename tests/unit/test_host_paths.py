"""Host paths on top of an image: planned as copy-on-write overlays at the same paths."""

import pytest

from runtime import rootfs
from runtime.errors import SpecError
from runtime.spec import Rootfs


def test_outermost_drops_paths_inside_others() -> None:
    assert rootfs.outermost(["/work/p/.venv", "/work/p", "/opt/py/", "/opt/python"]) == [
        "/opt/py",
        "/opt/python",
        "/work/p",
    ]


def test_image_with_host_paths_gets_one_overlay_per_outermost_path() -> None:
    state = rootfs.StatePaths("/s")
    overlays = rootfs.plan_overlays(
        ["/layers/b", "/layers/a"], False, [], [], False, state, host_paths=["/src/.venv", "/src"]
    ).overlays
    assert [(o.target, o.lowers) for o in overlays] == [
        ("/", ("/layers/b", "/layers/a")),
        ("/src", ("/src",)),
    ]
    assert overlays[1].upper == "/s/upper/1"


def test_host_paths_need_an_image_and_absolute_paths() -> None:
    with pytest.raises(SpecError, match="for images"):
        Rootfs(host=True, host_paths=("/src",))
    with pytest.raises(SpecError, match="absolute"):
        Rootfs(lowers=("/l",), host_paths=("src",))
