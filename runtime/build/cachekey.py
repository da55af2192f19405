"""Build cache keys (pure): a step's result is reused only when everything that decides it is equal.

A key is the sha256 of canonical JSON holding the *parent key* and the *step as evaluated*:

* the parent key chains the steps: the base (``scratch``; ``host`` with a fingerprint of the host's
  packages; an image by id; another stage by its own key), then every layer step before this one.
  A change anywhere invalidates that step and every later one, as BuildKit documents;
* a RUN step holds its argv (the SHELL already applied), the full environment it runs with
  (ENV and the ARGs in scope: any ARG change misses every later RUN, as in docker), the working
  directory, the user, the network mode and its mounts (with the checksum of a bind source);
* a COPY/ADD step holds the destination (absolute), ``--chown``/``--chmod``, the flags that change
  the result, the values of the variables its expansion used, and a checksum of the sources:
  content, mode, type, link target and xattrs of every file (not mtimes, not host owners), with
  ``.dockerignore`` applied -- or, for ``--from``, the source state's key and the paths.

Metadata instructions (ENV, LABEL, CMD, ...) have no key: they change only the image config, and
a RUN sees their effect through its own fields. Keys are versioned (:data:`KEY_FORMAT`) so a
change of what goes into them never reuses an old entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from runtime.image.config import canonical_json

__all__ = [
    "KEY_FORMAT",
    "BaseKind",
    "Step",
    "base_key",
    "copy_step",
    "run_step",
    "step_key",
    "store_key",
]

KEY_FORMAT = 1
"""Bumped whenever the meaning of a key changes, so old cache entries are never reused."""

BaseKind = Literal["scratch", "host", "image", "stage"]


@dataclass(frozen=True)
class Step:
    """One layer-producing step as evaluated: ``op`` (RUN, COPY, ADD) and what decides its result."""

    op: str
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def base_key(kind: BaseKind, ident: str = "") -> str:
    """The key of a stage's starting point.

    ``ident`` is the image id (``image``), the host fingerprint (``host``) or the other stage's
    key (``stage``: then it *is* that key, so a stage built on another shares its cache).
    """
    if kind == "stage":
        if not ident:
            raise ValueError("a stage base needs the key of that stage")
        return ident
    if kind in ("image", "host") and not ident:
        raise ValueError(f"a {kind} base needs an identity")
    if kind == "scratch" and ident:
        raise ValueError("scratch has no identity")
    return _digest({"v": KEY_FORMAT, "base": kind, "id": ident})


def step_key(parent: str, step: Step) -> str:
    """The key of ``step`` on top of the state whose key is ``parent``."""
    if not parent:
        raise ValueError("a step needs its parent's key")
    return _digest({"v": KEY_FORMAT, "parent": parent, "op": step.op, "fields": step.fields})


def store_key(key: str) -> str:
    """The name the image store files a build key under (its key syntax, 1-200 characters)."""
    return f"build{KEY_FORMAT}-{key}"


def _pairs(items: Mapping[str, str | None]) -> list[list[str | None]]:
    return [[k, items[k]] for k in sorted(items)]


def run_step(
    *,
    argv: Sequence[str],
    env: Mapping[str, str],
    workdir: str,
    user: str,
    network: str,
    mounts: Iterable[Mapping[str, Any]] = (),
) -> Step:
    """A RUN: ``env`` is everything the command sees (order does not matter, values do)."""
    return Step(
        "RUN",
        MappingProxyType(
            {
                "argv": list(argv),
                "env": _pairs(env),
                "workdir": workdir,
                "user": user,
                "network": network,
                "mounts": [dict(m) for m in mounts],
            }
        ),
    )


def copy_step(
    *,
    op: Literal["COPY", "ADD"],
    dest: str,
    sources: str,
    chown: str | None = None,
    chmod: str | None = None,
    options: Mapping[str, Any] | None = None,
    used: Mapping[str, str | None] | None = None,
) -> Step:
    """A COPY or ADD: ``sources`` is the checksum of what is copied (see the module docstring).

    ``used`` holds the variables its expansion referred to (``None`` for an unset one);
    ``options`` the flags that change the result (``--exclude``, ``--parents``, ``--from``...).
    """
    return Step(
        op,
        MappingProxyType(
            {
                "dest": dest,
                "sources": sources,
                "chown": chown,
                "chmod": chmod,
                "options": dict(options or {}),
                "used": _pairs(used or {}),
            }
        ),
    )
