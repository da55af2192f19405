"""The OCI image config (``application/vnd.oci.image.config.v1+json``) as frozen dataclasses.

Why frozen dataclasses and not dicts: a build derives each step's config from the previous one,
and a shared mutable dict would let one step change another's image. Every change here returns a
new object (:meth:`ImageConfig.with_config`, :meth:`ImageConfig.add_layer`, ...).

Why the ``extra`` field on every object: configs come from other tools (docker adds ``Hostname``,
``container_config``, ``ArgsEscaped``...), and a key we drop would change the image id. Keys we do
not model, and known keys whose value is ``null``, are kept in ``extra`` as JSON and written back,
so ``from_json(x).to_json() == canonical_json(x)`` for any valid config.

The image id is the sha256 of the config bytes, as docker defines it. Configs we write use
canonical JSON (sorted keys, no spaces, UTF-8) so the same config always has the same id; a
config read from a registry keeps its own bytes (the store hashes those, not ours).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from runtime.errors import SpecError
from runtime.image.reference import check_digest

__all__ = [
    "ContainerConfig",
    "FrozenDict",
    "Healthcheck",
    "HistoryEntry",
    "ImageConfig",
    "RootFS",
    "canonical_json",
    "host_architecture",
    "image_id",
]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class FrozenDict(Mapping[K, V], Generic[K, V]):
    """A read-only mapping (labels, unmodelled JSON), hashable when its values are."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(data)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[type[FrozenDict[K, V]], tuple[dict[K, V]]]:
        return (type(self), (self._data,))

    def merged(self, other: Mapping[K, V]) -> FrozenDict[K, V]:
        """A new mapping with ``other``'s entries added or replacing ours."""
        return FrozenDict({**self._data, **other})


JSONObject = dict[str, Any]


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no white space, UTF-8; the input of image ids."""
    try:
        text = json.dumps(
            _thaw(value),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
        return text.encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise SpecError(f"image config cannot be written as JSON: {e}") from e


def image_id(config_bytes: bytes) -> str:
    """The id of an image: the sha256 digest of its config bytes."""
    return "sha256:" + hashlib.sha256(config_bytes).hexdigest()


def host_architecture() -> str:
    """This machine's architecture in OCI (GOARCH) spelling: ``amd64``, ``arm64``, ..."""
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine)


_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

# --- codecs: one per JSON shape, (decode, encode). decode gets the JSON value and its path. ---


@dataclass(frozen=True)
class _Codec:
    decode: Callable[[Any, str], Any]
    encode: Callable[[Any], Any]


def _bad(path: str, want: str, value: Any) -> SpecError:
    return SpecError(f"image config: {path}: expected {want}, got {json.dumps(value)[:80]}")


def _dec_str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _bad(path, "a string", value)
    return value


def _dec_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(path, "an integer", value)
    return value


def _dec_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(path, "true or false", value)
    return value


def _dec_strs(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _bad(path, "a list of strings", value)
    return tuple(_dec_str(item, f"{path}[{i}]") for i, item in enumerate(value))


def _dec_set(value: Any, path: str) -> tuple[str, ...]:
    # Docker's map[string]struct{}: {"80/tcp": {}}. A set, so kept sorted.
    if not isinstance(value, dict):
        raise _bad(path, 'an object like {"key": {}}', value)
    for key, item in value.items():
        if item != {}:
            raise _bad(f"{path}.{key}", "{}", item)
    return tuple(sorted(value))


def _dec_map(value: Any, path: str) -> FrozenDict[str, str]:
    if not isinstance(value, dict):
        raise _bad(path, "an object of strings", value)
    return FrozenDict((k, _dec_str(v, f"{path}.{k}")) for k, v in value.items())


def _dec_digests(value: Any, path: str) -> tuple[str, ...]:
    digests = _dec_strs(value, path)
    for i, digest in enumerate(digests):
        try:
            check_digest(digest)
        except SpecError as e:
            raise SpecError(f"image config: {path}[{i}]: {e}") from e
    return digests


def _ident(value: Any) -> Any:
    return value


def _enc_list(value: tuple[Any, ...]) -> list[Any]:
    return list(value)


def _enc_set(value: tuple[str, ...]) -> dict[str, Any]:
    return {key: {} for key in value}


def _enc_map(value: FrozenDict[str, str]) -> dict[str, str]:
    return dict(value)


_STR = _Codec(_dec_str, _ident)
_INT = _Codec(_dec_int, _ident)
_BOOL = _Codec(_dec_bool, _ident)
_STRS = _Codec(_dec_strs, _enc_list)
_SET = _Codec(_dec_set, _enc_set)
_MAP = _Codec(_dec_map, _enc_map)
_DIGESTS = _Codec(_dec_digests, _enc_list)


def _nested(cls: type[Any]) -> _Codec:
    return _Codec(lambda value, path: _decode(cls, value, path), lambda obj: obj.to_dict())


def _nested_list(cls: type[Any]) -> _Codec:
    def decode(value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _bad(path, "a list of objects", value)
        return tuple(_decode(cls, item, f"{path}[{i}]") for i, item in enumerate(value))

    return _Codec(decode, lambda items: [item.to_dict() for item in items])


def _key(json_key: str, codec: _Codec, *, required: bool = False) -> dict[str, Any]:
    return {"json": json_key, "codec": codec, "required": required}


# --- freezing of unmodelled JSON, so ``extra`` cannot be changed behind the config's back ---


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return FrozenDict((k, _freeze(v)) for k, v in value.items())
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_thaw(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def _decode(cls: type[T], value: Any, path: str) -> T:
    if not isinstance(value, dict):
        raise _bad(path or "config", "an object", value)
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    by_key = {f.metadata["json"]: f for f in dataclasses.fields(cls) if "json" in f.metadata}  # type: ignore[arg-type]
    for key, item in value.items():
        spec = by_key.get(key)
        if spec is None or (item is None and not spec.metadata["required"]):
            extra[key] = _freeze(item)
            continue
        where = f"{path}.{key}" if path else key
        kwargs[spec.name] = spec.metadata["codec"].decode(item, where)
    for spec in by_key.values():
        if spec.metadata["required"] and spec.name not in kwargs:
            where = f"{path}: " if path else ""
            raise SpecError(f"image config: {where}missing required key {spec.metadata['json']!r}")
    kwargs["extra"] = FrozenDict(extra)
    return cls(**kwargs)


class _JSONObject:
    """Shared JSON behaviour of the config objects (fields carry their key and codec)."""

    extra: FrozenDict[str, Any]

    def to_dict(self) -> JSONObject:
        """The JSON object, unmodelled keys included; ``None`` fields are left out."""
        out: JSONObject = _thaw(self.extra)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if "json" not in f.metadata:
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.metadata["json"]] = f.metadata["codec"].encode(value)
        return out


@dataclass(frozen=True)
class Healthcheck(_JSONObject):
    """Docker's HEALTHCHECK; durations in nanoseconds, as docker writes them."""

    test: tuple[str, ...] | None = field(default=None, metadata=_key("Test", _STRS))
    interval: int | None = field(default=None, metadata=_key("Interval", _INT))
    timeout: int | None = field(default=None, metadata=_key("Timeout", _INT))
    start_period: int | None = field(default=None, metadata=_key("StartPeriod", _INT))
    start_interval: int | None = field(default=None, metadata=_key("StartInterval", _INT))
    retries: int | None = field(default=None, metadata=_key("Retries", _INT))
    extra: FrozenDict[str, Any] = field(default_factory=FrozenDict, repr=False)


@dataclass(frozen=True)
class ContainerConfig(_JSONObject):
    """The ``config`` object: how to run a container from the image."""

    user: str | None = field(default=None, metadata=_key("User", _STR))
    exposed_ports: tuple[str, ...] | None = field(default=None, metadata=_key("ExposedPorts", _SET))
    env: tuple[str, ...] | None = field(default=None, metadata=_key("Env", _STRS))
    entrypoint: tuple[str, ...] | None = field(default=None, metadata=_key("Entrypoint", _STRS))
    cmd: tuple[str, ...] | None = field(default=None, metadata=_key("Cmd", _STRS))
    volumes: tuple[str, ...] | None = field(default=None, metadata=_key("Volumes", _SET))
    working_dir: str | None = field(default=None, metadata=_key("WorkingDir", _STR))
    labels: FrozenDict[str, str] | None = field(default=None, metadata=_key("Labels", _MAP))
    stop_signal: str | None = field(default=None, metadata=_key("StopSignal", _STR))
    healthcheck: Healthcheck | None = field(
        default=None, metadata=_key("Healthcheck", _nested(Healthcheck))
    )
    on_build: tuple[str, ...] | None = field(default=None, metadata=_key("OnBuild", _STRS))
    shell: tuple[str, ...] | None = field(default=None, metadata=_key("Shell", _STRS))
    extra: FrozenDict[str, Any] = field(default_factory=FrozenDict, repr=False)

    @property
    def env_map(self) -> dict[str, str]:
        """``Env`` as a dict; an entry without ``=`` has the empty value."""
        out: dict[str, str] = {}
        for entry in self.env or ():
            name, _, value = entry.partition("=")
            out[name] = value
        return out

    def with_env(self, changes: Mapping[str, str]) -> ContainerConfig:
        """Set variables as ``ENV`` does: replace in place when present, append otherwise."""
        for name in changes:
            if not name or "=" in name:
                raise SpecError(f"image config: invalid environment variable name {name!r}")
        pending = dict(changes)
        env: list[str] = []
        for entry in self.env or ():
            name = entry.partition("=")[0]
            if name in pending:
                env.append(f"{name}={pending.pop(name)}")
            else:
                env.append(entry)
        env.extend(f"{name}={value}" for name, value in pending.items())
        return dataclasses.replace(self, env=tuple(env))

    def with_labels(self, changes: Mapping[str, str]) -> ContainerConfig:
        """Add or replace labels as ``LABEL`` does."""
        return dataclasses.replace(self, labels=(self.labels or FrozenDict()).merged(changes))


@dataclass(frozen=True)
class RootFS(_JSONObject):
    """The layers of the image, as uncompressed-tar digests, bottom first."""

    type: str = field(default="layers", metadata=_key("type", _STR, required=True))
    diff_ids: tuple[str, ...] = field(
        default=(), metadata=_key("diff_ids", _DIGESTS, required=True)
    )
    extra: FrozenDict[str, Any] = field(default_factory=FrozenDict, repr=False)

    def __post_init__(self) -> None:
        if self.type != "layers":
            raise SpecError(f"image config: rootfs.type must be 'layers', not {self.type!r}")


@dataclass(frozen=True)
class HistoryEntry(_JSONObject):
    """One build step; ``empty_layer`` steps (ENV, CMD...) have no entry in ``diff_ids``."""

    created: str | None = field(default=None, metadata=_key("created", _STR))
    created_by: str | None = field(default=None, metadata=_key("created_by", _STR))
    author: str | None = field(default=None, metadata=_key("author", _STR))
    comment: str | None = field(default=None, metadata=_key("comment", _STR))
    empty_layer: bool | None = field(default=None, metadata=_key("empty_layer", _BOOL))
    extra: FrozenDict[str, Any] = field(default_factory=FrozenDict, repr=False)


@dataclass(frozen=True)
class ImageConfig(_JSONObject):
    """An image config; :meth:`to_json` gives the canonical bytes, :attr:`id` their digest."""

    architecture: str = field(metadata=_key("architecture", _STR, required=True))
    os: str = field(metadata=_key("os", _STR, required=True))
    rootfs: RootFS = field(metadata=_key("rootfs", _nested(RootFS), required=True))
    config: ContainerConfig | None = field(
        default=None, metadata=_key("config", _nested(ContainerConfig))
    )
    history: tuple[HistoryEntry, ...] | None = field(
        default=None, metadata=_key("history", _nested_list(HistoryEntry))
    )
    created: str | None = field(default=None, metadata=_key("created", _STR))
    author: str | None = field(default=None, metadata=_key("author", _STR))
    variant: str | None = field(default=None, metadata=_key("variant", _STR))
    os_version: str | None = field(default=None, metadata=_key("os.version", _STR))
    os_features: tuple[str, ...] | None = field(default=None, metadata=_key("os.features", _STRS))
    extra: FrozenDict[str, Any] = field(default_factory=FrozenDict, repr=False)

    @classmethod
    def empty(cls, *, architecture: str | None = None, os: str = "linux") -> ImageConfig:
        """The config of ``FROM scratch``: no layers, no settings, this host's platform."""
        return cls(
            architecture=architecture or host_architecture(),
            os=os,
            rootfs=RootFS(),
            config=ContainerConfig(),
        )

    @classmethod
    def from_dict(cls, value: Any) -> ImageConfig:
        """Validate a parsed JSON object; :class:`SpecError` names the offending key."""
        return _decode(cls, value, "")

    @classmethod
    def from_json(cls, data: bytes | str) -> ImageConfig:
        """Parse config bytes (any valid JSON spelling; :meth:`to_json` is canonical)."""
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise SpecError(f"image config is not valid JSON: {e}") from e
        return cls.from_dict(value)

    def to_json(self) -> bytes:
        """Canonical JSON bytes of this config."""
        return canonical_json(self.to_dict())

    @property
    def id(self) -> str:
        """The image id of the canonical bytes: ``sha256:<hex>``."""
        return image_id(self.to_json())

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return self.rootfs.diff_ids

    @property
    def container(self) -> ContainerConfig:
        """The ``config`` object, empty when the image has none."""
        return self.config or ContainerConfig()

    def with_config(self, **changes: Any) -> ImageConfig:
        """A copy whose ``config`` has ``changes`` applied (``cmd=("sh",)``, ``user="1000"``)."""
        try:
            container = dataclasses.replace(self.container, **changes)
        except TypeError as e:
            raise SpecError(f"image config: {e}") from e
        return dataclasses.replace(self, config=container)

    def with_env(self, changes: Mapping[str, str]) -> ImageConfig:
        """A copy with environment variables set as ``ENV`` does."""
        return dataclasses.replace(self, config=self.container.with_env(changes))

    def with_labels(self, changes: Mapping[str, str]) -> ImageConfig:
        """A copy with labels added or replaced as ``LABEL`` does."""
        return dataclasses.replace(self, config=self.container.with_labels(changes))

    def add_layer(
        self,
        diff_id: str,
        *,
        created_by: str | None = None,
        created: str | None = None,
        comment: str | None = None,
    ) -> ImageConfig:
        """A copy with one more layer on top and its history entry."""
        check_digest(diff_id)
        rootfs = dataclasses.replace(self.rootfs, diff_ids=(*self.rootfs.diff_ids, diff_id))
        entry = HistoryEntry(created=created, created_by=created_by, comment=comment)
        return dataclasses.replace(
            self,
            rootfs=rootfs,
            history=(*(self.history or ()), entry),
            created=created or self.created,
        )

    def add_history(
        self,
        *,
        created_by: str | None = None,
        created: str | None = None,
        comment: str | None = None,
    ) -> ImageConfig:
        """A copy with a history entry for a step that changed only the config."""
        entry = HistoryEntry(
            created=created, created_by=created_by, comment=comment, empty_layer=True
        )
        return dataclasses.replace(
            self, history=(*(self.history or ()), entry), created=created or self.created
        )
