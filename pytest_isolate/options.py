"""Marker, ini and command-line options -> what a test's container is (pure; UsageError on bad input).

Options merge from the ini defaults, then the module's ``pytestmark``, the class's and the
function's own ``container`` marker, the closest winning per option, as docker-like keywords.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from runtime.errors import SpecError
from runtime.spec import HOST, BindMount, TmpfsMount, parse_tmpfs, parse_volume

MARKER = "container"
LEGACY_MARKER = "isolate"
"""The marker of the older pytest-isolate plugin (``timeout``, ``mem_limit``, ``cpu_limit``)."""

KNOWN = frozenset(
    [
        "image",
        "build_args",
        "target",
        "env",
        "workdir",
        "user",
        "hostname",
        "volumes",
        "tmpfs",
        "read_only",
        "network",
        "timeout",
        "mem_limit",
        "cpu_limit",
    ]
)
LIMITS = ("mem_limit", "cpu_limit")


@dataclass(frozen=True)
class TestContainer:
    """The container a test asks for, after merging and checking every source of options."""

    image: str = HOST
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    hostname: str = "isolate"
    volumes: tuple[BindMount, ...] = ()
    tmpfs: tuple[TmpfsMount, ...] = ()
    read_only: bool = False
    network: str = "none"
    timeout: float | None = None
    mem_limit: str | None = None
    cpu_limit: float | None = None


def wanted(markers: Iterable[pytest.Mark], isolate_all: bool) -> bool:
    """Does a test run in a container? The closest ``container`` marker decides, then ``--isolate``."""
    closest = next(iter(markers), None)
    if closest is None:
        return isolate_all
    return not (closest.args and closest.args[0] is False)


def merge(
    nodeid: str,
    defaults: Mapping[str, Any],
    markers_closest_first: Iterable[pytest.Mark],
    legacy_closest_first: Iterable[pytest.Mark] = (),
) -> TestContainer:
    """Merge option sources (farthest first, so the closest wins) and validate them."""
    merged: dict[str, Any] = {k: v for k, v in defaults.items() if v is not None}
    for mark in reversed(list(legacy_closest_first)):
        merged.update(_checked(nodeid, LEGACY_MARKER, mark.kwargs, {"timeout", *LIMITS}))
    for mark in reversed(list(markers_closest_first)):
        if mark.args and mark.args[0] is not False:
            if len(mark.args) > 1 or not isinstance(mark.args[0], str):
                raise pytest.UsageError(
                    f"{nodeid}: @pytest.mark.container takes False, or an image as its only "
                    f"positional argument, not {mark.args!r}"
                )
            merged["image"] = mark.args[0]
        merged.update(_checked(nodeid, MARKER, mark.kwargs, KNOWN))
    try:
        return _build(merged)
    except (SpecError, TypeError, ValueError) as e:
        raise pytest.UsageError(f"{nodeid}: invalid container option: {e}") from None


def _checked(
    nodeid: str, marker: str, kwargs: Mapping[str, Any], known: Iterable[str]
) -> dict[str, Any]:
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise pytest.UsageError(
            f"{nodeid}: unknown option(s) {', '.join(unknown)} in @pytest.mark.{marker} "
            f"(known: {', '.join(sorted(known))})"
        )
    return dict(kwargs)


def _build(o: Mapping[str, Any]) -> TestContainer:
    env = o.get("env") or {}
    if not isinstance(env, Mapping):
        raise SpecError(f"env must be a dict, not {type(env).__name__}")
    volumes = tuple(_volume(v) for v in o.get("volumes") or ())
    tmpfs = tuple(parse_tmpfs(t) if isinstance(t, str) else t for t in o.get("tmpfs") or ())
    timeout = o.get("timeout")
    if timeout is not None:
        timeout = float(timeout)
        if timeout <= 0:
            raise SpecError(f"timeout must be positive, not {timeout}")
    image = o.get("image", HOST)
    if not isinstance(image, str) or not image:
        raise SpecError(f"image must be a non-empty string, not {image!r}")
    network = o.get("network", "none")
    if network != "none":
        raise SpecError(f"network={network!r} is not supported yet (only 'none')")
    return TestContainer(
        image=image,
        build_args={str(k): str(v) for k, v in (o.get("build_args") or {}).items()},
        target=o.get("target"),
        env={str(k): str(v) for k, v in env.items()},
        workdir=o.get("workdir"),
        user=None if o.get("user") is None else str(o["user"]),
        hostname=str(o.get("hostname", "isolate")),
        volumes=volumes,
        tmpfs=tmpfs,
        read_only=bool(o.get("read_only", False)),
        network=network,
        timeout=timeout,
        mem_limit=o.get("mem_limit"),
        cpu_limit=o.get("cpu_limit"),
    )


def _volume(v: Any) -> BindMount:
    if isinstance(v, BindMount):
        return v
    if isinstance(v, str):
        return parse_volume(v)
    if isinstance(v, tuple | list) and len(v) in (2, 3):
        src, dst = os.path.abspath(str(v[0])), str(v[1])
        return BindMount(src, dst, readonly=len(v) == 3 and v[2] == "ro")
    raise SpecError(f"invalid volume {v!r}: expected 'SRC:DST[:ro]'")
