"""The pytest11 entry point: options, ini keys, markers, and the hooks that route tests.

``-p no:isolate`` disables all of it.
"""

from __future__ import annotations

import pytest

from pytest_isolate import options, stash
from pytest_isolate.fixtures import FIXTURES, container, container_factory
from pytest_isolate.images import RegistrySettings, SessionImages
from runtime.errors import IsolateError
from runtime.spec import HOST

INTERACTIVE = ("usepdb", "trace")
__all__ = ["container", "container_factory"]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("isolate", "hermetic containers (pytest-isolate)")
    group.addoption(
        "--isolate",
        action="store_true",
        default=None,
        help="run every test in its own container (opt out with @pytest.mark.container(False))",
    )
    group.addoption(
        "--no-isolate",
        action="store_true",
        default=False,
        help="run every test in this process, ignoring --isolate and container markers (debugging)",
    )
    group.addoption(
        "--isolate-image", default=None, help="default image for isolated tests (default: host)"
    )
    group.addoption(
        "--isolate-timeout", type=float, default=None, help="default per-test timeout in seconds"
    )
    group.addoption("--isolate-store", default=None, help="image store directory")
    group.addoption(
        "--isolate-unsupported",
        choices=("fail", "skip"),
        default=None,
        help="when this host cannot run containers: fail at start (default) or skip isolated tests",
    )
    group.addoption(
        "--isolate-mem-limit",
        default=None,
        help="memory limit per test (pytest-isolate compatible)",
    )
    group.addoption(
        "--isolate-cpu-limit",
        type=float,
        default=None,
        help="CPU limit per test (pytest-isolate compatible)",
    )
    group.addoption(
        "--isolate-pull",
        choices=("never", "missing", "always"),
        default=None,
        help="pull images the tests name from their registry: missing (default), always, never",
    )
    group.addoption(
        "--isolate-cache-from",
        action="append",
        default=[],
        metavar="REF",
        help="a registry build cache (pushed by --isolate-cache-to) for the Dockerfiles tests "
        "name (repeatable)",
    )
    group.addoption(
        "--isolate-cache-to",
        default=None,
        metavar="REF",
        help="push the build cache of the Dockerfiles built in this run to this registry ref",
    )
    group.addoption(
        "--isolate-insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="reach this registry over plain HTTP (loopback registries always are; repeatable)",
    )
    parser.addini("isolate", "run every test in its own container", type="bool", default=False)
    parser.addini("isolate_pull", "pull policy: missing, always or never", default="missing")
    parser.addini("isolate_cache_from", "registry build caches to use", type="linelist")
    parser.addini("isolate_cache_to", "registry ref to push the build cache to", default="")
    parser.addini(
        "isolate_insecure_registries", "registries reached over plain HTTP", type="linelist"
    )
    parser.addini("isolate_image", "default image for isolated tests", default=HOST)
    parser.addini("isolate_timeout", "default per-test timeout in seconds", default="")
    parser.addini(
        "isolate_unsupported", "fail or skip when containers cannot run here", default="fail"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "container(image='host', **options): run this test inside a fresh container of the image; "
        "container(False) opts out of --isolate. Options: env, workdir, user, hostname, volumes, "
        "tmpfs, read_only, network, timeout, build_args, target.",
    )
    config.addinivalue_line(
        "markers",
        "isolate(timeout=None, mem_limit=None, cpu_limit=None): run this test in a container "
        "(compatible with the older pytest-isolate plugin)",
    )
    if config.getoption("--isolate-store"):
        import os

        os.environ["PYTEST_ISOLATE_STORE"] = config.getoption("--isolate-store")
    config.stash[stash.IMAGES_KEY] = SessionImages(
        lambda text: _say(config, text), _registry_settings(config)
    )


def _registry_settings(config: pytest.Config) -> RegistrySettings:
    pull = config.getoption("--isolate-pull") or config.getini("isolate_pull")
    if pull not in ("never", "missing", "always"):  # runtime.image.images.PULL_POLICIES
        raise pytest.UsageError(f"isolate_pull = {pull!r}: use missing, always or never")
    return RegistrySettings(
        pull=pull,
        cache_from=tuple(
            config.getoption("--isolate-cache-from") or config.getini("isolate_cache_from")
        ),
        cache_to=config.getoption("--isolate-cache-to") or config.getini("isolate_cache_to"),
        insecure=tuple(
            config.getoption("--isolate-insecure-registry")
            + config.getini("isolate_insecure_registries")
        ),
    )


def _say(config: pytest.Config, text: str) -> None:
    """A line in the terminal (the controller's only, under xdist: workers have none)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)


def pytest_unconfigure(config: pytest.Config) -> None:
    stash.close(config)


def _isolate_all(config: pytest.Config) -> bool:
    if config.getoption("--no-isolate"):
        return False
    cli = config.getoption("--isolate")
    return bool(cli) if cli is not None else bool(config.getini("isolate"))


def _defaults(config: pytest.Config) -> dict[str, object]:
    timeout = config.getoption("--isolate-timeout") or config.getini("isolate_timeout") or None
    return {
        "image": config.getoption("--isolate-image") or config.getini("isolate_image") or HOST,
        "timeout": timeout,
        "mem_limit": config.getoption("--isolate-mem-limit"),
        "cpu_limit": config.getoption("--isolate-cpu-limit"),
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--no-isolate"):
        return
    isolate_all = _isolate_all(config)
    interactive = [o for o in INTERACTIVE if config.getoption(o, False)]
    defaults = _defaults(config)
    chosen = []
    for item in items:
        markers = list(item.iter_markers(options.MARKER))
        legacy = list(item.iter_markers(options.LEGACY_MARKER))
        if not options.wanted(markers or legacy, isolate_all):
            continue
        if set(FIXTURES) & set(getattr(item, "fixturenames", ())):
            continue  # the test drives a container from the host; the marker configures it
        tc = options.merge(item.nodeid, defaults, markers, legacy)
        for limit in options.LIMITS:
            if getattr(tc, limit) is not None:
                raise pytest.UsageError(
                    f"{item.nodeid}: {limit} needs cgroup limits, which pytest-isolate does not "
                    "support yet; remove the option or run without isolation"
                )
        chosen.append((item, tc))
    if not chosen:
        return
    if interactive:
        config.issue_config_time_warning(
            pytest.PytestWarning(
                f"pytest-isolate: --{interactive[0].replace('use', '')} needs the test in this "
                "process; isolation is turned off for this run"
            ),
            stacklevel=2,
        )
        return
    try:
        stash.engine(config).check_host(userns=_needs_userns())
    except IsolateError as e:
        mode = config.getoption("--isolate-unsupported") or config.getini("isolate_unsupported")
        if mode == "skip":
            for item, _ in chosen:
                item.add_marker(pytest.mark.skip(reason=f"pytest-isolate: {e}"))
            return
        raise pytest.UsageError(f"pytest-isolate cannot run containers here: {e}") from None
    for item, tc in chosen:
        item.stash[stash.PLAN_KEY] = tc


def _needs_userns() -> bool:
    import os

    return os.geteuid() != 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    tc = item.stash.get(stash.PLAN_KEY, None)
    if tc is None:
        return None
    from pytest_isolate import session  # the engine's side, imported once a test needs it

    session.run_isolated(item, nextitem, tc)
    return True
