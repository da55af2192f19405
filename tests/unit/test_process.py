"""Who the container's process runs as, its environment and its capabilities (pure parts)."""

from __future__ import annotations

import pytest

from runtime.errors import SpecError
from runtime.process import (
    CAPS,
    DEFAULT_CAPS,
    DOCKER_DEFAULT_CAPS,
    User,
    cap_mask,
    container_env,
    resolve_user,
)

PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
broken:line
app:x:1000:1000:App:/home/app:/bin/sh
nohome:x:1001:1001:::/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""

GROUP = """\
root:x:0:
daemon:x:1:
app:x:1000:
nohome:x:1001:
docker:x:999:app,nohome
audio:x:29:app
staff:x:50:daemon
self:x:1000:app
bad:x
nogroup:x:65534:
"""


def test_no_user_means_root() -> None:
    assert resolve_user(None, PASSWD, GROUP) == User(0, 0, (), "/root", "root")


def test_by_name() -> None:
    assert resolve_user("app", PASSWD, GROUP) == User(1000, 1000, (29, 999), "/home/app", "app")


def test_by_uid_known_to_passwd() -> None:
    assert resolve_user("65534", PASSWD, GROUP) == User(65534, 65534, (), "/nonexistent", "nobody")


def test_an_unknown_numeric_uid_is_allowed_with_gid_0_and_home_slash() -> None:
    assert resolve_user("4321", PASSWD, GROUP) == User(4321, 0, (), "/", "4321")


def test_an_unknown_name_is_an_error_naming_it() -> None:
    with pytest.raises(SpecError, match=r"'ghost'.*/etc/passwd"):
        resolve_user("ghost", PASSWD, GROUP)


def test_name_colon_group_by_name_or_gid() -> None:
    assert resolve_user("app:docker", PASSWD, GROUP).gid == 999
    assert resolve_user("app:29", PASSWD, GROUP).gid == 29
    assert resolve_user("1000:4444", PASSWD, GROUP).gid == 4444  # unknown numeric gid: allowed


def test_an_explicit_group_drops_the_supplementary_groups() -> None:
    # Like runc: supplementary groups come from membership only when no group is given.
    assert resolve_user("app:docker", PASSWD, GROUP).groups == ()


def test_an_unknown_group_name_is_an_error_naming_it() -> None:
    with pytest.raises(SpecError, match=r"'ghosts'.*/etc/group"):
        resolve_user("app:ghosts", PASSWD, GROUP)


def test_supplementary_groups_are_sorted_and_exclude_the_primary_group() -> None:
    user = resolve_user("nohome", PASSWD, GROUP)
    assert user.groups == (999,)
    assert resolve_user("daemon", PASSWD, GROUP).groups == (50,)
    assert 1000 not in resolve_user("app", PASSWD, GROUP).groups  # "self" is its primary gid


def test_an_empty_home_is_slash() -> None:
    assert resolve_user("nohome", PASSWD, GROUP).home == "/"


def test_empty_passwd_still_resolves_numeric_ids() -> None:
    assert resolve_user("0:0", "", "") == User(0, 0, (), "/", "0")
    with pytest.raises(SpecError):
        resolve_user("root", "", "")


def test_container_env_adds_path_hostname_and_home() -> None:
    user = User(1000, 1000, (), "/home/app", "app")
    env = container_env({}, user, "box", tty=False)
    assert env == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOSTNAME": "box",
        "HOME": "/home/app",
    }


def test_container_env_lets_the_spec_override_and_sets_term_with_a_tty() -> None:
    user = User(0, 0, (), "/root", "root")
    env = container_env({"PATH": "/opt/bin", "HOME": "/work", "A": "1"}, user, "box", tty=True)
    assert env == {
        "PATH": "/opt/bin",
        "HOSTNAME": "box",
        "HOME": "/work",
        "A": "1",
        "TERM": "xterm",
    }
    assert container_env({"TERM": "dumb"}, user, "box", tty=True)["TERM"] == "dumb"


def test_capability_numbers_are_the_kernels() -> None:
    assert CAPS["CHOWN"] == 0
    assert CAPS["SYS_ADMIN"] == 21
    assert CAPS["SETFCAP"] == 31
    assert CAPS["CHECKPOINT_RESTORE"] == 40
    assert sorted(CAPS.values()) == list(range(len(CAPS)))


def test_the_default_set_is_dockers_without_mknod() -> None:
    # What `docker run` shows as CapBnd in /proc/self/status; MKNOD is bit 27.
    assert cap_mask(DOCKER_DEFAULT_CAPS) == 0xA80425FB
    assert cap_mask(DEFAULT_CAPS) == 0xA80425FB & ~(1 << CAPS["MKNOD"]) == 0xA00425FB
    assert not cap_mask(DEFAULT_CAPS) & (1 << CAPS["SYS_ADMIN"])


def test_cap_mask_accepts_prefix_and_any_case() -> None:
    assert cap_mask({"CAP_NET_ADMIN", "sys_time"}) == (1 << 12) | (1 << 25)
    assert cap_mask(set()) == 0


def test_an_unknown_capability_is_an_error_naming_it() -> None:
    with pytest.raises(SpecError, match="CAP_FLY"):
        cap_mask({"CAP_FLY"})


def test_capset_args_pack_the_low_words_then_the_high_words() -> None:
    import struct

    from runtime import _sys

    high = 1 << 40  # CAP_CHECKPOINT_RESTORE: in the second 32-bit word
    header, data = _sys.capset_args(high | 0b101, high | 0b1, 0b100)
    assert struct.unpack("=Ii", header.raw) == (0x20080522, 0)
    assert struct.unpack("=6I", data.raw) == (0b101, 0b1, 0b100, 1 << 8, 1 << 8, 0)
