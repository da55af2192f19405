"""The pytest-isolate container engine: namespaces, overlay layers, images, builds.

It never imports pytest. The public surface is small::

    from runtime import Engine, ContainerSpec, Rootfs
    Engine().run(ContainerSpec(Rootfs(host=True), argv=("echo", "hello world")))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtime.errors import IsolateError
from runtime.spec import HOST, BindMount, ContainerSpec, Rootfs, TmpfsMount

if TYPE_CHECKING:
    from runtime.engine import Container, Engine, ExecResult
    from runtime.launch import ExitStatus

_LAZY = {"Container": "engine", "Engine": "engine", "ExecResult": "engine", "ExitStatus": "launch"}
"""Imported on first use: the engine's modules are a third of a command's start-up, and
commands such as ``images`` or a fully cached ``build`` never start a container."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"runtime.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


__all__ = [
    "HOST",
    "BindMount",
    "Container",
    "ContainerSpec",
    "Engine",
    "ExecResult",
    "ExitStatus",
    "IsolateError",
    "Rootfs",
    "TmpfsMount",
]
