"""The pytest-isolate container engine: namespaces, overlay layers, images, builds.

It never imports pytest. The public surface is small::

    from runtime import Engine, ContainerSpec, Rootfs
    Engine().run(ContainerSpec(Rootfs(host=True), argv=("echo", "hello world")))
"""

from runtime.engine import Container, Engine, ExecResult
from runtime.errors import IsolateError
from runtime.launch import ExitStatus
from runtime.spec import HOST, BindMount, ContainerSpec, Rootfs, TmpfsMount

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
