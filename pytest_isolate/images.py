"""What a test's ``image=`` names, and building it once per session per content.

``image`` is ``"host"``, a Dockerfile (a file, or a directory holding ``Dockerfile``; relative
to the test file's directory), or a reference to an image in the store. A Dockerfile is built
with the layer cache the first time a test needs it; every later test of the session with the
same Dockerfile, context, build arguments and target reuses the result, and so does a failure:
each test that needs a broken image gets the build error, the session goes on.
"""

from __future__ import annotations

import functools
import os
import site
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import BuildError, ImageError, ImageNotFound, IsolateError
from runtime.spec import HOST

PATH_HINTS = ("/", "./", "../")


@dataclass(frozen=True)
class ImageRequest:
    """One image a test asks for, with everything that makes a build differ."""

    kind: str  # "host", "dockerfile" or "ref"
    name: str  # the Dockerfile path or the reference, as the user wrote it resolved
    context: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()
    target: str | None = None

    def __str__(self) -> str:
        return self.name


def request_for(
    image: str, base_dir: Path, build_args: Mapping[str, str], target: str | None
) -> ImageRequest:
    """Decide what ``image`` names. A path-like name that does not exist is an error."""
    if image == HOST:
        return ImageRequest("host", HOST)
    path = (base_dir / image).resolve()
    args = tuple(sorted(build_args.items()))
    if path.is_file():
        return ImageRequest("dockerfile", str(path), str(path.parent), args, target)
    if path.is_dir():
        if not (path / "Dockerfile").is_file():
            raise ImageError(f"image {image!r}: the directory {path} holds no Dockerfile")
        return ImageRequest("dockerfile", str(path / "Dockerfile"), str(path), args, target)
    if image.startswith(PATH_HINTS) or image.endswith("Dockerfile"):
        raise ImageError(f"image {image!r}: no such Dockerfile ({path})")
    return ImageRequest("ref", image)


@functools.cache
def python_paths(rootdir: Path) -> tuple[str, ...]:
    """Host directories a test needs inside an image: the project, Python and its packages.

    Computed once per directory: it is on every image test's path, and the import path of a
    session does not change in ways that matter here.
    """
    candidates = [str(rootdir), os.getcwd(), sys.prefix, sys.base_prefix, sys.exec_prefix]
    candidates += [p for p in site.getsitepackages() if os.path.isdir(p)]
    candidates += [p for p in sys.path if p and os.path.isdir(p)]
    return tuple(sorted({os.path.realpath(p) for p in candidates if p != "/"}))


class SessionImages:
    """Images built or resolved during one pytest session (one per xdist worker)."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report
        self._done: dict[ImageRequest, Any] = {}

    def resolve(self, request: ImageRequest) -> Any:
        """The runnable image (``runtime.image.images.RunnableImage``); raises the build error."""
        if request not in self._done:
            try:
                self._done[request] = self._make(request)
            except (IsolateError, OSError) as e:
                self._done[request] = e
        result = self._done[request]
        if isinstance(result, BaseException):
            raise result
        return result

    def _make(self, request: ImageRequest) -> Any:
        from runtime.image.images import resolve_image
        from runtime.image.store import Store

        store = Store.open()
        if request.kind == "ref":
            try:
                return resolve_image(store, request.name)
            except ImageNotFound as e:
                raise ImageNotFound(
                    f"image {request.name!r} is not in the store ({store.root}); build it with "
                    f"'pytest-isolate build -t {request.name} DIR', or import it with "
                    f"'pytest-isolate import ROOTFS.tar {request.name}'"
                ) from e
        from runtime.build.builder import BuildOptions, build

        self._report(f"pytest-isolate: building {request.name}")

        def progress(event: Any) -> None:
            if event.kind in ("cached", "done"):
                state = "CACHED" if event.kind == "cached" else f"{event.seconds:.1f}s"
                self._report(f"  [{event.step}/{event.total}] {event.instruction}  {state}")
            elif event.kind == "warning":
                self._report(f"  warning: {event.text}")

        try:
            result = build(
                BuildOptions(
                    context=Path(request.context or "."),
                    dockerfile=Path(request.name),
                    build_args=dict(request.build_args),
                    target=request.target,
                    progress=progress,
                ),
                store=store,
            )
        except BuildError as e:
            raise BuildError(f"building {request.name} failed: {e}") from e
        return resolve_image(store, result.image_id)
