"""Credentials from our auth file and docker's config.json, and credential helpers.

Real files in temporary directories; a credential helper is a real executable the test writes
on PATH, speaking the docker-credential-helpers protocol.
"""

from __future__ import annotations

import base64
import json
import stat
import sys
import threading
from pathlib import Path

import pytest

from runtime.errors import AuthError, SpecError
from runtime.registry.credentials import (
    HUB,
    Credentials,
    auth_file,
    docker_config_file,
    erase,
    find,
    lookup,
    parse_config,
    registry_key,
    store,
)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "bin").mkdir()
    return {"HOME": str(home), "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}


def auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def docker_config(env: dict[str, str], config: object) -> Path:
    path = Path(env["HOME"], ".docker", "config.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(config))
    return path


HELPER = """#!{python}
import json, os, sys
server = sys.stdin.read()
with open({log!r}, "a") as log:
    log.write(" ".join(sys.argv[1:]) + " " + server + "\\n")
answers = json.load(open({answers!r}))
if "fail" in answers:
    print(answers["fail"], file=sys.stderr)
    sys.exit(3)
if "raw" in answers:
    print(answers["raw"])
    sys.exit(0)
if server not in answers:
    print("credentials not found in native keychain")
    sys.exit(1)
user, secret = answers[server]
print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
"""


def install_helper(env: dict[str, str], name: str, answers: dict[str, object]) -> Path:
    """Write ``docker-credential-<name>`` on PATH; returns the log of its calls."""
    bindir = Path(env["PATH"].split(":")[0])
    log = bindir / f"{name}.log"
    table = bindir / f"{name}.json"
    table.write_text(json.dumps(answers))
    script = bindir / f"docker-credential-{name}"
    script.write_text(HELPER.format(python=sys.executable, log=str(log), answers=str(table)))
    script.chmod(0o755)
    return log


# --- names and places ---


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ("https://index.docker.io/v1/", HUB),
        ("docker.io", HUB),
        ("index.docker.io", HUB),
        ("registry-1.docker.io", HUB),
        ("https://registry-1.docker.io/v2/", HUB),
        ("https://Registry.Example.com:5000/v2/", "registry.example.com:5000"),
        ("registry.example.com:5000", "registry.example.com:5000"),
        ("http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("localhost:5000/", "localhost:5000"),
        (" ghcr.io/owner/image ", "ghcr.io"),
    ],
)
def test_registry_key_normalizes(server: str, key: str) -> None:
    assert registry_key(server) == key


@pytest.mark.parametrize("server", ["", "https://", "/v2/"])
def test_registry_key_refuses_empty(server: str) -> None:
    with pytest.raises(SpecError, match="not a registry name"):
        registry_key(server)


def test_auth_file_locations() -> None:
    assert auth_file({"PYTEST_ISOLATE_AUTH": "/a/auth.json", "HOME": "/h"}) == Path("/a/auth.json")
    assert auth_file({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/x/pytest-isolate/auth.json")
    assert auth_file({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.config/pytest-isolate/auth.json"
    )
    assert auth_file({}) is None
    with pytest.raises(SpecError, match="PYTEST_ISOLATE_AUTH"):
        auth_file({"PYTEST_ISOLATE_AUTH": "auth.json"})


def test_docker_config_locations() -> None:
    assert docker_config_file({"DOCKER_CONFIG": "/d", "HOME": "/h"}) == Path("/d/config.json")
    assert docker_config_file({"HOME": "/h"}) == Path("/h/.docker/config.json")
    assert docker_config_file({}) is None


def test_credentials_repr_hides_secrets() -> None:
    text = repr(Credentials("me", "hunter2", "tok-123", "somewhere"))
    assert "me" in text and "hunter2" not in text and "tok-123" not in text


# --- our file: login / logout ---


def test_store_then_lookup_roundtrip(env: dict[str, str]) -> None:
    path = store("https://127.0.0.1:5000/v2/", Credentials("alice", "pa:ss"), env)
    assert path == Path(env["HOME"], ".config/pytest-isolate/auth.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {
        "auths": {"127.0.0.1:5000": {"auth": auth("alice", "pa:ss")}}
    }
    found = lookup("127.0.0.1:5000", env)
    assert found is not None
    assert (found.username, found.password, found.identity_token) == ("alice", "pa:ss", None)
    assert str(path) in found.source
    assert lookup("127.0.0.1:5001", env) is None
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".part")] == []


def test_hub_is_stored_under_dockers_key_and_found_by_any_spelling(env: dict[str, str]) -> None:
    path = store("docker.io", Credentials("bob", "pw", identity_token="refresh-me"), env)
    entry = json.loads(path.read_text())["auths"]["https://index.docker.io/v1/"]
    assert entry == {"auth": auth("bob", "pw"), "identitytoken": "refresh-me"}
    for spelling in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        found = lookup(spelling, env)
        assert found is not None and found.identity_token == "refresh-me"


def test_store_replaces_other_spellings_and_keeps_the_rest(env: dict[str, str]) -> None:
    path = Path(env["HOME"], ".config/pytest-isolate/auth.json")
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://reg.example:5000/v2/": {"auth": auth("old", "old")},
                    "other.example": {"auth": auth("o", "o")},
                },
                "extra": {"kept": True},
            }
        )
    )
    path.chmod(0o644)
    store("reg.example:5000", Credentials("new", "new"), env)
    written = json.loads(path.read_text())
    assert written["auths"] == {
        "reg.example:5000": {"auth": auth("new", "new")},
        "other.example": {"auth": auth("o", "o")},
    }
    assert written["extra"] == {"kept": True}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_store_refuses_a_colon_in_the_username(env: dict[str, str]) -> None:
    with pytest.raises(SpecError, match="':'"):
        store("reg.example", Credentials("a:b", "pw"), env)


def test_store_does_not_clobber_a_malformed_file(env: dict[str, str]) -> None:
    path = Path(env["HOME"], ".config/pytest-isolate/auth.json")
    path.parent.mkdir(parents=True)
    path.write_text('{"auths": [1, 2]}')
    with pytest.raises(AuthError, match=r"auth\.json: 'auths' must be an object"):
        store("reg.example", Credentials("u", "p"), env)
    assert path.read_text() == '{"auths": [1, 2]}'


def test_erase(env: dict[str, str]) -> None:
    assert erase("reg.example", env) is False  # no file yet
    store("reg.example", Credentials("u", "p"), env)
    store("keep.example", Credentials("k", "k"), env)
    assert erase("https://reg.example/v2/", env) is True
    assert erase("reg.example", env) is False
    assert lookup("reg.example", env) is None
    assert lookup("keep.example", env) is not None


def test_concurrent_logins_all_land(env: dict[str, str]) -> None:
    errors: list[BaseException] = []

    def login(i: int) -> None:
        try:
            store(f"reg{i}.example", Credentials(f"user{i}", "pw"), env)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=login, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(8):
        found = lookup(f"reg{i}.example", env)
        assert found is not None and found.username == f"user{i}"


def test_pytest_isolate_auth_overrides_the_location(env: dict[str, str], tmp_path: Path) -> None:
    env["PYTEST_ISOLATE_AUTH"] = str(tmp_path / "elsewhere" / "creds.json")
    assert store("reg.example", Credentials("u", "p"), env) == tmp_path / "elsewhere/creds.json"
    assert not Path(env["HOME"], ".config").exists()


# --- docker's config.json ---


def test_our_file_comes_before_dockers(env: dict[str, str]) -> None:
    docker_config(env, {"auths": {"reg.example": {"auth": auth("docker", "d")}}})
    found = lookup("reg.example", env)
    assert found is not None and found.username == "docker"
    store("reg.example", Credentials("ours", "o"), env)
    found = lookup("reg.example", env)
    assert found is not None and found.username == "ours"


def test_docker_auths_entries(env: dict[str, str]) -> None:
    path = docker_config(
        env,
        {
            "auths": {
                "https://reg.example:5000/v2/": {"auth": auth("u", "p")},
                "fields.example": {"username": "fu", "password": "fp"},
                "token.example": {"auth": auth("tu", ""), "identitytoken": "idt"},
                "placeholder.example": {},
                "https://index.docker.io/v1/": {"auth": auth("hub", "h")},
            }
        },
    )
    one = lookup("reg.example:5000", env)
    assert one is not None and (one.username, one.password) == ("u", "p")
    assert f"{path}: auths['https://reg.example:5000/v2/']" == one.source
    two = lookup("fields.example", env)
    assert two is not None and (two.username, two.password) == ("fu", "fp")
    three = lookup("token.example", env)
    assert three is not None and (three.username, three.identity_token) == ("tu", "idt")
    assert lookup("placeholder.example", env) is None
    hub = lookup("registry-1.docker.io", env)
    assert hub is not None and hub.username == "hub"


def test_docker_config_env_variable(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "dc").mkdir()
    (tmp_path / "dc" / "config.json").write_text(
        json.dumps({"auths": {"reg.example": {"auth": auth("dc", "x")}}})
    )
    env["DOCKER_CONFIG"] = str(tmp_path / "dc")
    found = lookup("reg.example", env)
    assert found is not None and found.username == "dc"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"config\.json: not valid JSON \(line 1"),
        (b"[]", r"config\.json: expected a JSON object"),
        (
            b'{"auths": {"reg.example": "x"}}',
            r"config\.json: auths\['reg\.example'\] must be an object",
        ),
        (b'{"credHelpers": {"reg.example": 3}}', r"credHelpers\['reg\.example'\] must be a helper"),
        (b'{"credsStore": 3}', r"'credsStore' must be a helper name"),
        (
            b'{"auths": {"reg.example": {"auth": "%%%"}}}',
            r"auths\['reg\.example'\]: 'auth' is not base64",
        ),
        (
            b'{"auths": {"reg.example": {"auth": "' + base64.b64encode(b"nocolon") + b'"}}}',
            r"auths\['reg\.example'\]: 'auth' does not hold 'user:password'",
        ),
        (
            b'{"auths": {"reg.example": {"auth": 5}}}',
            r"auths\['reg\.example'\]: 'auth' must be a string",
        ),
        (
            b'{"credHelpers": {"reg.example": "../evil"}}',
            r"credHelpers\['reg\.example'\]: '\.\./evil' is not",
        ),
    ],
)
def test_malformed_docker_config_names_file_and_key(
    env: dict[str, str], content: bytes, message: str
) -> None:
    path = Path(env["HOME"], ".docker", "config.json")
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(AuthError, match=message) as err:
        lookup("reg.example", env)
    assert str(path) in str(err.value)


def test_a_malformed_entry_of_another_registry_does_not_matter(env: dict[str, str]) -> None:
    docker_config(
        env,
        {"auths": {"bad.example": {"auth": "%%%"}, "reg.example": {"auth": auth("u", "p")}}},
    )
    assert lookup("reg.example", env) is not None


def test_empty_file_is_no_credentials(env: dict[str, str]) -> None:
    path = docker_config(env, {})
    path.write_text("")
    assert lookup("reg.example", env) is None
    assert parse_config(b"  \n", path) == {}


# --- credential helpers ---


def test_cred_helper_for_one_registry(env: dict[str, str]) -> None:
    log = install_helper(env, "fake", {"reg.example:5000": ["helped", "s3cret"]})
    docker_config(
        env,
        {
            "credHelpers": {"https://reg.example:5000": "fake"},
            "auths": {"reg.example:5000": {"auth": auth("file", "f")}},
        },
    )
    found = lookup("reg.example:5000", env)
    assert found is not None and (found.username, found.password) == ("helped", "s3cret")
    assert "docker-credential-fake" in found.source
    assert log.read_text() == "get reg.example:5000\n"
    assert lookup("other.example", env) is None
    assert log.read_text() == "get reg.example:5000\n"  # not asked for other registries


def test_creds_store_is_asked_with_dockers_hub_url(env: dict[str, str]) -> None:
    log = install_helper(env, "store", {"https://index.docker.io/v1/": ["<token>", "idtok"]})
    docker_config(env, {"credsStore": "store", "auths": {"https://index.docker.io/v1/": {}}})
    found = lookup("docker.io", env)
    assert found is not None
    assert (found.username, found.password, found.identity_token) == ("", "", "idtok")
    assert log.read_text() == "get https://index.docker.io/v1/\n"


def test_helper_without_an_entry_falls_through_to_auths(env: dict[str, str]) -> None:
    install_helper(env, "store", {})
    docker_config(env, {"credsStore": "store", "auths": {"reg.example": {"auth": auth("u", "p")}}})
    found = lookup("reg.example", env)
    assert found is not None and found.username == "u"
    docker_config(env, {"credsStore": "store"})
    assert lookup("reg.example", env) is None


def test_missing_helper_is_skipped_with_a_note(env: dict[str, str]) -> None:
    path = docker_config(
        env, {"credsStore": "desktop", "auths": {"reg.example": {"auth": auth("u", "p")}}}
    )
    result = find("reg.example", env)
    assert result.credentials is not None and result.credentials.username == "u"
    assert result.notes == (
        f"docker-credential-desktop is not installed; skipped ({path}: credsStore)",
    )


def test_failing_helper_is_an_auth_error(env: dict[str, str]) -> None:
    install_helper(env, "broken", {"fail": "keychain is locked"})
    docker_config(env, {"credHelpers": {"reg.example": "broken"}})
    with pytest.raises(
        AuthError, match=r"docker-credential-broken get 'reg\.example' failed"
    ) as err:
        lookup("reg.example", env)
    assert "exit 3" in str(err.value) and "keychain is locked" in str(err.value)
    assert "credHelpers['reg.example']" in str(err.value)


def test_helper_answering_garbage_is_an_auth_error(env: dict[str, str]) -> None:
    install_helper(env, "garbage", {"raw": '{"Username": "u"}'})
    docker_config(env, {"credHelpers": {"reg.example": "garbage"}})
    with pytest.raises(AuthError, match="answered something other than"):
        lookup("reg.example", env)


def test_helper_gets_the_environment_passed_in(env: dict[str, str], tmp_path: Path) -> None:
    install_helper(env, "fake", {"reg.example": ["u", "p"]})
    docker_config(env, {"credHelpers": {"reg.example": "fake"}})
    assert lookup("reg.example", env) is not None
    env["PATH"] = "/usr/bin:/bin"  # the helper is no longer on the PATH we pass
    result = find("reg.example", env)
    assert result.credentials is None and "not installed" in result.notes[0]
