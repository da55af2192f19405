"""User namespace id maps: the pure plan, and writing it to a ``/proc``-like directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from runtime.errors import IdMapError, SetupError
from runtime.idmap import (
    SUBORDINATE_IDS,
    IdMapPlan,
    IdRange,
    apply_idmap,
    map_text,
    parse_subid,
    plan_idmap,
)

SUBUID = """\
# user:start:count
alice:100000:65536
1001:300000:1000
malformed line
bob:x:5
bob:200000:65536
bob:400000:65536
"""


def test_parse_subid_matches_by_name_or_uid_and_skips_junk() -> None:
    assert parse_subid(SUBUID, "alice", 1000) == [(100000, 65536)]
    assert parse_subid(SUBUID, "carol", 1001) == [(300000, 1000)]  # by uid
    assert parse_subid(SUBUID, "bob", 1002) == [(200000, 65536), (400000, 65536)]
    assert parse_subid(SUBUID, "dave", 1003) == []
    assert parse_subid("", "alice", 1000) == []


def test_root_without_subordinate_ids_maps_the_first_ids_onto_themselves() -> None:
    plan = plan_idmap(0, 0, "root", SUBUID, SUBUID, helpers_available=True)
    assert plan.uids == plan.gids == (IdRange(0, 0, SUBORDINATE_IDS),)
    assert not plan.use_helpers  # root writes its maps itself
    assert plan.multi_id


def test_root_with_subordinate_ids_maps_onto_its_range() -> None:
    text = "root:1000000:65536\n"
    plan = plan_idmap(0, 0, "root", text, text, helpers_available=False)
    assert plan.uids == plan.gids == (IdRange(0, 1000000, 65536),)
    assert not plan.use_helpers


def test_root_range_is_capped_to_one_container_worth_of_ids() -> None:
    text = "root:1000000:1000000\n"
    plan = plan_idmap(0, 0, "root", text, text, helpers_available=False)
    assert plan.uids == (IdRange(0, 1000000, SUBORDINATE_IDS),)


def test_a_user_with_ranges_and_helpers_gets_itself_as_root_plus_the_range() -> None:
    plan = plan_idmap(1000, 1000, "alice", SUBUID, SUBUID, helpers_available=True)
    assert plan.uids == (IdRange(0, 1000, 1), IdRange(1, 100000, 65535))
    assert plan.gids == (IdRange(0, 1000, 1), IdRange(1, 100000, 65535))
    assert plan.use_helpers and plan.multi_id
    # Inside ids 0..65535, without overlap: one whole 16-bit range.
    assert sum(r.size for r in plan.uids) == SUBORDINATE_IDS


def test_a_small_range_is_used_as_is() -> None:
    plan = plan_idmap(1001, 1001, "carol", SUBUID, SUBUID, helpers_available=True)
    assert plan.uids == (IdRange(0, 1001, 1), IdRange(1, 300000, 1000))


def test_uid_and_gid_ranges_come_from_their_own_files() -> None:
    plan = plan_idmap(
        1000, 50, "alice", "alice:100000:65536\n", "alice:700000:65536\n", helpers_available=True
    )
    assert plan.uids[1].outside == 100000
    assert plan.gids == (IdRange(0, 50, 1), IdRange(1, 700000, 65535))


def test_without_helpers_a_user_maps_only_itself() -> None:
    plan = plan_idmap(1000, 1000, "alice", SUBUID, SUBUID, helpers_available=False)
    assert plan == IdMapPlan((IdRange(0, 1000, 1),), (IdRange(0, 1000, 1),), use_helpers=False)
    assert not plan.multi_id


def test_without_ranges_a_user_maps_only_itself() -> None:
    plan = plan_idmap(1003, 1003, "dave", SUBUID, SUBUID, helpers_available=True)
    assert plan.uids == (IdRange(0, 1003, 1),) and not plan.use_helpers


def test_a_range_in_only_one_file_is_not_enough() -> None:
    plan = plan_idmap(1000, 1000, "alice", SUBUID, "", helpers_available=True)
    assert not plan.multi_id and not plan.use_helpers


def test_map_text_is_one_line_per_range() -> None:
    assert map_text([IdRange(0, 1000, 1), IdRange(1, 100000, 65535)]) == (
        "0 1000 1\n1 100000 65535\n"
    )


def _fake_proc(tmp_path: Path, pid: int) -> Path:
    d = tmp_path / str(pid)
    d.mkdir()
    for name in ("uid_map", "gid_map", "setgroups"):
        (d / name).write_text("")
    return d


def test_apply_writes_the_maps_into_proc(tmp_path: Path) -> None:
    d = _fake_proc(tmp_path, 4242)
    plan = IdMapPlan((IdRange(0, 1000, 1),), (IdRange(0, 1001, 1),), use_helpers=False)
    apply_idmap(4242, plan, proc=str(tmp_path))
    assert (d / "uid_map").read_text() == "0 1000 1\n"
    assert (d / "gid_map").read_text() == "0 1001 1\n"
    # Unprivileged, setgroups must be denied before gid_map can be written; root keeps it.
    expected = "" if os.getuid() == 0 else "deny"
    assert (d / "setgroups").read_text() == expected


def test_apply_names_the_map_it_could_not_write(tmp_path: Path) -> None:
    plan = IdMapPlan((IdRange(0, 0, 1),), (IdRange(0, 0, 1),), use_helpers=False)
    with pytest.raises(IdMapError) as info:
        apply_idmap(999, plan, proc=str(tmp_path))
    assert isinstance(info.value, SetupError)
    assert info.value.errno == 2
    assert str(tmp_path / "999") in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.skipif(shutil.which("newuidmap") is None, reason="newuidmap is not installed")
def test_a_failing_helper_is_reported_with_its_command_line() -> None:
    plan = IdMapPlan(
        (IdRange(0, 1000, 1), IdRange(1, 100000, 10)), (IdRange(0, 1000, 1),), use_helpers=True
    )
    # No such process: the real helper refuses, and says why.
    pid = 2**22 + 12345
    with pytest.raises(IdMapError) as info:
        apply_idmap(pid, plan)
    assert info.value.stage == "newuidmap"
    assert f"newuidmap {pid} 0 1000 1 1 100000 10" in str(info.value)
