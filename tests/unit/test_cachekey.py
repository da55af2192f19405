"""Cache keys: every input that decides a step's result changes its key, nothing else does."""

from __future__ import annotations

import re

import pytest

from runtime.build import cachekey
from runtime.build.cachekey import base_key, copy_step, run_step, step_key, store_key
from runtime.image import store

RUN = dict(
    argv=("/bin/sh", "-c", "make"),
    env={"PATH": "/bin", "A": "1"},
    workdir="/src",
    user="",
    network="host",
)
COPY = dict(op="COPY", dest="/app/", sources="sha256:" + "0" * 64)


def test_base_keys_differ_by_kind_and_identity() -> None:
    keys = {
        base_key("scratch"),
        base_key("host", "sha256:aa"),
        base_key("host", "sha256:bb"),
        base_key("image", "sha256:aa"),
        base_key("image", "sha256:bb"),
    }
    assert len(keys) == 5
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)
    assert base_key("scratch") == base_key("scratch")


def test_a_stage_base_is_the_other_stages_key() -> None:
    other = step_key(base_key("scratch"), run_step(**RUN))  # type: ignore[arg-type]
    assert base_key("stage", other) == other


@pytest.mark.parametrize(
    ("kind", "ident"), [("image", ""), ("host", ""), ("stage", ""), ("scratch", "x")]
)
def test_base_key_refuses_a_missing_or_extra_identity(kind: str, ident: str) -> None:
    with pytest.raises(ValueError):
        base_key(kind, ident)  # type: ignore[arg-type]


def test_step_key_chains_on_the_parent() -> None:
    step = run_step(**RUN)  # type: ignore[arg-type]
    a = step_key(base_key("scratch"), step)
    b = step_key(base_key("image", "sha256:aa"), step)
    assert a != b
    assert step_key(a, step) != a
    assert step_key(a, step) == step_key(a, run_step(**RUN))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        step_key("", step)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("argv", ("/bin/sh", "-c", "make install")),
        ("env", {"PATH": "/bin", "A": "2"}),
        ("env", {"PATH": "/bin", "A": "1", "B": ""}),
        ("workdir", "/"),
        ("user", "1000"),
        ("network", "none"),
        ("mounts", [{"type": "cache", "target": "/root/.cache", "id": "pip"}]),
    ],
)
def test_every_run_field_changes_the_key(field: str, value: object) -> None:
    parent = base_key("scratch")
    before = step_key(parent, run_step(**RUN))  # type: ignore[arg-type]
    after = step_key(parent, run_step(**{**RUN, field: value}))  # type: ignore[arg-type]
    assert before != after


def test_env_order_does_not_matter_but_argv_order_does() -> None:
    parent = base_key("scratch")
    a = run_step(**{**RUN, "env": {"A": "1", "PATH": "/bin"}})  # type: ignore[arg-type]
    b = run_step(**{**RUN, "env": {"PATH": "/bin", "A": "1"}})  # type: ignore[arg-type]
    assert step_key(parent, a) == step_key(parent, b)
    c = run_step(**{**RUN, "argv": ("-c", "/bin/sh", "make")})  # type: ignore[arg-type]
    assert step_key(parent, c) != step_key(parent, a)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("op", "ADD"),
        ("dest", "/app"),
        ("sources", "sha256:" + "1" * 64),
        ("chown", "1000:1000"),
        ("chmod", "755"),
        ("options", {"excludes": ["*.pyc"]}),
        ("used", {"VERSION": "2"}),
        ("used", {"VERSION": None}),
    ],
)
def test_every_copy_field_changes_the_key(field: str, value: object) -> None:
    parent = base_key("scratch")
    before = step_key(parent, copy_step(**COPY))  # type: ignore[arg-type]
    after = step_key(parent, copy_step(**{**COPY, field: value}))  # type: ignore[arg-type]
    assert before != after


def test_an_unset_variable_and_an_empty_one_are_different_inputs() -> None:
    parent = base_key("scratch")
    unset = copy_step(**COPY, used={"V": None})  # type: ignore[arg-type]
    empty = copy_step(**COPY, used={"V": ""})  # type: ignore[arg-type]
    assert step_key(parent, unset) != step_key(parent, empty)


def test_a_run_and_a_copy_with_the_same_fields_never_collide() -> None:
    parent = base_key("scratch")
    assert step_key(parent, cachekey.Step("RUN")) != step_key(parent, cachekey.Step("COPY"))


def test_store_key_is_a_valid_store_key_and_carries_the_format() -> None:
    key = step_key(base_key("scratch"), run_step(**RUN))  # type: ignore[arg-type]
    name = store_key(key)
    assert store._check_key(name) == name
    assert str(cachekey.KEY_FORMAT) in name.split("-")[0]
