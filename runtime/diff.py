"""What a container changed: ``docker diff`` from its overlay upper directories.

Each overlay's upper directory holds exactly what the container wrote on that mount: new and
modified entries, and whiteouts for deletions. An entry is ``A`` (added) when no lower layer
has it, ``C`` (changed) when one does, ``D`` (deleted) for a whiteout.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from runtime.image.layer import overlay_kind, overlay_xattr


@dataclass(frozen=True, order=True)
class Change:
    path: str
    kind: str  # "A", "C" or "D"

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def _xattrs(path: str) -> dict[str, bytes]:
    out = {}
    try:
        for name in os.listxattr(path, follow_symlinks=False):
            if ".overlay." in name:
                out[name] = os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        pass
    return out


def upper_changes(upper: str, target: str, lowers: Sequence[str], rootless: bool) -> list[Change]:
    """The changes recorded in one overlay ``upper`` mounted at ``target`` over ``lowers``."""
    prefix = overlay_xattr("", rootless=rootless)
    out = []
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, upper)
            st = os.lstat(full)
            kind = overlay_kind(st.st_mode, st.st_rdev, st.st_size, _xattrs(full), prefix, rel)
            path = "/" + rel if target == "/" else f"{target}/{rel}"
            if kind == "whiteout":
                out.append(Change(path, "D"))
            elif any(os.path.lexists(os.path.join(low, rel)) for low in lowers):
                out.append(Change(path, "C"))
            else:
                out.append(Change(path, "A"))
    return out


def merge(changes: Iterable[Iterable[Change]]) -> list[Change]:
    return sorted({c for group in changes for c in group})
