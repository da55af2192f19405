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
from typing import TYPE_CHECKING, Any

from runtime.errors import BuildError, ImageError, IsolateError
from runtime.spec import HOST

if TYPE_CHECKING:  # the engine is imported only when a test needs an image
    from runtime.image.images import PullPolicy

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


@dataclass(frozen=True)
class RegistrySettings:
    """How a session talks to registries (``--isolate-pull``, ``--isolate-cache-from/-to``,
    ``--isolate-insecure-registry`` and their ini keys)."""

    pull: PullPolicy = "missing"
    cache_from: tuple[str, ...] = ()
    cache_to: str = ""
    insecure: tuple[str, ...] = ()


class SessionImages:
    """Images built or resolved during one pytest session (one per xdist worker)."""

    def __init__(
        self, report: Callable[[str], None], registry: RegistrySettings | None = None
    ) -> None:
        self._report = report
        self._registry = registry or RegistrySettings()
        self._done: dict[ImageRequest, Any] = {}
        self._requests: dict[tuple[object, ...], ImageRequest | ImageError] = {}

    def request(
        self, image: str, base_dir: Path, build_args: Mapping[str, str], target: str | None
    ) -> ImageRequest:
        """:func:`request_for`, decided once per session for each way of asking: every test
        of an image asks again, and resolving a path costs a system call per component."""
        key = (image, base_dir, tuple(sorted(build_args.items())), target)
        if key not in self._requests:
            try:
                self._requests[key] = request_for(image, base_dir, build_args, target)
            except ImageError as e:
                self._requests[key] = e
        found = self._requests[key]
        if isinstance(found, ImageError):
            raise found
        return found

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
            return resolve_image(store, request.name, policy=self._registry.pull, pull=self._pull)
        from runtime.build.builder import BuildOptions, build

        self._report(f"pytest-isolate: building {request.name}")

        def progress(event: Any) -> None:
            if event.kind in ("cached", "done"):
                state = "CACHED" if event.kind == "cached" else f"{event.seconds:.1f}s"
                self._report(f"  [{event.step}/{event.total}] {event.instruction}  {state}")
            elif event.kind == "warning":
                self._report(f"  warning: {event.text}")

        caches = self._cache_from(store)
        try:
            result = build(
                BuildOptions(
                    context=Path(request.context or "."),
                    dockerfile=Path(request.name),
                    build_args=dict(request.build_args),
                    target=request.target,
                    progress=progress,
                    pull=self._registry.pull,
                    puller=self._pull,
                    cache_from=caches,
                ),
                store=store,
            )
        except BuildError as e:
            raise BuildError(f"building {request.name} failed: {e}") from e
        finally:
            for cache in caches:
                cache.close()
        if self._registry.cache_to and not all(s.cached for s in result.steps):
            self._export_cache(store, result)
        return resolve_image(store, result.image_id)

    def _cache_from(self, store: Any) -> tuple[Any, ...]:
        from runtime.registry.cache import RegistryCache

        return tuple(
            RegistryCache(
                store,
                ref,
                insecure=self._registry.insecure,
                warn=lambda text: self._report(f"pytest-isolate: warning: {text}"),
            )
            for ref in self._registry.cache_from
        )

    def _export_cache(self, store: Any, result: Any) -> None:
        """Push the build cache of a build that made something (a fully cached build has
        nothing new; under xdist, only the worker that built pushes)."""
        from runtime.registry.cache import export_cache

        ref = self._registry.cache_to
        steps = [(s.cache_key, s.diff_id) for s in result.steps if s.cache_key and s.diff_id]
        try:
            digest = export_cache(store, steps, ref, insecure=self._registry.insecure)
        except IsolateError as e:  # the tests can still run: say so, do not fail them
            self._report(f"pytest-isolate: warning: cannot export the build cache to {ref}: {e}")
            return
        self._report(f"  exported the cache of {len(steps)} steps to {ref}@{digest}")

    def _pull(self, store: Any, ref: str) -> Any:
        from runtime.registry.transfer import pull

        self._report(f"pytest-isolate: pulling {ref}")
        result = pull(store, ref, insecure=self._registry.insecure)
        self._report(
            f"  {result.reference}: {result.digest} ({result.downloaded} of {result.layers} "
            "layers downloaded)"
        )
        return result
