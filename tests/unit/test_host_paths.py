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
    )
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


def test_layers_on_the_host_are_stacked_in_a_read_only_view_first() -> None:
    from runtime._sys import MS_RDONLY
    from runtime.spec import ContainerSpec

    state = rootfs.StatePaths("/s")
    spec = ContainerSpec(Rootfs(lowers=("/store/l2", "/store/l1"), host=True))
    overlays = rootfs.plan_overlays(spec.rootfs.lowers, True, [], [], False, state)
    ops = rootfs.plan_mounts(spec, overlays, state, rootless=False)
    mounts = [op for op in ops if isinstance(op, rootfs.Mount) and op.fstype == "overlay"]
    assert mounts[0] == rootfs.Mount(
        "overlay", "/s/layers", "overlay", MS_RDONLY, "lowerdir=/store/l2:/store/l1:/s/empty"
    )
    assert mounts[1].target == "/s/rootfs"
    assert mounts[1].data is not None and mounts[1].data.startswith("lowerdir=/s/layers:/,")
