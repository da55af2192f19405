"""The Dockerfile builder: stages, steps, the layer cache, RUN in containers, COPY/ADD as layers.

The API the CLI, the docs and the bench build on (keep it stable)::

    @dataclass(frozen=True)
    class BuildOptions:
        context: Path
        dockerfile: Path | None = None          # default: <context>/Dockerfile
        tags: tuple[str, ...] = ()
        build_args: Mapping[str, str] = {}
        target: str | None = None               # default: the last stage
        no_cache: bool = False
        no_cache_filter: tuple[str, ...] = ()   # stage names built without the cache
        network: str = "host"                   # RUN's network: "host" or "none"
        progress: Callable[[BuildEvent], None] | None = None
        secrets: Mapping[str, Path] = {}        # RUN --mount=type=secret,id=ID -> host file
        cache_from: tuple[RemoteCache, ...] = ()  # --cache-from: asked when the store misses
        pull: PullPolicy = "missing"            # FROM an image the store lacks: pull it
        puller: Puller | None = None            # default: runtime.registry.transfer.pull

    def build(opts, *, store=None, engine=None) -> BuildResult

Events (:class:`BuildEvent`): each step sends ``step`` when it starts, then ``cached`` when the
cache had its result, or ``output`` lines (RUN) and ``done``; ``warning`` for things docker warns
about. :class:`BuildResult` has the image id, its tags, config and a :class:`StepResult` a step.

How a build runs (docker/BuildKit semantics; the cache rules are in :mod:`.cachekey`):

* :func:`runtime.build.stages.plan` picks the stages the target needs; each starts from
  ``scratch``, ``host``, an image of the store, or another stage's result; ONBUILD triggers of
  the base run first;
* a RUN runs in a fresh container made by the engine from the layers so far (``FROM host``: on
  top of the host's ``/``), with the image's env plus the ARGs in scope, its workdir, user and
  SHELL; its output streams to ``progress``. When it exits 0, the container's overlay upper
  directories *are* the layer: mount points the engine made are left out, and the rest is
  packed and unpacked into the store (:func:`runtime.image.images.capture_layer`);
* COPY and ADD never start a container: the layer directory is written directly from the
  context, another stage or image (read through its layer directories), a URL or a heredoc;
* ENV, LABEL, CMD... change the config only (history ``empty_layer``);
* every layer goes through :meth:`Store.ensure_layer` under its cache key: N builds of the same
  Dockerfile at once produce each layer once, and a build killed at any moment leaves no partial
  layer (work happens in the store's ``tmp/`` and appears by rename). The build holds
  :meth:`Store.guard` until its image is stored, so a prune cannot take its layers meanwhile.

Invariant: a built layer's diff id is :func:`runtime.image.layer.layer_digest` of its stored
directory, so an export can recreate the exact tar. History timestamps are those of the layers'
creation, so a fully cached rebuild gives the same image id.

Decisions where docker leaves room:

* RUN's network is the host's by default, so ``RUN apt-get install`` works (docker gets the same
  from its default bridge, which this engine does not have); ``network="none"`` or
  ``RUN --network=none`` isolates.
* Rootless (not root), RUN runs in a user namespace: with subordinate id ranges (newuidmap and
  ``/etc/subuid``) the image's other users exist; the captured layer is stored owned by the
  user, as every rootless layer is (ownership collapses to root in the container, and counts
  as 0:0 in the diff id); ``--chown`` and device nodes cannot be kept there.
* ``FROM host`` is keyed by a fingerprint of the host's OS release and package databases: an
  upgrade of the host's packages invalidates the layers built on it.
* COPY writes new parent directories (and files from heredocs) with mtime 0, so a COPY of the
  same sources gives the same layer.
* ``RUN --mount=type=cache`` directories live in the store (``<store>/builder/cache-mounts``);
  ``sharing`` is always ``shared`` except ``locked``, which takes a lock. File digests of the
  context are remembered by inode state in ``<store>/builder/checksums.json``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from runtime.build import cachekey, stages
from runtime.build import dockerfile as df
from runtime.build.context import (
    BuildContext,
    Source,
    checksum,
    has_wildcards,
    load_memo,
    save_memo,
)
from runtime.build.copier import (
    _chmod,
    _chown,
    _Input,
    _is_archive,
    _is_url,
    _join,
    _plan_copy,
    _Put,
    _put_entry,
    _put_found,
    _select_view,
    _write_items,
)
from runtime.build.expand import expand_instruction
from runtime.build.ignore import clean_path
from runtime.errors import BuildError, DockerfileSyntaxError, ImageNotFound, IsolateError
from runtime.image import images, layer
from runtime.image.config import ImageConfig, host_architecture
from runtime.image.images import LayeredView, Puller, PullPolicy
from runtime.image.reference import HOST
from runtime.image.store import PACKED_AGAIN, LayerRecord, Store, chain_id
from runtime.spec import DEFAULT_PATH, BindMount, ContainerSpec, Rootfs, TmpfsMount

if TYPE_CHECKING:
    from runtime.engine import Engine

__all__ = [
    "BuildEvent",
    "BuildOptions",
    "BuildResult",
    "StepResult",
    "build",
    "host_fingerprint",
]

EventKind = Literal["step", "cached", "output", "done", "warning"]

TAIL_LINES = 20
"""How many last lines of a failed RUN's output its error shows."""

BUILDER_DIR = "builder"
"""The builder's own corner of the store: ``checksums.json`` (file digests by inode state, so an
unchanged context is not read again) and ``cache-mounts/`` (``RUN --mount=type=cache``)."""

BUILD_HOSTNAME = "buildkitsandbox"
"""The hostname RUN sees, as under BuildKit."""

_PROXY_ARGS = frozenset(a for a in stages.PREDEFINED_ARGS if a != "SOURCE_DATE_EPOCH")


@dataclass(frozen=True)
class BuildEvent:
    """Something a build reports while it runs (see the module docstring)."""

    kind: EventKind
    stage: str
    """The stage's name, or ``stage-N``; empty for build-level warnings."""
    step: int
    """1-based over the whole build; 0 for build-level warnings."""
    total: int
    instruction: str
    """The instruction as written (its first line)."""
    line: int
    text: str = ""
    """An output line (``output``) or the warning (``warning``)."""
    seconds: float = 0.0
    """How long the step took (``done``, ``cached``)."""


@dataclass(frozen=True)
class BuildOptions:
    """What to build; see the module docstring."""

    context: Path
    dockerfile: Path | None = None
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    target: str | None = None
    no_cache: bool = False
    no_cache_filter: tuple[str, ...] = ()
    network: str = "host"
    progress: Callable[[BuildEvent], None] | None = None
    secrets: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    cache_from: tuple[RemoteCache, ...] = ()
    pull: PullPolicy = "missing"
    puller: Puller | None = None

    def __post_init__(self) -> None:
        if self.pull not in images.PULL_POLICIES:
            raise BuildError(f"pull policy must be never, missing or always, not {self.pull!r}")
        if self.network not in ("host", "none"):
            raise BuildError(f"build network must be 'host' or 'none', not {self.network!r}")
        object.__setattr__(self, "context", Path(self.context))
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "no_cache_filter", tuple(self.no_cache_filter))
        object.__setattr__(self, "cache_from", tuple(self.cache_from))


class RemoteCache(Protocol):
    """A build cache kept elsewhere (``--cache-from``), asked for a step the store lacks."""

    def fetch(self, key: str) -> bool:
        """Put the layer recorded under store cache ``key`` into the store, with a cache record
        (:meth:`Store.put_cache`), and say whether it did; ``False`` when it has no such key."""
        ...


@dataclass(frozen=True)
class StepResult:
    """One step of the build: whether the cache had it, and the layer it made (if any)."""

    stage: str
    line: int
    instruction: str
    cached: bool
    diff_id: str | None
    seconds: float
    cache_key: str | None = None
    """The store cache key of the step's layer (``--cache-to`` exports these)."""


@dataclass(frozen=True)
class BuildResult:
    """A finished build: the image (stored, tagged) and what each step did."""

    image_id: str
    tags: tuple[str, ...]
    config: ImageConfig
    steps: tuple[StepResult, ...]
    warnings: tuple[str, ...] = ()


# --- stage state ---------------------------------------------------------------------------------


@dataclass
class _State:
    """Where a stage is: its config, layers (bottom first), cache key and ARG values."""

    name: str
    config: ImageConfig
    layers: list[LayerRecord]
    host: bool
    key: str
    args: dict[str, str] = field(default_factory=dict)
    cmd_set: bool = False
    no_cache: bool = False

    @property
    def lowers(self) -> tuple[str, ...]:
        """Layer directories, topmost first (overlay order)."""
        return tuple(str(rec.path) for rec in reversed(self.layers))

    @property
    def view_layers(self) -> tuple[str, ...]:
        return (*self.lowers, "/") if self.host else self.lowers

    def view(self) -> LayeredView:
        return LayeredView(self.view_layers, rootless=os.geteuid() != 0)

    @property
    def workdir(self) -> str:
        return self.config.container.working_dir or "/"

    @property
    def created(self) -> str | None:
        return self.config.created

    def chain(self) -> str | None:
        parent: str | None = None
        for diff_id in self.config.diff_ids:
            parent = chain_id(parent, diff_id)
        return parent


def host_fingerprint(root: str = "/") -> str:
    """What identifies the host's root filesystem for the cache (``FROM host``).

    Its OS release, architecture, and the size and mtime of its package databases: installing
    or upgrading a package changes it. Other changes to the host (a file edited by hand) do not.
    """
    h = hashlib.sha256(host_architecture().encode())
    for rel in ("etc/os-release", "usr/lib/os-release"):
        with contextlib.suppress(OSError):
            h.update(Path(root, rel).read_bytes())
            break
    for rel in (
        "var/lib/dpkg/status",
        "var/lib/rpm/rpmdb.sqlite",
        "var/lib/rpm/Packages",
        "lib/apk/db/installed",
        "var/lib/pacman/local",
    ):
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(root, rel))
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "sha256:" + h.hexdigest()


def _builtin_args() -> dict[str, str]:
    arch = host_architecture()
    plat = f"linux/{arch}"
    return {
        "TARGETPLATFORM": plat,
        "TARGETOS": "linux",
        "TARGETARCH": arch,
        "TARGETVARIANT": "",
        "BUILDPLATFORM": plat,
        "BUILDOS": "linux",
        "BUILDARCH": arch,
        "BUILDVARIANT": "",
    }


# --- the build -----------------------------------------------------------------------------------


def build(
    opts: BuildOptions, *, store: Store | None = None, engine: Engine | None = None
) -> BuildResult:
    """Build the Dockerfile of ``opts``; store, tag and return the image.

    Raises :class:`~runtime.errors.BuildError` naming the Dockerfile, line and instruction
    (:class:`~runtime.errors.DockerfileSyntaxError` for what the parser or the expansion finds).
    """
    return _Build(opts, store or Store.open(), engine).run()


class _Build:
    def __init__(self, opts: BuildOptions, store: Store, engine: Engine | None) -> None:
        self.opts = opts
        self.store = store
        self._engine = engine
        self.context_dir = opts.context.resolve()
        self.dockerfile_path = (
            Path(opts.dockerfile)
            if opts.dockerfile is not None
            else self.context_dir / "Dockerfile"
        )
        self.steps: list[StepResult] = []
        self.warnings: list[str] = []
        self.states: dict[int, _State] = {}
        self.step_no = 0
        self.total = 0
        self.rootless = os.geteuid() != 0
        self._host_fp: str | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # -- events

    def _emit(self, event: BuildEvent) -> None:
        if self.opts.progress is not None:
            self.opts.progress(event)

    def _warn(self, text: str, stage: str = "", line: int = 0) -> None:
        self.warnings.append(text)
        self._emit(BuildEvent("warning", stage, 0, self.total, "", line, text))

    # -- driving

    def engine(self) -> Engine:
        """The engine for RUN steps, made (and its code imported) only when one runs."""
        if self._engine is None:
            from runtime.engine import Engine

            self._engine = Engine()
        return self._engine

    def run(self) -> BuildResult:
        try:
            text = self.dockerfile_path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise BuildError(f"cannot read the Dockerfile {self.dockerfile_path}: {e}") from e
        self.df = df.parse(text, str(self.dockerfile_path))
        for w in self.df.warnings:
            self._warn(f"{self.df.path}:{w.line}: {w.message}", line=w.line)
        if self.df.syntax is not None:
            self._warn(
                f"{self.df.path}: '# syntax={self.df.syntax}' is ignored (built-in frontend)"
            )
        memo = load_memo(self.store.root / BUILDER_DIR / "checksums.json")
        known = len(memo)
        self.context = BuildContext.load(self.context_dir, self.dockerfile_path, memo=memo)
        self.plan = stages.plan(
            self.df, self.opts.target, dict(self.opts.build_args), _builtin_args()
        )
        for name in self.plan.unused_build_args:
            self._warn(f"build arg {name!r} was given but no ARG of the build uses it")
        self.total = sum(1 + len(p.stage.instructions) for p in self.plan.stages)
        filters = {f.lower() for f in self.opts.no_cache_filter}
        try:
            with self.store.guard():
                for planned in self.plan.stages:
                    name = planned.name or f"stage-{planned.index}"
                    no_cache = self.opts.no_cache or (planned.name or "") in filters
                    no_cache = no_cache or str(planned.index) in filters
                    self.states[planned.index] = self._stage(planned, name, no_cache)
                final = self.states[self.plan.target.index]
                image_id = self.store.put_image(final.config)
                tags = tuple(self.store.tag(t, image_id) for t in self.opts.tags)
            if len(memo) != known:
                save_memo(self.store.root / BUILDER_DIR / "checksums.json", memo)
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
        return BuildResult(image_id, tags, final.config, tuple(self.steps), tuple(self.warnings))

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pytest-isolate-build-")
        return Path(tempfile.mkdtemp(dir=self._tmp.name))

    def _where(self, instr: df.Instruction) -> str:
        return f"{self.df.path}:{instr.line}: {instr.original.strip()}"

    @contextlib.contextmanager
    def _step(self, state: _State | str, instr: df.Instruction) -> Iterator[dict[str, Any]]:
        """Number a step, send its events, record its result, locate its errors."""
        self.step_no += 1
        self.total = max(self.total, self.step_no)
        stage = state if isinstance(state, str) else state.name
        shown = instr.original.strip().split("\n", 1)[0]
        base = BuildEvent("step", stage, self.step_no, self.total, shown, instr.line)
        self._emit(base)
        outcome: dict[str, Any] = {"cached": False, "diff_id": None, "key": None}
        start = time.monotonic()
        try:
            yield outcome
        except DockerfileSyntaxError:
            raise
        except BuildError as e:
            if str(e).startswith(f"{self.df.path}:"):
                raise
            raise BuildError(f"{self._where(instr)}: {e}") from e
        except (IsolateError, OSError, ValueError) as e:
            raise BuildError(f"{self._where(instr)}: {e}") from e
        seconds = time.monotonic() - start
        kind: EventKind = "cached" if outcome["cached"] else "done"
        self._emit(dataclasses.replace(base, kind=kind, seconds=seconds))
        self.steps.append(
            StepResult(
                stage,
                instr.line,
                shown,
                outcome["cached"],
                outcome["diff_id"],
                seconds,
                outcome["key"],
            )
        )

    def _stage(self, planned: stages.PlannedStage, name: str, no_cache: bool) -> _State:
        with self._step(name, planned.stage.from_) as out:
            state = self._base(planned, name)
            state.no_cache = no_cache
            out["diff_id"] = None
        triggers = state.config.container.on_build or ()
        if triggers:
            state.config = state.config.with_config(on_build=None)
            self.total += len(triggers)
            for i, expression in enumerate(triggers):
                try:
                    trigger = df.parse_trigger(expression, f"{name} ONBUILD[{i}]")
                except DockerfileSyntaxError as e:
                    raise BuildError(f"{self._where(planned.stage.from_)}: {e}") from e
                trigger = dataclasses.replace(
                    trigger, line=planned.stage.from_.line, original=f"ONBUILD {expression}"
                )
                self._instruction(state, planned, -1, trigger)
        for pos, instr in enumerate(planned.stage.instructions):
            self._instruction(state, planned, pos, instr)
        return state

    def _base(self, planned: stages.PlannedStage, name: str) -> _State:
        base = planned.base
        plat = planned.platform
        if plat is not None and plat not in (f"linux/{host_architecture()}", "linux"):
            raise BuildError(
                f"FROM --platform={plat}: only this host's platform linux/{host_architecture()} "
                "can be built"
            )
        if isinstance(base, stages.StageRef):
            src = self.states[base.index]
            return _State(
                name, src.config, list(src.layers), src.host, cachekey.base_key("stage", src.key)
            )
        if isinstance(base, stages.Scratch):
            return _State(name, ImageConfig.empty(), [], False, cachekey.base_key("scratch"))
        return self._image_state(base.ref, name)

    def _image_state(self, ref: str, name: str) -> _State:
        if ref == HOST:
            if self._host_fp is None:
                self._host_fp = host_fingerprint()
            return _State(
                name, images.host_config(), [], True, cachekey.base_key("host", self._host_fp)
            )
        try:
            image_id = images.ensure_image(
                self.store, ref, policy=self.opts.pull, pull=self.opts.puller
            )
        except ImageNotFound as e:
            raise BuildError(f"base image: {e}") from e
        image = self.store.get_image(image_id)
        layers = self.store.image_layers(image.id)
        host = images.is_host_based(image.config)
        return _State(name, image.config, layers, host, cachekey.base_key("image", image.id))

    # -- instructions

    def _env(self, state: _State) -> dict[str, str]:
        """The variables an instruction's expansion sees: ARGs, then ENV (which wins)."""
        return {**state.args, **state.config.container.env_map}

    def _instruction(
        self, state: _State, planned: stages.PlannedStage, pos: int, instr: df.Instruction
    ) -> None:
        with self._step(state, instr) as out:
            expanded = expand_instruction(
                instr, self._env(state), escape=self.df.escape, path=self.df.path
            )
            ins = expanded.instruction
            if isinstance(ins, df.Arg):
                self._arg(state, ins)
            elif isinstance(ins, df.Run):
                self._run(state, planned, pos, ins, out)
            elif isinstance(ins, (df.Copy, df.Add)):
                used = {n: self._env(state).get(n) for n in expanded.used}
                self._copy(state, planned, pos, ins, used, out)
            elif isinstance(ins, df.From):
                raise BuildError("FROM inside a stage")  # pragma: no cover - parser splits
            else:
                state.config = images.apply_metadata(state.config, ins, cmd_set=state.cmd_set)
                state.cmd_set = state.cmd_set or isinstance(ins, df.Cmd)
                state.config = state.config.add_history(
                    created_by=images.history_text(ins), created=state.created
                )

    def _arg(self, state: _State, instr: df.Arg) -> None:
        given = self.opts.build_args
        for decl in instr.args:
            if decl.name in given:
                state.args[decl.name] = given[decl.name]
            elif decl.default is not None:
                state.args[decl.name] = decl.default
            elif decl.name in self.plan.global_env:
                state.args[decl.name] = self.plan.global_env[decl.name]

    def _add_layer(
        self,
        state: _State,
        key: str,
        produce: Callable[[Path], str],
        created_by: str,
        out: dict[str, Any],
    ) -> None:
        ran: list[bool] = []

        def producer(directory: Path) -> str:
            ran.append(True)
            return produce(directory)

        store_key = cachekey.store_key(key)
        if not state.no_cache and self.store.get_cache(store_key) is None:
            # The store misses: a remote cache that has the step puts it in the store, where
            # ensure_layer below finds it as if it had been built here.
            for remote in self.opts.cache_from:
                if remote.fetch(store_key):
                    break
        record = self.store.ensure_layer(
            store_key,
            producer,
            parent=state.chain(),
            force=state.no_cache,
            fingerprint=PACKED_AGAIN[self.rootless],
        )
        out["key"] = store_key
        out["cached"] = not ran
        out["diff_id"] = record.diff_id
        state.layers.append(record)
        state.key = key
        state.config = state.config.add_layer(
            record.diff_id, created_by=created_by, created=record.created
        )

    # -- RUN

    def _run_argv(
        self, state: _State, instr: df.Run, binds: list[BindMount | Callable[[], BindMount]]
    ) -> tuple[str, ...]:
        command = instr.command
        if command.exec_form or not instr.heredocs:
            return images.command_argv(command, state.config)
        shell = tuple(state.config.container.shell or images.DEFAULT_SHELL)
        text = command.shell_text.strip()
        doc = instr.heredocs[0]
        if len(instr.heredocs) == 1 and re.fullmatch(
            r"<<-?[\"']?" + re.escape(doc.name) + r"[\"']?", text
        ):
            body = doc.text
            if body.startswith("#!"):
                script = self._tmpdir() / "script"
                script.write_text(body)
                script.chmod(0o755)
                # Named by its content: the path is in the argv, so in the cache key.
                target = f"/dev/pipes/script-{hashlib.sha256(body.encode()).hexdigest()[:32]}"
                binds.append(BindMount(str(script), target, readonly=True))
                return (target,)
            return (*shell, body)
        full = command.shell_text + "\n" + "".join(f"{d.content}{d.name}\n" for d in instr.heredocs)
        return (*shell, full)

    def _run(
        self,
        state: _State,
        planned: stages.PlannedStage,
        pos: int,
        instr: df.Run,
        out: dict[str, Any],
    ) -> None:
        if not state.layers and not state.host:
            raise BuildError(
                "RUN needs a root filesystem with a shell or the command, but this image is "
                "empty (FROM scratch with nothing added)"
            )
        if instr.security == "insecure":
            raise BuildError("RUN --security=insecure is not supported")
        binds: list[BindMount | Callable[[], BindMount]] = []
        tmpfs: list[TmpfsMount] = []
        key_mounts: list[dict[str, Any]] = []
        locks: list[Path] = []
        for k, mount in enumerate(instr.mounts):
            self._mount(state, planned, pos, k, mount, binds, tmpfs, key_mounts, locks)
        argv = self._run_argv(state, instr, binds)
        env = {"PATH": DEFAULT_PATH}
        config_env = state.config.container.env_map
        env.update({k: v for k, v in state.args.items() if k not in config_env})
        env.update(config_env)
        for name in _PROXY_ARGS:
            if name in self.opts.build_args and name not in env:
                env[name] = self.opts.build_args[name]
        key_env = {k: v for k, v in env.items() if k not in _PROXY_ARGS or k in config_env}
        network = self.opts.network if instr.network in (None, "default") else instr.network
        assert network is not None
        user = state.config.container.user or ""
        key = cachekey.step_key(
            state.key,
            cachekey.run_step(
                argv=argv,
                env=key_env,
                workdir=state.workdir,
                user=user,
                network=network,
                mounts=key_mounts,
            ),
        )
        shown_args = sorted(
            (k, v) for k, v in state.args.items() if k not in config_env and k not in _PROXY_ARGS
        )
        prefix = f"|{len(shown_args)} " + " ".join(f"{k}={v}" for k, v in shown_args) + " "
        created_by = "RUN " + (prefix if shown_args else "") + " ".join(argv)
        lowers = state.lowers

        def produce(directory: Path) -> str:
            mounts = tuple(b if isinstance(b, BindMount) else b() for b in binds)
            spec = ContainerSpec(
                Rootfs(lowers=lowers, host=state.host),
                argv=argv,
                env=env,
                cwd=state.workdir,
                user=user or None,
                hostname=BUILD_HOSTNAME,
                binds=mounts,
                tmpfs=tuple(tmpfs),
                network=network,
            )
            targets = [b.target for b in mounts] + [t.target for t in tmpfs]
            with contextlib.ExitStack() as stack:
                for lock in locks:
                    stack.enter_context(_locked(lock))
                return self._execute(state, instr, spec, targets, directory)

        self._add_layer(state, key, produce, created_by, out)

    def _execute(
        self,
        state: _State,
        instr: df.Run,
        spec: ContainerSpec,
        targets: Sequence[str],
        directory: Path,
    ) -> str:
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        shown = instr.original.strip().split("\n", 1)[0]

        def line_out(text: str) -> None:
            tail.append(text)
            self._emit(
                BuildEvent("output", state.name, self.step_no, self.total, shown, instr.line, text)
            )

        with self.engine().create(spec) as container:
            r, w = os.pipe()
            devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                try:
                    container.start(stdio=(devnull, w, w))
                finally:
                    os.close(w)
                    os.close(devnull)
                _read_lines(r, line_out)
            finally:
                os.close(r)
            status = container.wait()
            if status.exit_code != 0:
                shown_tail = "\n".join(f"  | {t}" for t in tail)
                raise BuildError(
                    f"the command {list(spec.argv or ())!r} {status} (exit code "
                    f"{status.exit_code})" + (f"; its last output:\n{shown_tail}" if tail else "")
                )
            skip = images.mount_stubs(container.overlays, targets, rootless=container.userns)
            return images.capture_layer(
                images.overlay_parts(container.overlays),
                directory,
                rootless=container.userns,
                skip=skip,
            )

    def _mount(
        self,
        state: _State,
        planned: stages.PlannedStage,
        pos: int,
        k: int,
        mount: df.Mount,
        binds: list[BindMount | Callable[[], BindMount]],
        tmpfs: list[TmpfsMount],
        key_mounts: list[dict[str, Any]],
        locks: list[Path],
    ) -> None:
        def absolute(path: str) -> str:
            return posixpath.normpath(posixpath.join(state.workdir, path))

        if mount.type == "ssh":
            raise BuildError("RUN --mount=type=ssh is not supported")
        if mount.type == "secret":
            sid = mount.id or (posixpath.basename(mount.target) if mount.target else "")
            if not sid:
                raise BuildError("RUN --mount=type=secret needs an id or a target")
            if mount.env:
                raise BuildError("RUN --mount=type=secret,env= is not supported")
            source = self.opts.secrets.get(sid)
            if source is None:
                if mount.required:
                    raise BuildError(f"secret {sid!r} is required but was not given")
                return
            target = absolute(mount.target or f"/run/secrets/{sid}")
            binds.append(BindMount(os.path.abspath(source), target, readonly=True))
            return
        if not mount.target:
            raise BuildError(f"RUN --mount={mount.raw}: a target is required")
        target = absolute(mount.target)
        if mount.type == "tmpfs":
            options = "mode=1777" + (f",size={mount.size}" if mount.size else "")
            tmpfs.append(TmpfsMount(target, options))
            key_mounts.append({"type": "tmpfs", "target": target, "size": mount.size})
            return
        if mount.type == "cache":
            ident = mount.id or target
            name = hashlib.sha256(ident.encode()).hexdigest()[:32]
            base = self.store.root / BUILDER_DIR / "cache-mounts"
            path = base / name
            if not path.is_dir():
                path.mkdir(parents=True, exist_ok=True, mode=0o755)
                path.chmod(mount.mode if mount.mode is not None else 0o755)
                if not self.rootless and (mount.uid or mount.gid):
                    os.chown(path, mount.uid or 0, mount.gid or 0)
            if mount.sharing == "locked":
                locks.append(base / f"{name}.lock")
            binds.append(BindMount(str(path), target))
            key_mounts.append({"type": "cache", "target": target, "id": ident})
            return
        # bind
        source_rel = clean_path((mount.source or ".").lstrip("/") or ".")
        src = planned.mount_from.get((pos, k)) if pos >= 0 else None
        host: Callable[[], str]
        if src is None:
            sources = self.context.select(source_rel, what="RUN --mount")
            fingerprint = checksum(sources)
            if self.context.ignore.patterns or not mount.readonly:
                host = functools.partial(self._materialize, sources[0])
            else:
                host = functools.partial(str, sources[0].entries[0].path)
        else:
            view, ident = self._source_view(src)
            fingerprint = f"{ident}:{source_rel}"
            host = functools.partial(self._materialize_view, view, source_rel)
        # Copied only when the step runs, not when the cache has it.
        readonly = mount.readonly
        binds.append(lambda: BindMount(host(), target, readonly=readonly))
        key_mounts.append(
            {"type": "bind", "target": target, "source": fingerprint, "rw": not mount.readonly}
        )

    def _materialize(self, source: Source) -> str:
        """A private copy of a context source, for a bind mount that must not see the rest of
        the context (``.dockerignore``) or must not write to it (``rw``)."""
        items: dict[str, _Put] = {}
        name = "" if source.is_dir else (source.name or "file")
        for entry in source.entries:
            path = _join(name, entry.rel)
            if path:
                _put_entry(items, path, entry, None, None, False)
        out = self._tmpdir()
        _write_items(items, out, rootless=self.rootless)
        return str(out / name) if name else str(out)

    def _materialize_view(self, view: LayeredView, path: str) -> str:
        items: dict[str, _Put] = {}
        found = False
        for rel, entry in view.walk(path):
            found = True
            _put_found(items, rel, entry, None, None)
        if not found:
            raise BuildError(f"RUN --mount source {path!r} not found in its stage or image")
        out = self._tmpdir()
        _write_items(items, out, rootless=self.rootless)
        return str(out)

    # -- COPY / ADD

    def _source_view(self, src: stages.Source) -> tuple[LayeredView, str]:
        """A stage's or image's files, and what identifies them for the cache."""
        if isinstance(src, stages.StageRef):
            other = self.states[src.index]
            return other.view(), other.key
        if isinstance(src, stages.Scratch):
            return LayeredView((), rootless=self.rootless), "scratch"
        state = self._image_state(src.ref, src.ref)
        return state.view(), state.key

    def _copy(
        self,
        state: _State,
        planned: stages.PlannedStage,
        pos: int,
        instr: df.Copy | df.Add,
        used: Mapping[str, str | None],
        out: dict[str, Any],
    ) -> None:
        op: Literal["COPY", "ADD"] = "ADD" if isinstance(instr, df.Add) else "COPY"
        view = state.view()
        dest_text = instr.dest
        dest_is_dir = dest_text.endswith("/") or dest_text in (".", "") or dest_text.endswith("/.")
        dest = posixpath.normpath(posixpath.join(state.workdir, dest_text)).lstrip("/")
        dest = "" if dest == "." else dest
        owner = _chown(instr.chown, view) if instr.chown else None
        mode = _chmod(instr.chmod) if instr.chmod else None
        from_src = planned.copy_from.get(pos) if isinstance(instr, df.Copy) and pos >= 0 else None
        parents = isinstance(instr, df.Copy) and instr.parents
        inputs: list[_Input] = []
        fingerprints: list[str] = []
        if from_src is not None:
            src_view, ident = self._source_view(from_src)
            for pattern in instr.sources:
                inputs.extend(_select_view(src_view, pattern, op))
            fingerprints.append(f"from:{ident}")
            fingerprints.append(
                hashlib.sha256(
                    "\0".join(i.name + ":" + i.path for i in inputs).encode()
                ).hexdigest()
            )
        else:
            for pattern in instr.sources:
                if _is_url(pattern):
                    if op != "ADD":
                        raise BuildError(f"COPY cannot fetch {pattern!r}: use ADD for URLs")
                    url_input = self._download(pattern, instr)
                    inputs.append(url_input)
                    fingerprints.append(f"url:{pattern}:{url_input.digest}")
                    continue
                sources = self.context.select(pattern, excludes=instr.excludes, what=op)
                for source in sources:
                    archive = (
                        op == "ADD"
                        and not source.is_dir
                        and getattr(instr, "unpack", None) is not False
                        and _is_archive(source.entries[0].path)
                    )
                    inputs.append(_Input(source.name, source.path, context=source, archive=archive))
                fingerprints.append(checksum(sources))
        for doc in instr.heredocs:
            data = doc.text.encode()
            inputs.append(_Input(doc.name, doc.name, data=data))
            fingerprints.append("heredoc:" + hashlib.sha256(data).hexdigest())
        if not inputs:
            raise BuildError(f"{op}: no source files were specified")
        many = len(inputs) > 1 or any(has_wildcards(p) for p in instr.sources)
        target = view.lookup(dest) if dest else None
        if many and not dest_is_dir and not (target is not None and target.is_dir):
            raise BuildError(
                f"when using {op} with more than one source file, the destination must be a "
                f"directory and end with a / (got {dest_text!r})"
            )
        key = cachekey.step_key(
            state.key,
            cachekey.copy_step(
                op=op,
                dest=("/" + dest) + ("/" if dest_is_dir else ""),
                sources=hashlib.sha256("\n".join(fingerprints).encode()).hexdigest(),
                chown=None if owner is None else f"{owner[0]}:{owner[1]}",
                chmod=None if mode is None else f"{mode:o}",
                options={
                    "excludes": list(instr.excludes),
                    "parents": parents,
                    "unpack": getattr(instr, "unpack", None),
                },
                used=used,
            ),
        )
        srcs = " ".join([*instr.sources, *(f"<<{d.name}" for d in instr.heredocs)])
        created_by = f"{op} {srcs} {dest_text}".strip()

        def produce(directory: Path) -> str:
            items = _plan_copy(
                view,
                inputs,
                dest,
                dest_is_dir=dest_is_dir or many,
                owner=owner,
                mode=mode,
                parents=parents,
                keep_owner=from_src is not None,
            )
            _write_items(items, directory, rootless=self.rootless)
            with self.store.writeback():
                return layer.layer_digest(directory, rootless=self.rootless)[0]

        self._add_layer(state, key, produce, created_by, out)

    def _download(self, url: str, instr: df.Copy | df.Add) -> _Input:
        import email.utils  # here: most builds never download (both take ~30 ms to import)
        import urllib.parse
        import urllib.request

        parsed = urllib.parse.urlsplit(url)
        name = posixpath.basename(urllib.parse.unquote(parsed.path))
        path = self._tmpdir() / "download"
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
                while chunk := response.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
                modified = response.headers.get("Last-Modified")
        except OSError as e:
            raise BuildError(f"ADD {url}: download failed: {e}") from e
        digest = "sha256:" + h.hexdigest()
        want = getattr(instr, "checksum", None)
        if want and want != digest:
            raise BuildError(f"ADD {url}: checksum mismatch: expected {want}, got {digest}")
        mtime = 0
        if modified:
            with contextlib.suppress(TypeError, ValueError):
                mtime = int(email.utils.parsedate_to_datetime(modified).timestamp())
        if not name:
            raise BuildError(f"ADD {url}: the URL names no file; give a destination file name")
        return _Input(name, url, host=str(path), digest=digest, mtime=mtime, file_mode=0o600)


# --- small helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_lines(fd: int, emit: Callable[[str], None]) -> None:
    """Read ``fd`` to its end, handing over each line (a partial last one too)."""
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            emit(raw.rstrip(b"\r").decode("utf-8", "replace"))
    if pending:
        emit(pending.rstrip(b"\r").decode("utf-8", "replace"))
