"""Images as containers see them, and containers back into images.

* :func:`resolve_image`: an image reference (or ``host``) -> the :class:`~runtime.spec.Rootfs` to
  run it on and the config defaults (command, env, workdir, user) to run it with; the image is
  pulled first when the pull policy says so (:func:`ensure_image`, shared with ``FROM``);
* :class:`LayeredView`: read an image's files through its layer directories as the overlay will
  show them (whiteouts, opaque directories, symlinks resolved inside the image), without a mount
  -- so it works rootless and costs nothing to set up. COPY uses it to resolve its destination
  and ``--chown`` names, and ``COPY --from`` to read another stage;
* :func:`capture_layer`: a container's overlay upper directories -> one layer in the store.
  Rootless, files the container made as other users belong to subordinate ids the caller cannot
  read, so the uppers are packed by a child in a user namespace with the same id map;
* :func:`apply_metadata`: a metadata instruction (CMD, ENV, ...) -> the next image config, shared
  by the builder and ``commit --change``;
* :func:`commit`: a running or stopped container's changes become a new image on its own.

Images based on the host's root filesystem (``FROM host``) carry the label
``io.pytest-isolate.base=host``: running one puts its layers over the host's ``/`` again.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from runtime import idmap
from runtime.build import dockerfile as df
from runtime.build.expand import expand_instruction
from runtime.diff import Change
from runtime.errors import DockerfileSyntaxError, ImageError, ImageNotFound, LayerError, SpecError
from runtime.image import layer, safepath
from runtime.image.config import Healthcheck, ImageConfig
from runtime.image.reference import HOST, SCRATCH, parse
from runtime.image.store import PACKED_AGAIN, Store, chain_id
from runtime.rootfs import Overlay
from runtime.spec import DEFAULT_PATH, Rootfs

if TYPE_CHECKING:
    from runtime.engine import Container

__all__ = [
    "BASE_LABEL",
    "COMMIT_CHANGES",
    "DEFAULT_SHELL",
    "ENGINE_MOUNT_POINTS",
    "PULL_POLICIES",
    "Found",
    "LayeredView",
    "PullPolicy",
    "Puller",
    "RunnableImage",
    "apply_metadata",
    "capture_layer",
    "command_argv",
    "commit",
    "ensure_image",
    "history_text",
    "host_config",
    "is_host_based",
    "mount_stubs",
    "overlay_parts",
    "parse_change",
    "resolve_image",
    "wants_pull",
]

PullPolicy = Literal["never", "missing", "always"]
"""docker's ``--pull``: ``missing`` (the default) pulls only what the store lacks, so a CI run
never replaces an image it already has behind the tests' back; ``always`` asks the registry for
the tag's current image; ``never`` fails instead of pulling."""

PULL_POLICIES: tuple[PullPolicy, ...] = ("never", "missing", "always")

Puller = Callable[[Store, str], Any]
"""Pulls a reference into a store (default: :func:`runtime.registry.transfer.pull`)."""

BASE_LABEL = "io.pytest-isolate.base"
"""Label of images whose bottom layer is the host's ``/`` (value ``host``)."""

DEFAULT_SHELL = ("/bin/sh", "-c")

ENGINE_MOUNT_POINTS = ("proc", "sys", "dev", "etc/hostname", "etc/hosts", "etc/resolv.conf")
"""Paths the engine mounts over in every container; created in the upper when an image lacks
them. They belong to the container, not to the image (docker leaves them out too)."""

COMMIT_CHANGES = frozenset(
    {"CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "ONBUILD", "USER", "VOLUME", "WORKDIR"}
)
"""What ``commit --change`` accepts (docker's list) plus STOPSIGNAL and HEALTHCHECK."""


# --- base images -----------------------------------------------------------------------------


def host_config() -> ImageConfig:
    """The config of the ``host`` image: no layers, the default PATH, the host-base label."""
    return ImageConfig.empty().with_env({"PATH": DEFAULT_PATH}).with_labels({BASE_LABEL: HOST})


def is_host_based(config: ImageConfig) -> bool:
    labels = config.container.labels
    return labels is not None and labels.get(BASE_LABEL) == HOST


@dataclass(frozen=True)
class RunnableImage:
    """An image ready to run: its root filesystem and the defaults its config gives."""

    ref: str
    image_id: str | None
    """``None`` for the ``host`` image, which is not in the store."""
    config: ImageConfig
    rootfs: Rootfs

    def argv(
        self, args: Sequence[str] | None = None, entrypoint: Sequence[str] | None = None
    ) -> tuple[str, ...] | None:
        """The command, with docker's rules: ENTRYPOINT + (``args`` or CMD).

        An ``entrypoint`` override drops the image's CMD (as ``docker run --entrypoint``).
        ``None`` when there is nothing to run.
        """
        c = self.config.container
        ep = tuple(entrypoint) if entrypoint is not None else tuple(c.entrypoint or ())
        if args:
            cmd = tuple(args)
        elif entrypoint is not None:
            cmd = ()
        else:
            cmd = tuple(c.cmd or ())
        full = ep + cmd
        return full or None

    @property
    def env(self) -> dict[str, str]:
        """The image's environment, with docker's default PATH when it sets none."""
        env = self.config.container.env_map
        env.setdefault("PATH", DEFAULT_PATH)
        return env

    @property
    def cwd(self) -> str:
        return self.config.container.working_dir or "/"

    @property
    def user(self) -> str | None:
        return self.config.container.user or None


def wants_pull(policy: PullPolicy, ref: str, present: bool) -> bool:
    """Whether ``ref`` is to be pulled before use, by docker's rules.

    An image id (or a prefix of one) that the store has is never pulled, whatever the policy: it
    names content, not a registry image; neither is a present ``name@digest`` under ``always``
    (the same digest cannot bring anything new).
    """
    if policy not in PULL_POLICIES:
        raise SpecError(f"pull policy must be one of {', '.join(PULL_POLICIES)}, not {policy!r}")
    if policy == "never":
        return False
    if not present:
        return True
    if policy == "missing" or "@" in ref:
        return False
    try:
        parse(ref)
    except SpecError:
        return False
    return True


def ensure_image(
    store: Store, ref: str, *, policy: PullPolicy = "missing", pull: Puller | None = None
) -> str:
    """The id of the image ``ref`` names, pulled first when ``policy`` says so.

    :class:`~runtime.errors.ImageNotFound` says how to get an image the store lacks and the
    policy does not pull; a failed pull raises the registry's error with the same hint.
    """
    try:
        present: str | None = store.resolve(ref)
    except ImageNotFound:
        present = None
    if not wants_pull(policy, ref, present is not None):
        if present is None:
            raise ImageNotFound(
                f"image {ref!r} is not in the store {store.root}; to get it: "
                f"`pytest-isolate pull {ref}` (or pull policy `missing`), {_hint(ref)}"
            )
        return present
    try:
        (pull or _registry_pull)(store, ref)
    except ImageError as e:
        if present is not None:  # `always` and the registry failed: docker fails too
            raise
        raise type(e)(
            f"image {ref!r} is not in the store and pulling it failed: {e}; to get it "
            f"otherwise: {_hint(ref)}"
        ) from e
    return store.resolve(ref)


def _registry_pull(store: Store, ref: str) -> Any:
    # Imported here: the registry client is only loaded by a run that pulls.
    from runtime.registry.transfer import pull

    return pull(store, ref)


def _hint(ref: str) -> str:
    return (
        f"`pytest-isolate load` an archive, `pytest-isolate build -t {ref} CONTEXT`, or "
        f"`pytest-isolate import ROOTFS.tar {ref}` a root filesystem tarball (e.g. made by "
        "mmdebstrap)"
    )


def resolve_image(
    store: Store, ref: str, *, policy: PullPolicy = "missing", pull: Puller | None = None
) -> RunnableImage:
    """What running ``ref`` means: ``host``, or an image of the store by tag, id or digest,
    pulled first when ``policy`` says so (see :func:`ensure_image`)."""
    if ref == HOST:
        return RunnableImage(ref, None, host_config(), Rootfs(host=True))
    if ref == SCRATCH:
        raise ImageError("'scratch' is the empty image: there is nothing to run in it")
    image = store.get_image(ensure_image(store, ref, policy=policy, pull=pull))
    layers = store.image_layers(image.id)
    host = is_host_based(image.config)
    if not layers and not host:
        raise ImageError(f"image {ref!r} has no layers (FROM scratch with nothing added)")
    lowers = tuple(str(rec.path) for rec in reversed(layers))
    return RunnableImage(ref, image.id, image.config, Rootfs(lowers=lowers, host=host))


# --- reading through layers ------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """An entry as the merged image shows it: where it is on the host, and its stat."""

    path: str
    st: os.stat_result
    layer: int
    """Index in the view's layers (0 is the topmost)."""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


class LayeredView:
    """An image's merged filesystem, read from its layer directories (topmost first).

    The rules are overlayfs's: the topmost layer that has a name decides what it is; a whiteout
    hides the name in every layer below; a directory merges with the directories below it until
    one is opaque or a layer has a non-directory there. ``rootless`` says which xattrs mark
    whiteouts and opaque directories (``user.overlay.*`` or ``trusted.overlay.*``), as the store
    wrote them. Symlinks are resolved inside the image, never on the host.
    """

    def __init__(self, layers: Sequence[str | os.PathLike[str]], *, rootless: bool) -> None:
        self.layers = tuple(os.fspath(p) for p in layers)
        self._prefix = layer.overlay_xattr("", rootless=rootless)

    def _whiteout(self, path: str, st: os.stat_result) -> bool:
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return True
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            try:
                os.getxattr(path, self._prefix + "whiteout", follow_symlinks=False)
            except OSError:
                return False
            return True
        return False

    def _opaque(self, path: str) -> bool:
        try:
            return os.getxattr(path, self._prefix + "opaque", follow_symlinks=False) == b"y"
        except OSError:
            return False

    def _locate(self, rel: str) -> tuple[Found | None, list[int]]:
        """The entry at the clean path ``rel`` (no symlinks followed) and, for a directory, the
        layers whose directories merge into it."""
        merged = list(range(len(self.layers)))
        found: Found | None = None
        parts = [p for p in rel.split("/") if p]
        if not parts:
            root = Found(self.layers[0], os.lstat(self.layers[0]), 0) if self.layers else None
            return root, merged
        cur = ""
        for part in parts:
            if found is not None and not found.is_dir:
                return None, []
            cur = f"{cur}/{part}" if cur else part
            found, below = None, []
            for idx in merged:
                path = os.path.join(self.layers[idx], cur)
                st = _lstat(path)
                if st is None:
                    continue
                if self._whiteout(path, st):
                    break
                if found is None:
                    found = Found(path, st, idx)
                    if not stat.S_ISDIR(st.st_mode):
                        break
                elif not stat.S_ISDIR(st.st_mode):
                    break
                below.append(idx)
                if self._opaque(path):
                    break
            if found is None:
                return None, []
            merged = below
        return found, merged

    def _readlink(self, rel: str) -> str | None:
        found, _ = self._locate(rel)
        if found is None or not found.is_symlink:
            return None
        return os.readlink(found.path)

    def resolve(self, path: str, *, follow_last: bool = True) -> str:
        """``path`` with its symlinks resolved inside the image (clean, relative to ``/``)."""
        if follow_last:
            return safepath.resolve(path, self._readlink)
        head, _, name = path.rstrip("/").rpartition("/")
        base = safepath.resolve(head, self._readlink) if head else ""
        if name in ("", ".", ".."):
            return safepath.resolve(path, self._readlink)
        return f"{base}/{name}" if base else name

    def lookup(self, path: str, *, follow: bool = True) -> Found | None:
        """The entry at ``path`` as the container would see it, or ``None``."""
        try:
            rel = self.resolve(path, follow_last=follow)
        except OSError:
            return None
        return self._locate(rel)[0]

    def listdir(self, path: str) -> list[str]:
        """The names in the directory ``path`` (followed), sorted; ``[]`` if it is none."""
        try:
            rel = self.resolve(path)
        except OSError:
            return []
        found, merged = self._locate(rel)
        if found is None or not found.is_dir:
            return []
        seen: set[str] = set()
        visible: list[str] = []
        for idx in merged:
            base = os.path.join(self.layers[idx], rel) if rel else self.layers[idx]
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                if name in seen:
                    continue
                seen.add(name)
                full = os.path.join(base, name)
                st = _lstat(full)
                if st is not None and not self._whiteout(full, st):
                    visible.append(name)
        return sorted(visible)

    def walk(self, path: str) -> Iterator[tuple[str, Found]]:
        """``("", top)`` for ``path`` (followed), then everything below a directory, sorted,
        each directory before its contents, with paths relative to ``path``."""
        try:
            rel = self.resolve(path)
        except OSError:
            return
        top = self._locate(rel)[0]
        if top is None:
            return
        yield "", top
        if not top.is_dir:
            return
        stack = [(n, f"{rel}/{n}" if rel else n) for n in reversed(self.listdir(rel))]
        while stack:
            sub, full = stack.pop()
            found = self._locate(full)[0]
            if found is None:
                continue
            yield sub, found
            if found.is_dir:
                stack.extend((f"{sub}/{n}", f"{full}/{n}") for n in reversed(self.listdir(full)))

    def read_text(self, path: str) -> str:
        """A file's text (``""`` when missing): ``/etc/passwd`` for USER and ``--chown``."""
        found = self.lookup(path)
        if found is None or not stat.S_ISREG(found.st.st_mode):
            return ""
        try:
            with open(found.path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


# --- container changes -> a layer --------------------------------------------------------------


def _overlay_for(overlays: Sequence[Overlay], path: str) -> tuple[Overlay, str] | None:
    best: tuple[Overlay, str] | None = None
    best_len = -1
    for ov in overlays:
        target = ov.target.strip("/")
        inside = target == "" or path == target or path.startswith(target + "/")
        if inside and len(target) > best_len:
            rel = path[len(target) :].lstrip("/") if target else path
            best, best_len = (ov, rel), len(target)
    return best


def container_changes(container: Container) -> list[Change]:
    """``docker diff``: what ``container`` changed, without the mount points the engine made
    (``/proc``, ``/etc/hosts``...), which belong to the container, not to what it did -- the
    same entries :func:`commit` leaves out of the layer."""
    spec = container.spec
    targets = [b.target for b in spec.binds] + [t.target for t in spec.tmpfs]
    stubs = mount_stubs(container.overlays, targets, rootless=container.userns)
    return [ch for ch in container.diff() if ch.path.strip("/") not in stubs]


def mount_stubs(
    overlays: Sequence[Overlay], targets: Iterable[str] = (), *, rootless: bool
) -> frozenset[str]:
    """Paths (relative to ``/``) in the uppers that exist only as mount points the engine made.

    A candidate (:data:`ENGINE_MOUNT_POINTS` and the container's own mount ``targets``) is a
    stub when no lower layer has it and it is an empty file or an empty directory; a directory
    above stubs is one too when it holds nothing else and is new or unchanged (mode and owner)
    from the layers below. What a command really wrote stays.
    """
    candidates = {p.strip("/") for p in (*ENGINE_MOUNT_POINTS, *targets) if p.strip("/")}
    skip: set[str] = set()

    def below(ov: Overlay, rel: str) -> Found | None:
        return LayeredView(ov.lowers, rootless=rootless).lookup(rel, follow=False)

    def only_stubs(path: str, upper: str) -> bool:
        try:
            names = os.listdir(upper)
        except OSError:
            return False
        return all(f"{path}/{n}" in skip for n in names)

    for path in sorted(candidates, key=lambda p: p.count("/"), reverse=True):
        where = _overlay_for(overlays, path)
        if where is None:
            continue
        ov, rel = where
        if not rel:
            continue
        upper = os.path.join(ov.upper, rel)
        st = _lstat(upper)
        if st is None or below(ov, rel) is not None:
            continue
        empty_file = stat.S_ISREG(st.st_mode) and st.st_size == 0
        if empty_file or (stat.S_ISDIR(st.st_mode) and only_stubs(path, upper)):
            skip.add(path)
    parents = {a for p in skip for a in _ancestors(p)}
    for path in sorted(parents, key=lambda p: p.count("/"), reverse=True):
        where = _overlay_for(overlays, path)
        if where is None or not where[1]:
            continue
        ov, rel = where
        upper = os.path.join(ov.upper, rel)
        st = _lstat(upper)
        if st is None or not stat.S_ISDIR(st.st_mode) or not only_stubs(path, upper):
            continue
        old = below(ov, rel)
        if old is None or (
            old.is_dir
            and stat.S_IMODE(old.st.st_mode) == stat.S_IMODE(st.st_mode)
            and (old.st.st_uid, old.st.st_gid) == (st.st_uid, st.st_gid)
        ):
            skip.add(path)
    return frozenset(skip)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def overlay_parts(overlays: Sequence[Overlay]) -> list[layer.OverlayPart]:
    """The uppers of a container's overlays, each with the directory its mount point copies."""
    parts = []
    for ov in overlays:
        like = None
        if ov.target != "/":
            like = next((low for low in ov.lowers if os.path.isdir(low)), None)
        parts.append(layer.OverlayPart(ov.upper, ov.target, like))
    return parts


def capture_layer(
    parts: Sequence[layer.OverlayPart],
    dest: Path,
    *,
    rootless: bool,
    skip: Iterable[str] = (),
) -> str:
    """Fill the empty directory ``dest`` with the layer the uppers hold; return its diff id.

    The uppers are packed to a pipe (a thread; rootless with subordinate ids, a child in a user
    namespace with the container's id map, which can read what other users of the container
    wrote) and unpacked into ``dest`` by the safe unpacker, so the stored layer is clean: no
    overlay bookkeeping xattrs, whiteouts in the store's form. The diff id is that of
    :func:`runtime.image.layer.layer_digest` of ``dest``.
    """
    skipped = frozenset(skip)
    plan = idmap.host_plan() if rootless else None

    def pack(out: IO[bytes]) -> None:
        layer.pack_overlays(parts, out, rootless=rootless, skip=skipped)

    if plan is not None and plan.multi_id:
        stats = _unpack_from_userns(pack, plan, dest)
    else:
        stats = layer.through_pipe(
            pack, lambda reader: layer.unpack_layer(reader, dest, rootless=rootless), "pack-upper"
        )
    if rootless or len(parts) > 1:
        return layer.layer_digest(dest, rootless=rootless)[0]
    return stats.diff_id


def _unpack_from_userns(
    pack: Callable[[IO[bytes]], None], plan: idmap.IdMapPlan, dest: Path
) -> layer.LayerStats:
    """Pack in a child that is root of a user namespace with ``plan``'s map; unpack here."""
    from runtime._sys import CLONE_NEWUSER, setns

    userns = idmap.open_user_namespace(plan)
    data_r, data_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(data_r)
                os.close(err_r)
                setns(userns, CLONE_NEWUSER)
                with os.fdopen(data_w, "wb") as out:
                    pack(out)
                code = 0
            except BrokenPipeError:
                code = 0
            except BaseException as e:
                os.write(err_w, f"{type(e).__name__}: {e}".encode()[:4000])
            finally:
                os._exit(code)
    finally:
        os.close(userns)
        os.close(data_w)
        os.close(err_w)
    try:
        with os.fdopen(data_r, "rb") as reader:
            stats = layer.unpack_layer(reader, dest, rootless=True)
    finally:
        _, status = os.waitpid(pid, 0)
        with os.fdopen(err_r, "rb") as f:
            message = f.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0 or message:
        raise LayerError(f"packing the container's changes failed: {message or status}")
    return stats


# --- metadata instructions -> config -----------------------------------------------------------


def _shell_of(config: ImageConfig) -> tuple[str, ...]:
    return tuple(config.container.shell or DEFAULT_SHELL)


def command_argv(command: df.CommandLine, config: ImageConfig) -> tuple[str, ...]:
    """A CMD/ENTRYPOINT/RUN command as argv: exec form as is, shell form through SHELL."""
    if command.exec_form:
        return tuple(command.args)
    return (*_shell_of(config), command.shell_text)


def _ports(specs: Iterable[str]) -> list[str]:
    out: list[str] = []
    for spec in specs:
        port, _, proto = spec.partition("/")
        proto = (proto or "tcp").lower()
        low, dash, high = port.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise SpecError(f"EXPOSE: invalid port {spec!r}")
        first, last = int(low), int(high) if dash else int(low)
        if last < first or last > 65535:
            raise SpecError(f"EXPOSE: invalid port range {spec!r}")
        out.extend(f"{p}/{proto}" for p in range(first, last + 1))
    return out


def apply_metadata(config: ImageConfig, instr: df.Instruction, *, cmd_set: bool) -> ImageConfig:
    """The config after a metadata instruction (already expanded), with docker's rules.

    ``cmd_set`` says whether CMD was set earlier in this build stage: an ENTRYPOINT resets an
    inherited CMD, never one the same stage set. Raises :class:`SpecError` for a bad value.
    """
    c = config.container
    if isinstance(instr, df.Env):
        return config.with_env(dict(instr.pairs))
    if isinstance(instr, df.Label):
        return config.with_labels(dict(instr.pairs))
    if isinstance(instr, df.Cmd):
        return config.with_config(cmd=command_argv(instr.command, config))
    if isinstance(instr, df.Entrypoint):
        argv = command_argv(instr.command, config)
        cmd = c.cmd if cmd_set else None
        return config.with_config(entrypoint=argv, cmd=cmd)
    if isinstance(instr, df.Shell):
        if not instr.args:
            raise SpecError("SHELL needs at least one argument")
        return config.with_config(shell=tuple(instr.args))
    if isinstance(instr, df.Workdir):
        path = posixpath.normpath(posixpath.join(c.working_dir or "/", instr.path))
        return config.with_config(working_dir="/" + path.lstrip("/"))
    if isinstance(instr, df.User):
        if not instr.user:
            raise SpecError("USER needs a user")
        return config.with_config(user=instr.user)
    if isinstance(instr, df.Expose):
        ports = sorted({*(c.exposed_ports or ()), *_ports(instr.ports)})
        return config.with_config(exposed_ports=tuple(ports))
    if isinstance(instr, df.Volume):
        volumes = sorted({*(c.volumes or ()), *(p for p in instr.paths if p)})
        return config.with_config(volumes=tuple(volumes))
    if isinstance(instr, df.StopSignal):
        return config.with_config(stop_signal=instr.signal)
    if isinstance(instr, df.Healthcheck):
        check = Healthcheck(
            test=instr.test,
            interval=instr.interval,
            timeout=instr.timeout,
            start_period=instr.start_period,
            start_interval=instr.start_interval,
            retries=instr.retries,
        )
        return config.with_config(healthcheck=check)
    if isinstance(instr, df.Onbuild):
        return config.with_config(on_build=(*(c.on_build or ()), instr.expression))
    if isinstance(instr, df.Maintainer):
        return dataclasses.replace(config, author=instr.name)
    if isinstance(instr, df.Arg):
        return config
    raise SpecError(f"{instr.keyword} does not change an image config")


def history_text(instr: df.Instruction) -> str:
    """How BuildKit writes a metadata step of ``instr`` (already expanded) in the history.

    Key-value instructions show their values after expansion (``ENV B=/a/x`` for
    ``ENV B=$A/x``), so ``history`` says what the image holds; the rest keep their text.
    """
    if isinstance(instr, (df.Env, df.Label)):
        return " ".join([instr.keyword, *(f"{k}={v}" for k, v in instr.pairs)])
    if isinstance(instr, df.Workdir):
        return f"WORKDIR {instr.path}"
    if isinstance(instr, df.User):
        return f"USER {instr.user}"
    return instr.original.strip()


# --- commit ------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_change(text: str, config: ImageConfig) -> df.Instruction:
    """One ``--change`` line as an expanded instruction (the image's ENV in scope)."""
    keyword = text.strip().split(None, 1)[0].upper() if text.strip() else ""
    if keyword not in COMMIT_CHANGES | {"STOPSIGNAL", "HEALTHCHECK"}:
        allowed = ", ".join(sorted(COMMIT_CHANGES | {"STOPSIGNAL", "HEALTHCHECK"}))
        raise SpecError(f"--change {text!r}: {keyword or 'empty'} is not allowed (use {allowed})")
    if keyword == "ONBUILD":
        rest = text.strip()[len("ONBUILD") :].strip()
        trigger = df.parse_trigger(rest, path="--change")
        return df.Onbuild(line=1, end_line=1, original=text, trigger=trigger, expression=rest)
    try:
        instr = df.parse_trigger(text, path="--change")
        return expand_instruction(instr, config.container.env_map, path="--change").instruction
    except DockerfileSyntaxError as e:
        raise SpecError(f"--change {text!r}: {e}") from e


def _base_of(container: Container, store: Store, base: str | None) -> ImageConfig:
    """The config the container's image had: ``base`` if given, else found from its layers."""
    spec_rootfs: Rootfs = container.spec.rootfs
    diff_ids = []
    layers_dir = (store.root / "layers" / "sha256").resolve()
    for lower in reversed(spec_rootfs.lowers):
        path = Path(lower).resolve()
        if path.name != "diff" or path.parent.parent != layers_dir:
            raise ImageError(
                f"cannot commit container {container.id}: its layer {lower} is not in the "
                f"store {store.root}"
            )
        diff_ids.append(f"sha256:{path.parent.name}")
    if base is not None:
        config = host_config() if base == HOST else store.get_image(base).config
        if list(config.diff_ids) != diff_ids or is_host_based(config) != spec_rootfs.host:
            raise ImageError(
                f"cannot commit container {container.id} on {base!r}: the container does not "
                "run that image's layers"
            )
        return config
    for image in store.list_images():
        cfg = image.config
        if list(cfg.diff_ids) == diff_ids and is_host_based(cfg) == spec_rootfs.host:
            return cfg
    config = host_config() if spec_rootfs.host else ImageConfig.empty()
    for diff_id in diff_ids:
        config = config.add_layer(diff_id)
    return config


def commit(
    container: Container,
    store: Store,
    ref: str | None = None,
    changes: Sequence[str] = (),
    message: str = "",
    *,
    base: str | None = None,
    author: str | None = None,
) -> str:
    """Make the container's filesystem changes a new image, like ``docker commit``; return its id.

    ``container`` is a :class:`runtime.engine.Container`, running or stopped (not removed). Its
    upper directories become one layer on top of its image's layers; mount points the engine
    made are left out. ``changes`` are Dockerfile lines (``CMD ["sh"]``, ``ENV A=1``...) applied
    to the config; ``base`` names the container's image (default: an image of the store with
    the same layers, else a config with only those layers). ``ref`` tags the new image.
    """
    config = _base_of(container, store, base)
    cmd_set = False
    for text in changes:
        instr = parse_change(text, config)
        config = apply_metadata(config, instr, cmd_set=cmd_set)
        cmd_set = cmd_set or isinstance(instr, df.Cmd)
    spec = container.spec
    targets = [b.target for b in spec.binds] + [t.target for t in spec.tmpfs]
    rootless = bool(container.userns)
    skip = mount_stubs(container.overlays, targets, rootless=rootless)
    parts = overlay_parts(container.overlays)
    parent = None
    for diff_id in config.diff_ids:
        parent = chain_id(parent, diff_id)
    created = _now()
    with store.guard():
        try:
            record = store.ensure_layer(
                f"commit-{container.id}",
                lambda d: capture_layer(parts, d, rootless=rootless, skip=skip),
                parent=parent,
                force=True,
                fingerprint=PACKED_AGAIN[rootless],
            )
        except OSError as e:
            raise ImageError(f"cannot commit container {container.id}: {e}") from e
        config = config.add_layer(
            record.diff_id,
            created=created,
            created_by=f"pytest-isolate commit {container.id}",
            comment=message or None,
        )
        if author is not None:
            config = dataclasses.replace(config, author=author)
        image_id = store.put_image(config)
        if ref:
            store.tag(ref, image_id)
    return image_id
