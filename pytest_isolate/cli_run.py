"""What ``run IMAGE COMMAND`` runs: which root filesystem, and which process with which settings.

IMAGE is, in this order:

* ``host``: the host's own ``/`` (read-only, with a private copy-on-write layer);
* a path written as one (``/...``, ``./...``, ``../...``, ``.``): that directory as the only layer;
* an image of the store, by tag, id or digest (``busybox``, ``bb:1``, ``de32a2346b20``);
* failing that, an existing directory of that name (so ``run rootfs sh`` keeps working).

The process follows docker's rules (:meth:`RunnableImage.argv` and friends): ENTRYPOINT + CMD;
a COMMAND on the command line replaces CMD; ``--entrypoint X`` replaces ENTRYPOINT and drops
CMD (``--entrypoint ''`` clears it); the image's ``Env`` with ``-e`` on top (docker's ``PATH``
when neither sets one); ``-w``/``-u`` over ``WorkingDir``/``User``, else ``/`` and root.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from runtime.errors import ImageNotFound, SpecError
from runtime.image.config import ImageConfig
from runtime.image.images import PullPolicy, RunnableImage, host_config, resolve_image
from runtime.image.store import Store
from runtime.spec import HOST, Rootfs, parse_env

__all__ = ["PATH_PREFIXES", "ProcessPlan", "plan_process", "runnable"]

PATH_PREFIXES = ("/", "./", "../")


@dataclass(frozen=True)
class ProcessPlan:
    """What the container runs, and as whom, where, with which environment."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    user: str | None


def _directory(path: str) -> RunnableImage:
    return RunnableImage(path, None, ImageConfig.empty(), Rootfs(lowers=(os.path.abspath(path),)))


def runnable(
    image: str, open_store: Callable[[], Store], pull: PullPolicy = "missing"
) -> tuple[RunnableImage, Store | None]:
    """The image ``image`` names (see the module), and the store it came from (if any).

    A directory of that name wins over pulling an image of that name, never over an image the
    store already has."""
    if image == HOST:
        return RunnableImage(HOST, None, host_config(), Rootfs(host=True)), None
    if image.startswith(PATH_PREFIXES) or image in (".", ".."):
        if not os.path.isdir(image):
            raise SpecError(f"no such root filesystem directory: {image!r}")
        return _directory(image), None
    store = open_store()
    try:
        try:
            return resolve_image(store, image, policy="never"), store
        except ImageNotFound:
            if os.path.isdir(image):
                return _directory(image), None
        return resolve_image(store, image, policy=pull), store
    except SpecError as e:
        if os.path.isdir(image):
            return _directory(image), None
        raise SpecError(
            f"no such image or root filesystem directory: {image!r} ({e}); a directory is "
            "written as a path, e.g. ./rootfs"
        ) from e


def plan_process(
    image: RunnableImage,
    *,
    command: Sequence[str],
    entrypoint: str | None = None,
    env_items: Sequence[str] = (),
    caller_env: Mapping[str, str] | None = None,
    workdir: str | None = None,
    user: str | None = None,
) -> ProcessPlan:
    """Apply docker's rules (see the module) to ``image`` and the command line (pure).

    ``entrypoint`` is ``--entrypoint`` as typed (``None`` when absent, ``""`` to clear it);
    ``env_items`` are the ``-e`` items, ``caller_env`` where ``-e NAME`` copies from.
    """
    override = None if entrypoint is None else ((entrypoint,) if entrypoint else ())
    argv = image.argv(tuple(command), entrypoint=override)
    if argv is None:
        if image.image_id is None:
            raise SpecError("run needs a COMMAND after the IMAGE")
        raise SpecError(
            f"no command to run: image {image.ref!r} has no ENTRYPOINT or CMD; give a COMMAND "
            "after the IMAGE"
        )
    return ProcessPlan(
        argv=argv,
        env={**image.env, **parse_env(env_items, caller_env)},
        cwd=workdir or image.cwd,
        user=user or image.user,
    )
